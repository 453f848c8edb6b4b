"""Config help defined once: every RunConfig field carries its help text, and the CLI options of the
RunConfig settings shared by run, measure and eval show exactly that text in --help."""

from __future__ import annotations

from dataclasses import fields

import pytest
import typer
from typer.testing import CliRunner

from abliterate.cli import app
from abliterate.run.config import RUN_HELP, SEARCH_HELP, RunConfig, SearchConfig

SHARED = {  # option -> RunConfig field, for the options cli_common defines from the config
    "--dtype": "dtype",
    "--device": "device",
    "--device-map": "device_map",
    "--max-memory": "max_memory",
    "--offload-folder": "offload_folder",
    "--quantize": "quantize",
    "--disable-thinking": "disable_thinking",
    "--response-prefix": "response_prefix",
    "--behaviour": "behaviour",
}


def test_every_field_has_help():
    for cls, helps in ((RunConfig, RUN_HELP), (SearchConfig, SEARCH_HELP)):
        for f in fields(cls):
            assert helps[f.name] == f.metadata["help"] and helps[f.name].strip(), f.name


def options(command: str) -> dict[str, str]:
    cmd = typer.main.get_command(app).commands[command]
    return {opt: p.help for p in cmd.params for opt in getattr(p, "opts", []) if opt.startswith("--")}


@pytest.mark.parametrize("command", ["run", "measure", "eval"])
def test_option_help_is_the_fields(command):
    found = options(command)
    shared = {opt: key for opt, key in SHARED.items() if opt in found}
    assert len(shared) >= 8, found
    for opt, key in shared.items():
        assert found[opt] == RUN_HELP[key], opt
    if command in ("run", "eval"):
        assert found["--judge"] == RUN_HELP["judge"] and found["--judge-labels"] == RUN_HELP["judge_labels"]


def test_help_shows_the_fields_text():
    res = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert res.exit_code == 0
    text = " ".join(res.output.replace("│", " ").split())
    for key in ("dtype", "device_map", "behaviour", "judge"):
        assert " ".join(RUN_HELP[key].split()) in text, key
