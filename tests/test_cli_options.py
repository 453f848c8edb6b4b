"""The command line's shared pieces: the model-loading options defined once, run's flags reaching the config, and
the library side of the commands (checks that refuse before anything is loaded)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import typer
from test_cli import invoke
from typer.testing import CliRunner

import abliterate
from abliterate.cli import app
from abliterate.cli import run as cli_run
from abliterate.cli.common import PLACEMENT_OPTS, loads_model
from abliterate.errors import OptionError, OutputError
from abliterate.run import config as config_mod
from abliterate.run.applying import ApplyOptions
from abliterate.run.comparison import EvalOptions, compare

PACKAGE = Path(abliterate.__file__).parent
LOADING = ["run", "measure", "apply", "eval", "chat"]
FLAGS = ["--dtype", "--device", "--device-map", "--max-memory", "--offload-folder", "--quantize"]


def _options(command: str) -> list[Any]:
    group = typer.main.get_command(app)
    return [p for p in group.commands[command].params if p.opts and p.opts[0].startswith("--")]


@pytest.mark.parametrize("command", LOADING)
def test_every_loading_command_takes_the_six_options_with_one_help(command):
    options = {p.name: p for p in _options(command)}
    for (name, annotation), flag in zip(PLACEMENT_OPTS.items(), FLAGS, strict=True):
        shown = options[name]
        assert (shown.opts, shown.help, shown.default) == ([flag], annotation.__metadata__[0].help, None)
    names = [p.opts[0] for p in _options(command)]
    at = names.index("--dtype")
    assert names[at : at + 6] == FLAGS  # together, in one order, where the command's `where` stands


def test_loads_model_hands_over_only_the_given_options():
    seen: list[dict[str, Any]] = []
    demo = typer.Typer()

    @demo.command()
    @loads_model
    def load(name: str, where: dict[str, Any] | None = None, last: int = 0) -> None:
        seen.append({"name": name, "where": where, "last": last})

    res = CliRunner().invoke(demo, ["m", "--dtype", "float16", "--device-map", "auto", "--last", "3"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(demo, ["m"])
    assert res.exit_code == 0, res.output
    assert seen == [
        {"name": "m", "where": {"dtype": "float16", "device_map": "auto"}, "last": 3},
        {"name": "m", "where": {}, "last": 0},
    ]
    res = CliRunner().invoke(demo, ["--help"])
    assert res.output.index("--quantize") < res.output.index("--last") and "--where" not in res.output


def test_run_flags_reach_the_config(tmp_path, monkeypatch):
    got: list[Any] = []
    monkeypatch.setattr(cli_run, "_execute", lambda cfg, hub=None: got.append((cfg, hub)))
    args = ["run", "some/model", "--out", str(tmp_path / "o"), "--dtype", "float16", "--device", "cpu"]
    args += ["--n-train", "5", "--layer", "2", "--layer", "3", "--judge-labels", "A=refusal,B=compliance"]
    args += ["--judge", "classifier:judge-dir"]
    args += ["--kl-tokens", "4", "--trials", "7", "--no-search", "--seed", "9", "--disable-thinking", "--force"]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    (cfg, hub), *_ = got
    flags = {"model": "some/model", "out": str(tmp_path / "o"), "dtype": "float16", "device": "cpu", "n_train": 5}
    flags |= {
        "layers": [2, 3],
        "judge_labels": "A=refusal,B=compliance",
        "judge": "classifier:judge-dir",
        "kl_tokens": 4,
        "seed": 9,
        "force": True,
    }
    flags |= {"search.trials": 7, "search.enabled": False, "disable_thinking": True}
    assert hub is None and cfg.to_dict() == config_mod.load(None, flags).to_dict()


def test_run_without_out_is_one_line(monkeypatch):
    monkeypatch.setattr(cli_run, "_execute", lambda cfg, hub=None: pytest.fail("ran without --out"))
    res = invoke("run", "some/model")
    assert res.exit_code == 2 and "pass --out DIR" in res.output


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"mode": "bend", "out_dir": "o"}, "unknown mode 'bend'"),
        ({"scale": -1.0, "out_dir": "o"}, "scale must be >= 0"),
        ({}, "nothing to do"),
        ({"residual_stream": True, "out_dir": "o"}, "--residual-stream acts at run time only"),
        ({"verify": False, "out_dir": "o"}, "--no-verify applies to --stream only"),
    ],
)
def test_apply_options_refuse_before_reading_anything(tmp_path, given, message):
    opts = ApplyOptions("no/such/model", tmp_path / "missing.safetensors", **given)
    with pytest.raises(OptionError, match=message):
        opts.check()


def test_eval_refuses_an_existing_output_and_stray_task_flags_before_loading(tmp_path):
    taken = tmp_path / "m.json"
    taken.write_text("{}")
    defaults = config_mod.RunConfig()
    with pytest.raises(OutputError, match="--out .* already exists"):
        compare(EvalOptions("no/such/model", out_file=taken), defaults)
    with pytest.raises(OptionError, match="--task-path and --limit apply to --tasks"):
        compare(EvalOptions("no/such/model", limit=3), defaults)


def _imports(path: Path) -> list[tuple[str, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found += [(node.module or "", alias.name) for alias in node.names]
    return found


def test_no_private_names_cross_cli_modules_and_the_library_never_imports_them():
    for path in sorted(PACKAGE.glob("*.py")):
        for module, name in _imports(path):
            if path.name.startswith("cli"):
                assert not name.startswith("_"), f"{path.name} imports {module}.{name}"
            else:
                assert not module.startswith("cli"), f"{path.name} (library) imports {module}"
