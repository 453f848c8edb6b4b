"""Choosing a trial by hand: the search's ``pick`` hook, the terminal prompt (typed answers, a wrong number,
no answer within --pick-wait), and ``run`` in a real pseudo-terminal, where the prompt is offered."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest
from test_search import BASE, L, objective

from abliterate.cli.pick import asks, terminal_pick
from abliterate.select.search import SearchError, search

TESTS = Path(__file__).parent


def _search(**kwargs):
    return search(objective, num_layers=L, trials=12, seed=3, kl_budget=100.0, base=BASE, **kwargs)


def test_pick_hook_overrides_the_default_and_none_keeps_it():
    plain = _search()
    front = plain.front
    assert len(front) >= 2, "the objective gives a front of several trials"
    other = next(n for n in front if n != plain.chosen.number)
    seen = []

    def pick(records, default, note):
        seen.append(([r.number for r in records], default.number, note))
        return other

    picked = _search(pick=pick)
    assert seen == [(front, plain.chosen.number, plain.note)]
    assert picked.chosen.number == other and "picked at the prompt" in picked.note
    assert _search(pick=lambda *_: None).chosen.number == plain.chosen.number
    asked = []
    given = _search(pick=lambda *a: asked.append(a), trial=other)
    assert given.chosen.number == other and asked == [], "--trial is not asked again"
    with pytest.raises(SearchError, match="not on the Pareto front"):
        _search(pick=lambda *_: 10**6)


def _pipe(text: str | None):
    r, w = os.pipe()
    if text is not None:
        os.write(w, text.encode())
        os.close(w)
    return os.fdopen(r), w


def test_terminal_prompt_answers_wrong_numbers_and_timeout(capsys):
    result = _search()
    front = [t for t in result.trials if t.on_front]
    other = next(t.number for t in front if t.number != result.chosen.number)
    stream, _ = _pipe(f"abc\n{10**6}\n{other}\n")
    assert terminal_pick(30, stream)(front, result.chosen, result.note) == other
    said = capsys.readouterr().err
    assert said.count("Trial to keep") == 3 and "is not a trial on the front" in said and "Pareto front" in said
    stream, _ = _pipe("\n")
    assert terminal_pick(30, stream)(front, result.chosen, result.note) is None, "Enter keeps the default"
    stream, _ = _pipe("")
    assert terminal_pick(30, stream)(front, result.chosen, result.note) is None, "end of input keeps the default"
    stream, w = _pipe(None)  # nobody types
    assert terminal_pick(0.3, stream)(front, result.chosen, result.note) is None
    assert f"no answer in 0.3 s; keeping trial {result.chosen.number}" in capsys.readouterr().err
    os.close(w)


class _Stream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_prompt_is_offered_only_on_a_terminal_with_a_wait():
    yes, no = _Stream(True), _Stream(False)
    assert asks(yes, yes, 60, None, False)
    assert not asks(no, yes, 60, None, False) and not asks(yes, no, 60, None, False)
    assert not asks(yes, yes, 0, None, False), "--pick-wait 0 never asks"
    assert not asks(yes, yes, 60, 3, False), "--trial given"
    assert not asks(yes, yes, 60, None, True), "--json"


RUNNER = """
import sys
sys.path.insert(0, {tests!r})
from tiny import pretend_refusal
from abliterate.cli import app
with pretend_refusal():
    app(sys.argv[1:], prog_name="abliterate")
"""


ENV = {**os.environ, "COLUMNS": "200"}


def _command(model_dir, out, *extra) -> list[str]:
    """``python -c RUNNER run ...``: a small seeded search on the tiny model, with the tests' pretend refusal."""
    config = out.parent / "c.toml"
    config.write_text("[search]\ntrials = 5\nkl_budget = 100.0\nmax_k = 2\nverify_top = 0\nstartup = 2\nseed = 2\n")
    args = ["-c", RUNNER.format(tests=str(TESTS)), "run", str(model_dir), "--out", str(out), "--config", str(config)]
    return [sys.executable, *args, "--n-train", "4", "--n-val", "8", "--n-test", "2", "--max-new-tokens", "2", *extra]


def _spawn(model_dir, out, *extra):
    pexpect = pytest.importorskip("pexpect")
    exe, *args = _command(model_dir, out, *extra)
    return pexpect.spawn(exe, args, env=ENV, encoding="utf-8", timeout=600, dimensions=(50, 200))


def test_run_on_a_terminal_asks_and_keeps_the_typed_trial(model_dir, tmp_path):
    out = tmp_path / "out"
    child = _spawn(model_dir, out)
    child.expect(r"Trial to keep \[Enter: (\d+);")
    default = int(child.match.group(1))
    child.sendline("999")
    child.expect("not a trial on the front; type one of \\[([0-9, ]+)\\]")
    front = [int(x) for x in child.match.group(1).split(",")]
    assert len(front) >= 2, "seed 2 gives a front of several trials on this tiny model"
    other = next(n for n in front if n != default)
    child.expect("Trial to keep")
    child.sendline(str(other))
    child.expect(r"wrote ")
    child.expect(pexpect_eof())
    child.close()
    assert child.exitstatus == 0, child.before
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["search"]["front"]) == sorted(front)
    assert metrics["search"]["chosen"] == other and "picked at the prompt" in metrics["search"]["note"]
    chosen = next(t["spec"] for t in metrics["search"]["trials"] if t["number"] == other)
    assert json.loads((out / "edit.json").read_text())["spec"] == chosen, "the typed trial's edit was written"


def test_run_on_a_terminal_with_pick_wait_zero_does_not_ask(model_dir, tmp_path):
    out = tmp_path / "out"
    child = _spawn(model_dir, out, "--pick-wait", "0")
    index = child.expect(["Trial to keep", pexpect_eof()])
    child.close()
    assert index == 1 and child.exitstatus == 0, child.before
    assert "picked at the prompt" not in json.loads((out / "metrics.json").read_text())["search"]["note"]


def test_run_with_stderr_redirected_does_not_ask(model_dir, tmp_path):
    """The front and the prompt go to stderr: with stderr not a terminal, a prompt nobody sees must not wait."""
    pexpect = pytest.importorskip("pexpect")
    out = tmp_path / "out"
    log = tmp_path / "stderr.log"
    command = shlex.join(_command(model_dir, out, "--pick-wait", "600")) + f" 2>{shlex.quote(str(log))}"
    shell = pexpect.spawn("/bin/sh", ["-c", command], encoding="utf-8", timeout=300, env=ENV)
    shell.expect(pexpect.EOF)  # a prompt would wait 600 s: pexpect.TIMEOUT fails the test
    shell.close()
    assert shell.exitstatus == 0, log.read_text()
    assert "Trial to keep" not in log.read_text()
    assert "picked at the prompt" not in json.loads((out / "metrics.json").read_text())["search"]["note"]


def pexpect_eof():
    import pexpect

    return pexpect.EOF


def test_bad_pick_wait_is_one_line_and_writes_nothing(model_dir, tmp_path):
    from typer.testing import CliRunner

    from abliterate.cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(model_dir), "--out", str(out), "--pick-wait", "-1"])
    assert res.exit_code == 2 and "--pick-wait" in res.output and not out.exists()
