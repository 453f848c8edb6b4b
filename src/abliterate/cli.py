"""The ``abliterate`` command line. All printing happens in the cli_* modules; the library only reports progress."""

import sys

# Importing a cli_* module registers its commands; --help lists them in this order.
from . import cli_share, cli_tools  # noqa: F401  (verify, reproduce, push; measure, apply)

# isort: split
from . import cli_chat, cli_eval, cli_export, cli_run  # noqa: F401  (chat; eval; export; run, demo)
from .cli_common import app


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # e.g. piped into head
        sys.exit(0)


if __name__ == "__main__":
    main()
