"""The command line: help, config precedence, and bad input (one line, non-zero exit, nothing written)."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from abliterate.cli import app
from abliterate.cli import common as cli_common
from abliterate.run import config as config_mod

runner = CliRunner()


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


def run_args(model_dir, out, *extra):
    return ("run", str(model_dir), "--out", str(out), "--n-train", "4", "--n-val", "8", "--n-test", "2", *extra)


def test_run_refuses_a_model_that_never_refuses(model_dir, tmp_path):
    out = tmp_path / "out"
    res = invoke(*run_args(model_dir, out))
    assert res.exit_code == 2 and "does not refuse" in res.output
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_run_bad_inputs(model_dir, tmp_path):
    missing = invoke("run", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert missing.exit_code == 2 and "no such file or directory" in missing.output
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    res = invoke(*run_args(model_dir, existing))
    assert res.exit_code == 2 and "already exists" in res.output
    assert (existing / "keep.txt").read_text() == "mine"
    res = invoke(*run_args(model_dir, model_dir, "--force"))
    assert res.exit_code == 2 and "input model" in res.output
    res = invoke(*run_args(model_dir, model_dir.parent, "--force"))
    assert res.exit_code == 2 and "input model" in res.output
    res = invoke(*run_args(model_dir, tmp_path / "o", "--scale", "-0.5"))
    assert res.exit_code == 2 and "scale must be >= 0" in res.output
    res = invoke(*run_args(model_dir, tmp_path / "o", "--method", "nope"))
    assert res.exit_code == 2 and "unknown method" in res.output
    assert not (tmp_path / "o").exists()


def test_run_bad_prompt_files(model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json}\n')
    res = invoke(*run_args(model_dir, tmp_path / "o", "--harmful", str(bad)))
    assert res.exit_code == 2 and "line 2 is not valid JSON" in res.output
    csv = tmp_path / "p.csv"
    csv.write_text("question_text\nhello\n")
    res = invoke(*run_args(model_dir, tmp_path / "o", "--harmful", f"{csv}:missing"))
    assert res.exit_code == 2 and "no column missing" in res.output
    small = tmp_path / "small.txt"
    small.write_text("one\ntwo\n")
    res = invoke(*run_args(model_dir, tmp_path / "o", "--harmful", str(small)))
    assert res.exit_code == 2 and "after deduplication but 14 are needed" in res.output
    assert not (tmp_path / "o").exists()


STAGE_LINE = re.compile(r"^(capture|sweep): (\d+)/(\d+)( \(\d+%\) (elapsed \S+ eta \S+|done in \S+))?$")


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(model_dir, tmp_path, monkeypatch):
    """CI logs, ssh, ``2> log``: a rich bar would only render at the end, so each stage logs plain lines as it goes."""
    ticks = itertools.count(0, 7)  # a fake clock: 7 s pass between two progress reports
    monkeypatch.setattr(cli_common, "_clock", lambda: next(ticks))
    args = ["measure", str(model_dir), "--out", str(tmp_path / "o"), "--n-train", "6", "--n-val", "8"]
    env = {"ABLITERATE_BATCH_SIZE": "2", "FORCE_COLOR": None, "TTY_COMPATIBLE": None}
    res = runner.invoke(app, [*args, "--position", "-1", "--position", "-2"], env=env)
    assert res.exit_code == 0, res.output
    assert "━" not in res.stderr  # no rich bar
    lines = [line for line in res.stderr.splitlines() if STAGE_LINE.match(line)]
    capture, sweep = lines[:7], lines[7:]
    assert capture == [
        "capture: 0/12",
        "capture: 2/12 (17%) elapsed 7s eta 35s",
        "capture: 4/12 (33%) elapsed 14s eta 28s",
        "capture: 6/12 (50%) elapsed 21s eta 21s",
        "capture: 8/12 (67%) elapsed 28s eta 14s",
        "capture: 10/12 (83%) elapsed 35s eta 7s",
        "capture: 12/12 (100%) done in 42s",
    ]
    assert sweep[0] == "sweep: 0/4" and sweep[-1].startswith("sweep: 4/4 (100%) done in ")
    assert len(sweep) == 5 and all(" eta " in line for line in sweep[1:-1])
    # the log lines come before the summary, in the order the user sees them
    assert res.output.index(sweep[-1]) < res.output.index("candidates (") < res.output.index("wrote ")
    quiet = runner.invoke(app, ["-q", *args[:3], str(tmp_path / "q"), *args[4:]], env=env)
    assert quiet.exit_code == 0 and not [line for line in quiet.stderr.splitlines() if STAGE_LINE.match(line)]


def test_plain_progress_logs_every_tenth_or_ten_seconds(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(cli_common, "_clock", lambda: now[0])
    lines: list[str] = []
    progress = cli_common.PlainProgress(lines.append)
    for done in range(1001):  # fast: one line per tenth, not one per call
        progress("fast", done, 1000)
    assert len(lines) == 11 and lines[0] == "fast: 0/1000" and lines[5] == "fast: 500/1000 (50%) elapsed 0s eta 0s"
    lines.clear()
    for done in range(13):  # slow (3 s per item): a line every 10 s although no tenth is done
        progress("slow", done, 1000)
        now[0] += 3
    assert lines == [
        "slow: 0/1000",
        "slow: 4/1000 (0%) elapsed 12s eta 49m48s",
        "slow: 8/1000 (1%) elapsed 24s eta 49m36s",
        "slow: 12/1000 (1%) elapsed 36s eta 49m24s",
    ]
