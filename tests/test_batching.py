"""Sharing the chat-template prefix gives the same numbers as plain left-padded batches."""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, HARMFUL, HARMLESS, tiny_lm

from abliterate import ablate, capture, directions
from abliterate.measure.batching import BatchRunner
from abliterate.measure.first_token import first_token_logprobs

SYSTEM = "You are a careful assistant who answers briefly."


@pytest.mark.parametrize("family", list(FAMILIES))
def test_shared_prefix_matches_plain_batches(family):
    lm = tiny_lm(family)
    runner = BatchRunner(lm, lm.format(HARMFUL, system=SYSTEM), 4)
    assert runner.prefix_len > 20, "the system prompt and user header are shared"
    plain = capture(lm, HARMFUL, HARMLESS, positions=[-3, -1, "gen"], system=SYSTEM, batch_size=4, share_prefix=False)
    shared = capture(lm, HARMFUL, HARMLESS, positions=[-3, -1, "gen"], system=SYSTEM, batch_size=4)
    assert torch.allclose(plain.harmful_mean, shared.harmful_mean, atol=1e-4)
    assert torch.allclose(plain.harmless_mean, shared.harmless_mean, atol=1e-4)
    r = directions.mean_diff(plain)[1, -1]
    with ablate(lm, r):
        a = first_token_logprobs(lm, HARMLESS, system=SYSTEM, batch_size=4, share_prefix=False)
        b = first_token_logprobs(lm, HARMLESS, system=SYSTEM, batch_size=4)
    assert (a - b).abs().max() < 1e-4


def test_prefix_is_not_shared_when_it_would_swallow_positions():
    lm = tiny_lm("llama")
    texts = lm.format(["a", "b"])
    runner = BatchRunner(lm, texts, 2, min_suffix=len(lm.tokenizer(texts[0])["input_ids"]))
    assert runner.prefix_len == 0
    assert BatchRunner(lm, texts[:1], 2).prefix_len == 0, "a single prompt shares nothing"
