"""capture(): running means, per-prompt activations, padding, the generated position, progress, hook hygiene."""

from __future__ import annotations

import pytest
import torch
from tiny import HARMFUL, HARMLESS, tiny_lm

from abliterate import ablate, capture, directions, induce

FAMILIES = ["llama", "gpt2"]  # rotary (relative) and learned absolute positions


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    return tiny_lm(request.param)


def manual(lm, prompts, positions, *, gen=False):
    """Per-prompt residuals without padding: ``[n, points, positions, hidden]`` in float64.

    Points ``0..L-1`` come from ``output_hidden_states`` (the input of each layer), point ``L`` from a
    forward hook on the last decoder layer. With ``gen`` the greedy next token is appended first and
    only the last position is read.
    """
    model, last = lm.model, lm.anatomy.layers[-1]
    rows = []
    for text in lm.format(prompts):
        ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            if gen:
                nxt = model(input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            seen = []
            handle = last.register_forward_hook(
                lambda _m, _a, out, seen=seen: seen.append(out if isinstance(out, torch.Tensor) else out[0])
            )
            try:
                hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            finally:
                handle.remove()
        points = [*hs[: lm.num_layers], seen[0]]
        pos = [-1] if gen else positions
        rows.append(torch.stack([torch.stack([h[0, p] for p in pos]) for h in points]).double())
    return torch.stack(rows)


def test_means_equal_per_prompt_and_manual(lm):
    harmful = HARMFUL[:5]  # unequal set sizes, so each mean must divide by its own count
    acts = capture(lm, harmful, HARMLESS, positions=[-3, -1], batch_size=4, keep_per_prompt=True)
    assert acts.harmful_mean.dtype == torch.float64
    n_points = lm.num_layers + 1
    assert acts.harmful_mean.shape == (n_points, 2, lm.hidden_size)
    assert acts.harmful.shape == (len(harmful), n_points, 2, lm.hidden_size)
    assert acts.harmless.shape == (len(HARMLESS), n_points, 2, lm.hidden_size)
    assert acts.positions == [-3, -1]
    for kept, mean, prompts in (
        (acts.harmful, acts.harmful_mean, harmful),
        (acts.harmless, acts.harmless_mean, HARMLESS),
    ):
        # the float64 running mean equals the mean of the kept per-prompt activations
        assert torch.allclose(kept.double().mean(0), mean, atol=1e-6)
        # both equal an unpadded, one-prompt-at-a-time computation (so per-prompt rows keep their order)
        ref = manual(lm, prompts, [-3, -1])
        assert torch.allclose(kept.double(), ref, atol=1e-5), (kept.double() - ref).abs().max()
        assert torch.allclose(mean, ref.mean(0), atol=1e-5)
    # the last point is the raw last-layer output, not the final-normed hidden state
    assert not torch.allclose(acts.harmful_mean[-1], acts.harmful_mean[-2], atol=1e-3)


def test_batch_size_invariance(lm):
    """Left padding (batch 4 mixes prompt lengths) must not change anything, also for absolute positions."""
    one = capture(lm, HARMFUL, HARMLESS, positions=[-4, -1, "gen"], batch_size=1)
    four = capture(lm, HARMFUL, HARMLESS, positions=[-4, -1, "gen"], batch_size=4)
    lengths = {len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in lm.format(HARMFUL[:4])}
    assert len(lengths) > 1, "the first batch must need padding for this test to mean anything"
    assert (one.harmful_mean - four.harmful_mean).abs().max() < 1e-5
    assert (one.harmless_mean - four.harmless_mean).abs().max() < 1e-5


def test_generated_position_matches_manual(lm):
    acts = capture(lm, HARMFUL, HARMLESS, positions=["gen", -1], batch_size=4, keep_per_prompt=True)
    assert acts.positions == [-1, "gen"], "'gen' is stored last"
    gen = acts.position_index("gen")
    for kept, prompts in ((acts.harmful, HARMFUL), (acts.harmless, HARMLESS)):
        ref = manual(lm, prompts, [], gen=True)[:, :, 0]
        assert torch.allclose(kept[:, :, gen].double(), ref, atol=1e-5), (kept[:, :, gen].double() - ref).abs().max()
        # and it is not just the last prompt token again
        assert not torch.allclose(kept[:, :, gen], kept[:, :, acts.position_index(-1)], atol=1e-3)


def test_generated_position_alone(lm):
    both = capture(lm, HARMFUL, HARMLESS, positions=[-1, "gen"], batch_size=3)
    alone = capture(lm, HARMFUL, HARMLESS, positions=["gen"], batch_size=3)
    assert alone.positions == ["gen"]
    assert torch.allclose(alone.harmful_mean[:, 0], both.harmful_mean[:, 1], atol=1e-6)
    assert torch.allclose(alone.harmless_mean[:, 0], both.harmless_mean[:, 1], atol=1e-6)


def test_progress_counts_up_to_total():
    lm = tiny_lm("llama")
    calls = []
    harmful, harmless = HARMFUL[:5], HARMLESS
    capture(lm, harmful, harmless, batch_size=2, progress=lambda done, total: calls.append((done, total)))
    total = len(harmful) + len(harmless)
    assert len(calls) == 3 + 3  # ceil(5/2) + ceil(6/2) batches
    assert all(t == total for _, t in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done) and len(set(done)) == len(done), done
    assert done[0] > 0 and done[-1] == total
    assert len(harmful) in done, "the harmful set finishes before the harmless one starts"


def hook_state(model):
    return {name: (list(m._forward_hooks), list(m._forward_pre_hooks)) for name, m in model.named_modules()}


def ours(model, before):
    """Hooks present now that were not there before (transformers adds its own recorders once)."""
    now = hook_state(model)
    return {n: h for n, h in now.items() if h != before[n]}


def logits(lm):
    batch = lm.encode(lm.format(HARMLESS[:3]))
    with torch.inference_mode():
        return lm.model(**batch).logits


@pytest.fixture(scope="module")
def warm():
    lm = tiny_lm("qwen2_moe")
    acts = capture(lm, HARMFUL, HARMLESS, positions=[-1])
    r = directions.mean_diff(acts)[1]
    # transformers registers its output recorders on the first output_hidden_states call; do it now
    with torch.inference_mode():
        lm.model(**lm.encode(["warm up"]), output_hidden_states=True)
    return lm, acts, r


def test_hooks_removed_after_capture(warm):
    lm, _, _ = warm
    before, base = hook_state(lm.model), logits(lm)
    capture(lm, HARMFUL[:2], HARMLESS[:2], positions=[-1, "gen"])
    assert not ours(lm.model, before)
    for layer in lm.anatomy.layers:
        assert not layer._forward_pre_hooks
    assert torch.equal(logits(lm), base)


def test_hooks_removed_when_progress_raises(warm):
    lm, _, _ = warm
    before = hook_state(lm.model)

    def boom(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        capture(lm, HARMFUL, HARMLESS, progress=boom)
    assert not ours(lm.model, before)


@pytest.mark.parametrize("kind", ["ablate", "induce"])
def test_hooks_removed_after_exception_in_block(warm, kind):
    lm, acts, r = warm
    before, base = hook_state(lm.model), logits(lm)
    ctx = ablate(lm, r) if kind == "ablate" else induce(lm, r, acts, layers=range(lm.num_layers))
    with pytest.raises(RuntimeError, match="inside"), ctx as hooks:
        assert len(hooks) > 0
        assert ours(lm.model, before), "hooks must be active inside the block"
        assert not torch.allclose(logits(lm), base, atol=1e-4)
        raise RuntimeError("failure inside the block")
    assert not ours(lm.model, before)
    writers = lm.anatomy.all_writers() + lm.anatomy.embeddings
    assert all(not w.module._forward_hooks for w in writers)
    assert all(not layer._forward_pre_hooks for layer in lm.anatomy.layers)
    assert torch.equal(logits(lm), base)
