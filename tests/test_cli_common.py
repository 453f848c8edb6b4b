"""What cli/common.py gives every command: --help lists the commands in the order a user meets them, and no plain
flag shows a ``<bool>`` metavar, in any command's help."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from abliterate.cli import app
from abliterate.cli.common import COMMAND_ORDER

WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}
runner = CliRunner()


def help_text(*command: str) -> str:
    res = runner.invoke(app, [*command, "--help"], env=WIDE)
    assert res.exit_code == 0, res.output
    return res.output


def listed_commands(text: str) -> list[str]:
    """The command names of the help's Commands panel, top to bottom."""
    panel = text.split("Commands", 1)[1]
    return re.findall(r"^│ (\w+) ", panel, re.M)


def every_command() -> list[tuple[str, ...]]:
    group = typer.main.get_command(app)
    ctx = typer.Context(group)
    found: list[tuple[str, ...]] = [()]
    for name in group.list_commands(ctx):
        found.append((name,))
        sub = group.get_command(ctx, name)
        if hasattr(sub, "list_commands"):
            found += [(name, inner) for inner in sub.list_commands(typer.Context(sub, parent=ctx))]
    return found


def test_help_lists_the_commands_in_the_order_a_user_meets_them() -> None:
    listed = listed_commands(help_text())
    assert listed[:4] == ["demo", "run", "eval", "chat"]
    assert listed == list(COMMAND_ORDER), "every command has its place in COMMAND_ORDER"
    assert listed.index("run") < listed.index("verify") < listed.index("push")


@pytest.mark.parametrize("command", every_command(), ids=lambda c: " ".join(c) or "abliterate")
def test_no_help_shows_a_bool_metavar(command: tuple[str, ...]) -> None:
    text = help_text(*command)
    assert "--help" in text
    assert "<bool>" not in text
