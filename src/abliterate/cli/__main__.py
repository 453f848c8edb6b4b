"""``python -m abliterate.cli``."""

from abliterate.cli import main

main()
