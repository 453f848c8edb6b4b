"""The ``abliterate`` command line. All printing happens in the cli_* modules; the library only reports progress."""

import sys

from . import cli_chat, cli_eval, cli_export, cli_run, cli_share, cli_tools  # noqa: F401  (registers the commands)
from .cli_common import app


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # e.g. piped into head
        sys.exit(0)


if __name__ == "__main__":
    main()
