"""Ctrl-C at every stage of ``run`` and ``measure``: exit 130, "nothing was written", no output, no temporary
directory left beside it, an existing output (--force) kept as it was, the input model's files untouched."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pytest
import transformers
from test_cli import invoke
from tiny import pretend_refusal

from abliterate.cli import run as cli_run
from abliterate.cli import tools as cli_tools
from abliterate.lm import saving
from abliterate.lm.model import LoadedModel
from abliterate.outputs import report
from abliterate.run import pipeline
from abliterate.select.scorer import Scorer

SMALL = ("--n-train", "6", "--n-val", "8")
RUN = (*SMALL, "--n-test", "2", "--max-new-tokens", "2", "--no-search")  # the search: test_run_search.py


def hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def listing(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden temporary siblings included) with its file's hash."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "")
        for p in root.rglob("*")
    }


class CtrlC:
    """Installs one simulated Ctrl-C (KeyboardInterrupt) at a stage and records that it fired."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.mp, self.fired = mp, 0

    def fire(self) -> None:
        self.fired += 1
        raise KeyboardInterrupt

    def wrap(self, owner: object, name: str, *, call: int = 1, after: bool = False, when=None) -> None:
        """Interrupt the ``call``-th call of ``owner.name`` (among those ``when(*args)`` accepts), before it
        runs or, with ``after``, once it has done its work."""
        real, calls = getattr(owner, name), itertools.count(1)

        def wrapper(*args, **kwargs):
            hit = (when is None or when(*args)) and next(calls) == call
            if hit and not after:
                self.fire()
            result = real(*args, **kwargs)
            if hit:
                self.fire()
            return result

        self.mp.setattr(owner, name, wrapper)

    def in_capture(self) -> None:
        real = pipeline.capture
        self.mp.setattr(
            pipeline, "capture", lambda *a, progress=None, **k: real(*a, progress=lambda *_: self.fire(), **k)
        )


def renames(out: Path):
    """Only the output directory's own renames (os.replace is process-wide)."""
    return lambda src, dst, *rest: Path(src).parent == out.parent and Path(src).name.lstrip(".").startswith(out.name)


def install(ctrl: CtrlC, stage: str, out: Path) -> None:
    if stage == "load":
        ctrl.wrap(pipeline, "load_model")
    elif stage == "capture":
        ctrl.in_capture()  # after the first batch, with the capture hooks in place
    elif stage == "sweep":
        ctrl.wrap(Scorer, "score")  # scoring the first candidate, under ablation
    elif stage == "evaluate before":
        ctrl.wrap(LoadedModel, "generate")
    elif stage == "edit":
        ctrl.wrap(pipeline, "apply_plan", after=True)  # the weights in memory are edited
    elif stage == "evaluate after":
        ctrl.wrap(LoadedModel, "generate", call=3)
    elif stage == "save model":
        ctrl.wrap(transformers.PreTrainedModel, "save_pretrained", after=True)  # weights written to the temp dir
    elif stage == "save report":
        ctrl.wrap(report, "write_report", after=True)
    elif stage == "measure report":
        ctrl.wrap(report, "write_measure_report", after=True)
    elif stage.startswith("rename"):  # just after the first (or second) rename of the output directory
        ctrl.wrap(saving.os, "replace", call=int(stage[-1]), after=True, when=renames(out))
    else:
        raise AssertionError(stage)


RUN_STAGES = ["load", "capture", "sweep", "evaluate before", "edit", "evaluate after", "save model", "save report"]
MEASURE_STAGES = ["load", "capture", "sweep", "measure report"]
CASES = (
    [("run", s, False) for s in [*RUN_STAGES, "rename 1"]]
    + [("run", s, True) for s in ["save model", "rename 1", "rename 2"]]
    + [("measure", s, False) for s in [*MEASURE_STAGES, "rename 1"]]
    + [("measure", s, True) for s in ["measure report", "rename 1", "rename 2"]]
)


@pytest.mark.parametrize(("command", "stage", "force"), CASES, ids=[f"{c}-{s}{'-force' * f}" for c, s, f in CASES])
def test_ctrl_c_writes_nothing(model_dir, tmp_path, command, stage, force):
    out = tmp_path / "out"
    if force:  # an earlier output, which --force would replace: it must survive the interrupted run intact
        out.mkdir()
        (out / "keep.txt").write_text("earlier run")
    before, inputs = listing(tmp_path), hashes(model_dir)
    args = [command, str(model_dir), "--out", str(out), *(RUN if command == "run" else SMALL)]
    with pytest.MonkeyPatch.context() as mp, pretend_refusal():
        ctrl = CtrlC(mp)
        install(ctrl, stage, out)
        res = invoke(*args, *(["--force"] if force else []))
    assert ctrl.fired == 1, f"the interrupt at '{stage}' never fired: {res.output}"
    assert res.exit_code == 130, res.output
    assert "interrupted; nothing was written" in res.output
    assert listing(tmp_path) == before  # no output, no .out.tmp-*/.out.old-* sibling; an earlier output unchanged
    assert hashes(model_dir) == inputs


@pytest.mark.parametrize("command", ["run", "measure"])
def test_ctrl_c_after_the_write_says_so(model_dir, tmp_path, command):
    """Once the output is renamed into place it is complete; a Ctrl-C while the summary prints must not claim
    that nothing was written."""
    out = tmp_path / "out"
    args = [command, str(model_dir), "--out", str(out), *(RUN if command == "run" else SMALL)]
    with pytest.MonkeyPatch.context() as mp, pretend_refusal():
        ctrl = CtrlC(mp)
        ctrl.wrap(cli_run, "_summary") if command == "run" else ctrl.wrap(cli_tools, "Table")
        res = invoke(*args)
    assert ctrl.fired == 1 and res.exit_code == 130, res.output
    assert "nothing was written" not in res.output and f"interrupted; {out} was already written" in res.output
    assert (out / "report.html").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
