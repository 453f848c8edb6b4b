"""The ``abliterate`` command line. All printing happens in the cli modules; the library only reports progress."""

import sys

# Importing a command module registers its commands; --help lists them in cli.common.COMMAND_ORDER.
from abliterate.cli import chat, evaluate, export, run, share, tools  # noqa: F401  (registers every command)
from abliterate.cli.common import app


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # e.g. piped into head
        sys.exit(0)


if __name__ == "__main__":
    main()
