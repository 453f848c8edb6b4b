"""Three-outcome verdicts with 95 % Wilson intervals: Evaluator, metrics.json, the CLI tables and the report."""

from __future__ import annotations

import json
import re

import pytest
from test_cli import invoke
from tiny import HARMFUL, HARMLESS, pretend_refusal, tiny_lm

from abliterate.evaluate.evaluation import RATES, Evaluator, format_rate, wilson
from abliterate.lm.model import LoadedModel

ANSWERS = [
    "I'm sorry, but I can't help with that.",
    "Sure. First gather the materials, then follow the steps.",
    "",
    "ha" * 40,
]


def flat(output: str) -> str:
    """Console output without table borders, one space between words."""
    return " ".join(re.sub("[\u2500-\u257f]", " ", output).split())


@pytest.fixture
def scripted(monkeypatch):
    """Generation returns a fixed cycle: refusal, compliance, empty, loop (whatever the model or edit)."""
    calls = []

    def generate(self, prompts, **kwargs):
        calls.append(kwargs)
        return [ANSWERS[i % len(ANSWERS)] for i in range(len(prompts))]

    monkeypatch.setattr(LoadedModel, "generate", generate)
    return calls


def test_wilson_interval_known_values():
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(32, 64)
    assert lo < 0.5 < hi and hi - lo < 0.25


def test_evaluator_counts_three_outcomes(scripted):
    ev = Evaluator(tiny_lm("qwen2"), HARMFUL[:4], HARMLESS[:6], max_new_tokens=5, min_new_tokens=2)
    m = ev.measure("base")
    assert scripted[0]["max_new_tokens"] == 5 and scripted[0]["min_new_tokens"] == 2
    assert m.counts("harmful") == {"refusal": 1, "compliance": 1, "degenerate": 2, "unparsed": 0}
    assert (m.refusal_rate, m.compliance_rate, m.degenerate_rate) == (0.25, 0.25, 0.5)
    assert m.counts("harmless") == {"refusal": 2, "compliance": 2, "degenerate": 2, "unparsed": 0}
    assert m.over_refusal == pytest.approx(2 / 6)
    assert [s.reason for s in m.harmful_samples] == ["", "", "empty", "loop"]
    d = m.to_dict()
    for key in RATES:
        lo, hi = d[f"{key}_ci95"]
        assert lo <= d[key] <= hi, key
    assert d["degenerate_rate_ci95"] == pytest.approx([0.15, 0.85], abs=0.005)
    assert sum(d[k] for k in ("refusal_rate", "compliance_rate", "degenerate_rate", "unparsed_rate")) == 1
    assert d["harmful_samples"][3]["verdict"] == "degenerate" and d["judge"] == "marker"
    assert format_rate(m, "degenerate_rate") == "50% (15-85)"


def test_run_writes_and_shows_every_verdict_with_intervals(scripted, model_dir, tmp_path):
    out = tmp_path / "run"
    args = ["run", str(model_dir), "--out", str(out), "--n-train", "4", "--n-val", "8", "--n-test", "4", "--no-search"]
    with pretend_refusal():
        res = invoke(*args, "--layer", "1", "--max-new-tokens", "3")
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    for side in ("before", "after"):
        assert metrics[side]["counts"]["harmful"] == {"refusal": 1, "compliance": 1, "degenerate": 2, "unparsed": 0}
        assert metrics[side]["degenerate_rate_ci95"] == pytest.approx([0.15, 0.85], abs=0.005)
    text = flat(res.stdout)
    for row in ("refusals (harmful) 25% (5-70) 25% (5-70)", "degenerate (harmful) 50% (15-85) 50% (15-85)"):
        assert row in text
    assert "compliance (harmful)" in text and "unparsed" not in text and "95% Wilson" in text
    report = (out / "report.html").read_text()
    assert "degenerate, held-out harmful (4)</td><td>50% (15-85)</td>" in report
    assert "<td class='degenerate'><span class='verdict'>degenerate (loop)</span>" in report
    card = (out / "README.md").read_text()
    assert "| degenerate answers to held-out harmful prompts | 50% (15-85) -> 50% (15-85) |" in card


def test_eval_shows_every_verdict_with_intervals(scripted, model_dir, tmp_path):
    res = invoke("eval", str(model_dir), "--n-test", "4", "--max-new-tokens", "3", "--out", str(tmp_path / "m.json"))
    assert res.exit_code == 0, res.output
    text = flat(res.stdout)
    assert "degenerate (harmful) 50% (15-85)" in text and "over-refusal (harmless) 25% (5-70)" in text
    payload = json.loads((tmp_path / "m.json").read_text())
    assert payload["model"]["compliance_rate_ci95"] == pytest.approx(list(wilson(1, 4)))
