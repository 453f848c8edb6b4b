"""The command line: help, config precedence, and bad input (one line, non-zero exit, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny import tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from abliterate import config as config_mod
from abliterate.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model("qwen2").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def invoke(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env=env)


@pytest.mark.parametrize("cmd", [["run"], ["demo"], ["config", "show"]])
def test_help_is_complete(cmd):
    res = invoke(*cmd, "--help")
    assert res.exit_code == 0
    if cmd != ["config", "show"]:
        assert "Example" in res.output


def test_console_script_runs_headless():
    res = subprocess.run(
        [sys.executable, "-m", "abliterate.cli", "--help"], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    assert res.returncode == 0 and "run" in res.stdout


def test_config_precedence_flags_env_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "from-file"\nn_train = 10\nkl_threshold = 0.5\nmethods = ["slerp"]\n')
    env = {"ABLITERATE_N_TRAIN": "20", "ABLITERATE_SEED": "7"}
    loaded = config_mod.load(cfg, {"n_train": 30}, env=env)
    assert (loaded.model, loaded.n_train, loaded.seed, loaded.kl_threshold, loaded.methods) == (
        "from-file",
        30,
        7,
        0.5,
        ["slerp"],
    )
    res = invoke("config", "show", "--config", str(cfg), "--model", "flag-model", env=env)
    shown = json.loads(res.output)
    assert res.exit_code == 0 and shown["model"] == "flag-model" and shown["n_train"] == 20


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("kl_treshold = 0.2\n", "did you mean 'kl_threshold'"),
        ("scale = -1.0\n", "scale must be >= 0"),
        ('methods = ["bogus"]\n', "unknown method 'bogus'"),
        ("n_train = 'many'\n", "invalid value"),
        ("positions = [0]\n", "negative offsets"),
        ("this is not toml\n", "not valid TOML"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path, toml, message):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    res = invoke("config", "show", "--config", str(cfg))
    assert res.exit_code == 2
    assert message in res.output and res.output.count("error:") == 1


def run_args(tiny_dir, out, *extra):
    return ("run", str(tiny_dir), "--out", str(out), "--n-train", "4", "--n-val", "8", "--n-test", "2", *extra)


def test_run_refuses_a_model_that_never_refuses(tiny_dir, tmp_path):
    out = tmp_path / "out"
    res = invoke(*run_args(tiny_dir, out))
    assert res.exit_code == 2 and "does not refuse" in res.output
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_run_bad_inputs(tiny_dir, tmp_path):
    missing = invoke("run", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert missing.exit_code == 2 and "no such file or directory" in missing.output
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    res = invoke(*run_args(tiny_dir, existing))
    assert res.exit_code == 2 and "already exists" in res.output
    assert (existing / "keep.txt").read_text() == "mine"
    res = invoke(*run_args(tiny_dir, tiny_dir, "--force"))
    assert res.exit_code == 2 and "input model" in res.output
    res = invoke(*run_args(tiny_dir, tiny_dir.parent, "--force"))
    assert res.exit_code == 2 and "input model" in res.output
    res = invoke(*run_args(tiny_dir, tmp_path / "o", "--scale", "-0.5"))
    assert res.exit_code == 2 and "scale must be >= 0" in res.output
    res = invoke(*run_args(tiny_dir, tmp_path / "o", "--method", "nope"))
    assert res.exit_code == 2 and "unknown method" in res.output
    assert not (tmp_path / "o").exists()


def test_run_bad_prompt_files(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json}\n')
    res = invoke(*run_args(tiny_dir, tmp_path / "o", "--harmful", str(bad)))
    assert res.exit_code == 2 and "line 2 is not valid JSON" in res.output
    csv = tmp_path / "p.csv"
    csv.write_text("question_text\nhello\n")
    res = invoke(*run_args(tiny_dir, tmp_path / "o", "--harmful", f"{csv}:missing"))
    assert res.exit_code == 2 and "no column missing" in res.output
    small = tmp_path / "small.txt"
    small.write_text("one\ntwo\n")
    res = invoke(*run_args(tiny_dir, tmp_path / "o", "--harmful", str(small)))
    assert res.exit_code == 2 and "after deduplication but 14 are needed" in res.output
    assert not (tmp_path / "o").exists()
