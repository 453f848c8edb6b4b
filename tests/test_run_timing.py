"""One stage timer for run: every stage's seconds in metrics.json; the unedited model's evaluation reused across
runs unless --no-eval-cache; generation stops at end-of-sequence."""

from __future__ import annotations

import json
import time

import pytest
from test_cli import invoke
from tiny import HARMLESS, pretend_refusal, tiny_lm

from abliterate.lm.model import LoadedModel
from abliterate.run.timing import StageTimer

STAGES = {"load", "validation base", "capture", "sweep", "choose", "evaluate_before", "evaluate_after", "save", "total"}


def test_stage_timer_times_and_splits_on_progress():
    timer = StageTimer()
    seen = []
    progress = timer.watch(lambda *a: seen.append(a))
    with timer.stage("load"):
        time.sleep(0.02)
    with timer.stage("search", splits={"check front": "check"}):
        progress("search", 1, 2)
        time.sleep(0.02)
        progress("check front", 0, 1)
        time.sleep(0.03)
        progress("check front", 1, 1)
    with timer.stage("sweep", splits={"check front": "check"}):  # a split name not reported: no split
        progress("sweep", 1, 1)
    s = timer.seconds
    assert set(s) == {"load", "search", "check", "sweep"}
    assert s["load"] >= 0.02 and 0.02 <= s["search"] < 0.03 <= s["check"]
    assert seen == [("search", 1, 2), ("check front", 0, 1), ("check front", 1, 1), ("sweep", 1, 1)]
    assert timer.so_far()["total"] >= sum(s.values())
    with pytest.raises(RuntimeError), timer.stage("failing"):
        raise RuntimeError("boom")
    assert "failing" in timer.seconds  # timed even when it fails


@pytest.fixture
def generations(monkeypatch):
    """Count LoadedModel.generate_ids calls (every generation of the run goes through it)."""
    count = {"n": 0}
    real = LoadedModel.generate_ids

    def generate_ids(self, prompts, **kw):
        count["n"] += 1
        return real(self, prompts, **kw)

    monkeypatch.setattr(LoadedModel, "generate_ids", generate_ids)
    return count


def _run(model_dir, out, *extra):
    args = ["run", str(model_dir), "--out", str(out), "--n-train", "4", "--n-val", "8", "--n-test", "4"]
    with pretend_refusal():
        res = invoke(*args, "--no-search", "--layer", "1", "--max-new-tokens", "5", *extra)
    assert res.exit_code == 0, res.output
    return json.loads((out / "metrics.json").read_text())


def test_run_reuses_the_base_evaluation_unless_told_not_to(model_dir, tmp_path, generations, own_evaluation_cache):
    first = _run(model_dir, tmp_path / "a")
    cold = generations["n"]
    assert first["before"]["from_cache"] is False and len(list(own_evaluation_cache.glob("*.pt"))) == 1
    generations["n"] = 0
    second = _run(model_dir, tmp_path / "b")
    # the base's reference answers and both sides' answers are not generated again: only the edited model's two
    assert second["before"]["from_cache"] is True and generations["n"] == cold - 3 == 2
    assert second["after"]["from_cache"] is False
    for key in ("harmful_samples", "harmless_samples", "kl", "kl_answer", "perplexity"):
        assert second["before"][key] == first["before"][key]
    assert second["after"]["kl_answer"] == first["after"]["kl_answer"]
    generations["n"] = 0
    off = _run(model_dir, tmp_path / "c", "--no-eval-cache")
    assert off["before"]["from_cache"] is False and generations["n"] == cold
    assert len(list(own_evaluation_cache.glob("*.pt"))) == 1
    recorded = json.loads((tmp_path / "c" / "abliterate_config.json").read_text())["config"]
    assert recorded["eval_cache"] is False
    for metrics in (first, second, off):
        timings = metrics["timings_s"]
        assert set(timings) >= STAGES and all(v > 0 for v in timings.values())
        assert timings["total"] >= sum(v for k, v in timings.items() if k != "total") * 0.99


def test_run_progress_reports_evaluation_batches(model_dir, tmp_path):
    res_lines = _plain_progress(model_dir, tmp_path / "p")
    before = [line for line in res_lines if line.startswith("evaluate before:")]
    assert len(before) > 2, res_lines  # 0/1, then one line per generation batch
    assert any("eta" in line for line in before), before


def _plain_progress(model_dir, out):
    args = ["run", str(model_dir), "--out", str(out), "--n-train", "4", "--n-val", "8", "--n-test", "4"]
    with pretend_refusal():
        res = invoke(*args, "--no-search", "--layer", "1", "--max-new-tokens", "5", "--batch-size", "2")
    assert res.exit_code == 0, res.output
    return [line.strip() for line in res.output.splitlines()]


def test_a_batch_stops_once_every_answer_ended():
    lm = tiny_lm("qwen2")
    prompts = HARMLESS[:3]
    free = lm.generate_ids(prompts, max_new_tokens=12, batch_size=3)
    assert all(len(a) == 12 for a in free)  # no end-of-sequence token met by this random model
    forwards = []
    hook = lm.model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        lm.model.generation_config.eos_token_id = sorted({a[0] for a in free})  # every answer's first token
        assert lm.generate_ids(prompts, max_new_tokens=12, batch_size=3) == [a[:1] for a in free]
        assert len(forwards) == 1  # the prompt's forward gave each row its end: no second step
        forwards.clear()
        # an end token that ends some answers and not others: each stops at its own, the batch with the last one
        cut = {t: [a[: a.index(t) + 1] if t in a else a for a in free] for t in sorted({t for a in free for t in a})}
        t, expected = next((t, e) for t, e in cut.items() if len({len(a) for a in e}) > 1)
        lm.model.generation_config.eos_token_id = [t]
        assert lm.generate_ids(prompts, max_new_tokens=12, batch_size=3) == expected
        assert len(forwards) == max(map(len, expected))
    finally:
        hook.remove()
