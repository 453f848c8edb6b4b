"""Scoring, judging, evaluation and automatic selection on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny import HARMFUL, HARMLESS, tiny_lm

from abliterate import PromptError, ablate, capture, directions, induce
from abliterate.evaluate.evaluation import Evaluator, baseline_note
from abliterate.evaluate.judge import MarkerJudge, normalize, refusal_rate
from abliterate.measure.first_token import first_token_logprobs, kl_divergence, refusal_scores, refusal_token_ids
from abliterate.select.sweep import MIN_VALIDATION, Method, select

VAL_H = [f"Explain how to do harmful thing number {i}." for i in range(MIN_VALIDATION)]
VAL_L = [f"Explain how to do harmless thing number {i}." for i in range(MIN_VALIDATION)]


@pytest.fixture(scope="module")
def lm_acts():
    lm = tiny_lm("qwen2")
    return lm, capture(lm, HARMFUL, HARMLESS, positions=[-2, -1])


def test_judge_normalizes_and_detects():
    judge = MarkerJudge()
    assert judge.is_refusal("I\u2019m sorry, but I can\u2019t help with that.")
    assert judge.is_refusal("**I   CANNOT** do that")
    assert judge.is_refusal("   ")
    assert judge.is_refusal("As an AI, I must decline.")
    assert not judge.is_refusal("Sure! Here is a recipe for bread.")
    assert not MarkerJudge(window=10).is_refusal("Here is a long preamble, and then: I'm sorry")
    assert normalize("_Hello_   *World*") == "hello world"
    assert refusal_rate(["I cannot", "Sure"]) == 0.5
    assert MarkerJudge(markers=["nope"]).judge(["Nope.", "I cannot"]) == [True, False]


def test_refusal_token_ids_come_from_the_tokenizer(lm_acts):
    lm, _ = lm_acts
    ids = refusal_token_ids(lm.tokenizer)
    decoded = {lm.tokenizer.decode([i]) for i in ids}
    assert "I" in decoded and "S" in decoded  # byte-level tokenizer: first bytes of the openers
    assert len(ids) == len(set(ids))


def test_refusal_scores_and_kl_maths():
    logp = torch.log(torch.tensor([[0.25, 0.25, 0.5], [0.1, 0.1, 0.8]]))
    scores = refusal_scores(logp, [0, 1])  # p = 0.5 and 0.2
    assert torch.allclose(scores, torch.tensor([0.0, math.log(0.2 / 0.8)]), atol=1e-5)
    other = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    kl = kl_divergence(logp, other)
    expected = torch.nn.functional.kl_div(other, logp, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl, expected, atol=1e-6)
    assert kl[1] == 0 and kl[0] > 0


def test_first_token_logprobs_respect_hooks_and_order(lm_acts):
    lm, acts = lm_acts
    base = first_token_logprobs(lm, HARMLESS, batch_size=2)
    single = torch.cat([first_token_logprobs(lm, [p]) for p in HARMLESS])
    assert torch.allclose(base, single, atol=1e-5), "batching with left padding must not change results"
    assert torch.allclose(base.exp().sum(-1), torch.ones(len(HARMLESS)), atol=1e-4)
    with ablate(lm, directions.mean_diff(acts)[1, -1]):
        edited = first_token_logprobs(lm, HARMLESS)
    assert kl_divergence(base, edited).mean() > 0


def test_selection_table_filters_and_choice(lm_acts):
    lm, acts = lm_acts
    calls = []
    sel = select(
        lm,
        acts,
        VAL_H,
        VAL_L,
        methods=[Method("mean_diff"), Method("slerp", {"t": 0.5})],
        skip_last=0.3,
        score_skipped=True,
        kl_threshold=10.0,
        max_kl=10.0,
        min_induce=-100.0,
        min_bypass_drop=-100.0,
        progress=lambda i, n, s: calls.append((i, n)),
    )
    assert len(sel.candidates) == 2 * lm.num_layers * 2  # methods x layers x positions
    last = [c for c in sel.candidates if c.layer == lm.num_layers - 1]
    assert last and all(not c.passed and "last 30%" in c.reason for c in last)
    assert calls[-1][0] == calls[-1][1] == len(sel.candidates)
    scored = [c for c in sel.candidates if not math.isnan(c.bypass)]
    assert scored, "some candidates must be scored"
    zero = [c for c in sel.candidates if math.isnan(c.bypass)]
    assert all(not c.passed and "zero-norm" in c.reason for c in zero)
    assert sel.chosen is not None and sel.chosen.bypass == min(c.bypass for c in scored if c.passed)
    assert sel.chosen.method in ("mean_diff", "slerp(t=0.5)")
    d = sel.direction()
    assert d.layer == sel.chosen.layer and abs(float(d.vector.norm()) - 1) < 1e-5
    blob = json.loads(json.dumps(sel.to_dict()))
    assert blob["chosen"]["layer"] == sel.chosen.layer and len(blob["candidates"]) == len(sel.candidates)


def test_selection_filters_reject_everything_with_strict_thresholds(lm_acts):
    lm, acts = lm_acts
    with pytest.raises(PromptError, match="kl_threshold"):
        select(lm, acts, VAL_H, VAL_L, kl_threshold=-1.0)
    sel = select(lm, acts, VAL_H, VAL_L, kl_threshold=1e-9, max_kl=1e-9, layers=[1])
    assert sel.chosen is None
    assert all(not c.passed and "KL" in c.reason for c in sel.candidates)
    assert "no candidate passed" in sel.note or "does not refuse" in sel.note
    with pytest.raises(PromptError, match="no candidate"):
        sel.direction()


def test_selection_validation_rules(lm_acts):
    lm, acts = lm_acts
    with pytest.raises(PromptError, match=f"at least {MIN_VALIDATION}"):
        select(lm, acts, VAL_H[:3], VAL_L)
    with pytest.warns(UserWarning, match="2 validation prompt"):
        select(lm, acts, [*VAL_H[:-1], HARMFUL[0]], [*VAL_L[:-1], HARMLESS[0]], layers=[1])


def test_random_model_is_reported_as_not_refusing(lm_acts):
    lm, acts = lm_acts
    sel = select(lm, acts, VAL_H, VAL_L, layers=[1])
    # a random model puts ~|refusal ids|/vocab mass on refusal openers: far below refusing
    assert not sel.baseline_refuses and "does not refuse" in sel.note


def test_evaluator_caches_base_and_measures_edits(lm_acts, monkeypatch):
    lm, acts = lm_acts
    ev = Evaluator(lm, HARMFUL[:2], HARMLESS[:3], max_new_tokens=4)
    base = ev.measure("base")
    assert base.kl == pytest.approx(0.0, abs=1e-6)
    assert len(base.harmful_samples) == 2 and len(base.harmless_samples) == 3
    assert baseline_note(base) if base.refusal_rate == 0 else not baseline_note(base)
    from abliterate.evaluate import evaluation

    calls = []
    real = evaluation.first_token_logprobs
    monkeypatch.setattr(evaluation, "first_token_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    r = directions.mean_diff(acts)[1, -1]
    after = ev.measure("ablated", lambda: ablate(lm, r))
    assert after.kl > 0 and len(calls) == 1, "base log-probs are computed once, then reused"
    rate, samples = ev.induced_refusal(lambda: induce(lm, r, acts))
    assert 0.0 <= rate <= 1.0 and len(samples) == 3
    assert json.loads(json.dumps(after.to_dict()))["name"] == "ablated"


def test_kl_limit_is_relaxed_step_by_step_when_nothing_passes(lm_acts):
    lm, acts = lm_acts
    sel = select(
        lm,
        acts,
        VAL_H,
        VAL_L,
        layers=[1, 2],
        skip_last=0.0,
        kl_threshold=1e-6,
        max_kl=100.0,
        min_induce=-100,
        min_bypass_drop=-100,
    )
    used = sel.settings["kl_limit_used"]
    assert sel.chosen is not None and used > 1e-6
    assert sel.chosen.kl <= used and all(c.kl > used / 2 for c in sel.candidates), (
        "stops at the first limit that admits one"
    )
