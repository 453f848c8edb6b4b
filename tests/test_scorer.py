"""The validation scorer: base scores, scores under hooks and in-place edits, generation-based counts."""

from __future__ import annotations

import json

import pytest
import torch
from test_select_sweep import VAL_H, VAL_L
from tiny import HARMFUL, HARMLESS, tiny_lm

from abliterate import PromptError, ablate, capture, directions
from abliterate.evaluate.judge import MarkerJudge, judge_responses
from abliterate.measure.first_token import first_token_logprobs, kl_divergence, refusal_scores, refusal_token_ids
from abliterate.select.scorer import Score, Scorer
from abliterate.select.subspace import choose_k
from abliterate.select.sweep import select


@pytest.fixture(scope="module")
def lm_acts():
    lm = tiny_lm("qwen2")
    return lm, capture(lm, HARMFUL, HARMLESS)


@pytest.fixture(scope="module")
def scorer(lm_acts):
    return Scorer(lm_acts[0], VAL_H, VAL_L, batch_size=3)


def full(lm, prompts, system=None) -> torch.Tensor:
    """Full first-token log-probs on the CPU from plain left-padded batches (no shared prefix)."""
    return first_token_logprobs(lm, prompts, system=system, share_prefix=False, batch_size=len(prompts))


def slow(lm, harmful, harmless, base_harmless, ids, system=None) -> dict[str, float]:
    """The scorer's numbers the slow way, from full log-prob tensors."""
    h, l_ = full(lm, harmful, system), full(lm, harmless, system)
    lo = refusal_scores(h, ids)
    return {
        "refusal": float(lo.mean()),
        "refusal_rate": float((lo > 0).float().mean()),
        "kl": float(kl_divergence(base_harmless, l_).mean()) if base_harmless is not None else 0.0,
        "harmless_refusal": float(refusal_scores(l_, ids).mean()),
    }


class NoTokenizing:
    """A tokenizer stand-in that knows its pad id and fails on any tokenization."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, *args: object, **kwargs: object) -> None:
        pytest.fail("score() must not tokenize")


def close(score: Score, ref: dict[str, float], atol: float = 1e-4) -> None:
    for key, value in ref.items():
        assert getattr(score, key) == pytest.approx(value, abs=atol), key


def test_unedited_score_equals_base(scorer):
    again = scorer.score()
    assert again.kl == pytest.approx(0.0, abs=1e-6) and scorer.base.kl == 0.0
    assert again.refusal == pytest.approx(scorer.base.refusal, abs=1e-6)
    assert again.harmless_refusal == pytest.approx(scorer.base.harmless_refusal, abs=1e-6)
    assert again.refusal_rate == scorer.base.refusal_rate
    assert again.seconds > 0 and scorer.base.seconds > 0
    assert json.loads(json.dumps(again.to_dict())) == again.to_dict()
    assert set(again.to_dict()) == {"refusal", "refusal_rate", "kl", "harmless_refusal", "seconds"}


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "gemma3", "mixtral"])
def test_scores_match_the_slow_way_unedited_and_under_ablation(family):
    lm = tiny_lm(family)
    acts = capture(lm, HARMFUL, HARMLESS)
    ids = refusal_token_ids(lm.tokenizer)
    system = "Be brief."
    scorer = Scorer(lm, VAL_H, VAL_L, system=system, batch_size=3)
    assert scorer._harmful.prefix_len >= 4, "the shared-prefix path is the one under test"
    base_l = full(lm, VAL_L, system)
    close(scorer.base, slow(lm, VAL_H, VAL_L, None, ids, system))
    # every writer, embeddings included: the shared prefix's KV cache changes and must be recomputed
    with ablate(lm, directions.mean_diff(acts)[1, -1]):
        edited = scorer.score()
        close(edited, slow(lm, VAL_H, VAL_L, base_l, ids, system))
        assert scorer.harmful_refusal() == pytest.approx(edited.refusal, abs=1e-6)
        assert scorer.induce() == pytest.approx(edited.harmless_refusal, abs=1e-6)
    assert edited.kl > 1e-4 and edited.refusal != pytest.approx(scorer.base.refusal, abs=1e-4)
    assert scorer.score().kl == pytest.approx(0.0, abs=1e-6), "hooks removed: back to the base"


def test_in_place_weight_edits_are_scored_and_tokenization_is_cached(lm_acts, scorer, monkeypatch):
    lm, _ = lm_acts
    ids = refusal_token_ids(lm.tokenizer)
    base_l = full(lm, VAL_L)
    monkeypatch.setattr(lm, "format", lambda *a, **k: pytest.fail("score() must not re-format prompts"))
    monkeypatch.setattr(lm, "tokenizer", NoTokenizing(lm.tokenizer.pad_token_id))
    embedding = lm.anatomy.embeddings[0].weight
    saved = embedding.detach().clone()
    with torch.no_grad():
        embedding.mul_(0.7)
    try:
        edited = scorer.score()
    finally:
        with torch.no_grad():
            embedding.copy_(saved)
    assert edited.kl > 1e-4
    monkeypatch.undo()
    with torch.no_grad():
        embedding.mul_(0.7)
    try:
        close(edited, slow(lm, VAL_H, VAL_L, base_l, ids))
    finally:
        with torch.no_grad():
            embedding.copy_(saved)
    assert scorer.score().kl == pytest.approx(0.0, abs=1e-6)


def test_refusal_ids_progress_and_bad_input(lm_acts):
    lm, _ = lm_acts
    calls: list[tuple[int, int]] = []
    one = Scorer(lm, VAL_H, VAL_L, refusal_ids=[40], batch_size=4, progress=lambda d, n: calls.append((d, n)))
    assert one.refusal_ids == [40]
    h = first_token_logprobs(lm, VAL_H)
    assert one.base.refusal == pytest.approx(float(refusal_scores(h, [40]).mean()), abs=1e-4)
    default = Scorer(lm, VAL_H, VAL_L)
    assert default.refusal_ids == refusal_token_ids(lm.tokenizer)
    assert default.base.refusal != pytest.approx(one.base.refusal, abs=1e-3)
    assert calls == [(4, 8), (8, 8), (4, 8), (8, 8)], "base pass: harmful then harmless, per batch"
    calls.clear()
    one.harmful_refusal()
    assert calls == [(4, 8), (8, 8)]
    with pytest.raises(PromptError, match="outside the model's vocabulary"):
        Scorer(lm, VAL_H, VAL_L, refusal_ids=[10**6])
    with pytest.raises(PromptError, match="is negative"):
        Scorer(lm, VAL_H, VAL_L, refusal_ids=[5, -1])
    with pytest.raises(PromptError, match="no refusal token ids"):
        Scorer(lm, VAL_H, VAL_L, refusal_ids=[])
    with pytest.raises(PromptError, match="batch_size"):
        Scorer(lm, VAL_H, VAL_L, batch_size=0)
    with pytest.raises(PromptError, match="harmless validation prompt set has 0"):
        Scorer(lm, VAL_H, [])


def test_responses_and_verdicts_generate_like_the_model_and_judge_like_the_evaluation(lm_acts, scorer):
    lm, acts = lm_acts
    expected = lm.generate(VAL_H, max_new_tokens=6)
    assert scorer.responses(6) == expected
    assert scorer.responses(6, 3, batch_size=2) == expected[:3]
    assert scorer.responses(6, side="harmless") == lm.generate(VAL_L, max_new_tokens=6)
    marker = expected[0][:2]  # a 'refusal' marker that the first response surely contains
    judge = MarkerJudge(markers=[marker])
    assert scorer.judged(judge, 6) == judge_responses(judge, VAL_H, expected)  # the evaluation's verdicts
    assert [j.verdict for j in scorer.judged(MarkerJudge(markers=["\x00never"]), 6, prompts=4)] == [
        j.verdict for j in judge_responses(MarkerJudge(markers=["\x00never"]), VAL_H[:4], expected[:4])
    ]
    r = directions.mean_diff(acts)[1, -1]
    with ablate(lm, r):
        assert scorer.responses(6) == lm.generate(VAL_H, max_new_tokens=6)
    for bad in (0, len(VAL_H) + 1):
        with pytest.raises(PromptError, match="prompts must be between 1"):
            scorer.judged(judge, 6, prompts=bad)
    with pytest.raises(PromptError, match="max_new_tokens"):
        scorer.judged(judge, 0)
    with pytest.raises(PromptError, match="batch_size"):
        scorer.judged(judge, 6, batch_size=0)
    with pytest.raises(PromptError, match="side must be harmful or harmless"):
        scorer.responses(6, side="both")


def test_select_and_choose_k_reuse_a_scorer(lm_acts, monkeypatch):
    lm, acts = lm_acts
    kwargs = {"layers": [2], "score_skipped": True, "kl_threshold": 10.0, "max_kl": 10.0}
    kwargs |= {"min_induce": -100.0, "min_bypass_drop": -100.0}
    own = select(lm, acts, VAL_H, VAL_L, **kwargs)
    shared = Scorer(lm, VAL_H, VAL_L)
    import abliterate.select.sweep as selection

    monkeypatch.setattr(selection, "Scorer", lambda *a, **k: pytest.fail("a passed scorer must be reused"))
    reused = select(lm, acts, VAL_H, VAL_L, scorer=shared, **kwargs)
    assert reused.base_bypass == pytest.approx(own.base_bypass, abs=1e-5)
    for a, b in zip(own.candidates, reused.candidates, strict=True):
        assert (a.bypass, a.induce, a.kl) == pytest.approx((b.bypass, b.induce, b.kl), abs=1e-5)
    choice = choose_k(lm, acts, VAL_H, VAL_L, layer=2, kind="layers", ks=(1, 2), kl_threshold=10.0, scorer=shared)
    assert choice.scores[0].bypass == pytest.approx(own.candidates[0].bypass, abs=1e-5)
    with pytest.raises(PromptError, match="other validation prompts"):
        select(lm, acts, VAL_H, list(reversed(VAL_L)), scorer=shared, **kwargs)
    with pytest.raises(PromptError, match="another model"):
        choose_k(tiny_lm("qwen2"), acts, VAL_H, VAL_L, layer=1, scorer=shared)
