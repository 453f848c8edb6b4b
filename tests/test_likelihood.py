"""The likelihood detector: answer perplexity under the unedited model, teacher-forced after the prompt."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import HARMLESS, tiny_lm

from abliterate.evaluate.degenerate import DegenerateDetector, Detectors
from abliterate.evaluate.judge import MarkerJudge, judge_responses
from abliterate.evaluate.likelihood import THRESHOLD, LikelihoodDetector


def by_hand(lm, prompt: str, answer: str) -> float:
    """One unpadded sequence through the bare model: exp(mean NLL of the answer tokens)."""
    head = lm.tokenizer(lm.format([prompt])[0], add_special_tokens=False)["input_ids"]
    tail = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([head + tail])
    with torch.inference_mode():
        logp = torch.log_softmax(lm.model(input_ids=ids).logits[0, :-1].float(), -1)
    picked = logp[torch.arange(len(head) - 1, ids.shape[1] - 1), torch.tensor(tail)]
    return math.exp(-float(picked.mean()))


def test_perplexity_is_the_answer_tokens_after_the_prompt_in_padded_batches():
    lm = tiny_lm("qwen2")
    prompts = HARMLESS[:3]
    answers = ["Sure, here is a short answer.", "A much longer answer " * 5, "ok"]
    ppl = LikelihoodDetector(lm, batch_size=2).perplexities(prompts, answers)
    assert ppl[0] == pytest.approx(by_hand(lm, prompts[0], answers[0]), rel=1e-4)
    assert ppl[1] == pytest.approx(by_hand(lm, prompts[1], answers[1]), rel=1e-4)
    assert math.isnan(ppl[2])  # under min_tokens: not judged


def test_the_models_own_answer_is_likely_and_random_text_is_not():
    lm = tiny_lm("qwen2")
    prompts = HARMLESS[:4]
    own = lm.generate(prompts, max_new_tokens=12)
    gen = torch.Generator().manual_seed(0)
    vocab = lm.tokenizer.vocab_size
    noise = [lm.tokenizer.decode(torch.randint(3, vocab, (12,), generator=gen).tolist()) for _ in prompts]
    detector = LikelihoodDetector(lm)
    mine, theirs = detector.perplexities(prompts, own), detector.perplexities(prompts, noise)
    assert max(mine) < min(theirs), (mine, theirs)
    cut = LikelihoodDetector(lm, threshold=(max(mine) + min(theirs)) / 2)
    reasons = cut.reasons(prompts * 2, own + noise)
    assert reasons[:4] == [""] * 4 and all(r.startswith("unlikely (perplexity ") for r in reasons[4:])
    judged = judge_responses(MarkerJudge(), prompts * 2, own + noise, detector=Detectors(DegenerateDetector(), cut))
    assert all(j.verdict == "degenerate" for j in judged[4:])


def test_bad_settings():
    lm = tiny_lm("qwen2")
    assert LikelihoodDetector(lm).threshold == THRESHOLD
    with pytest.raises(ValueError, match="threshold must be above 1"):
        LikelihoodDetector(lm, threshold=0.5)
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        LikelihoodDetector(lm).perplexities(["a", "b"], ["x"])
