"""Constant writers (a LayerNorm's bias on the embeddings, biases added outside any Linear) and LayerNorm post-norms:
hooks equal weights at partial scales, the streaming edit equals the in-memory one, PEFT refuses them in one line."""

from __future__ import annotations

import copy

import pytest
import torch
from registry import tiny_registry_model
from torch import nn
from transformers import AutoModelForCausalLM

from abliterate import LoadedModel, orthogonalize
from abliterate.arch.projection import norm_gain
from abliterate.arch.selfcheck import checked_anatomy
from abliterate.checkpoint.stream_edit import stream_orthogonalize
from abliterate.edit import apply_plan
from abliterate.edit.direction_edit import edit_plan
from abliterate.outputs.adapter import AdapterError, export_adapter

IDS = torch.tensor([[5, 17, 33, 90, 100, 7, 120]])
# BLOOM: LayerNorm on the embeddings; GPT-NeoX-Japanese: attention dense_bias; JetMoE: MoE and attention biases
TYPES = ["bloom", "gpt_neox_japanese", "jetmoe"]


def loaded(model_type: str) -> LoadedModel:
    model = tiny_registry_model(model_type)
    return LoadedModel(model, None, checked_anatomy(model), model_type)


def basis(hidden: int, k: int = 2) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(hidden, k, generator=torch.Generator().manual_seed(3)))
    return q.T.contiguous()


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS, use_cache=False).logits.float()


@pytest.mark.parametrize("model_type", TYPES)
def test_constant_writers_are_found(model_type):
    lm = loaded(model_type)
    constant = [w for w in [*lm.anatomy.embeddings, *lm.anatomy.all_writers()] if w.is_bias]
    assert constant, "the pattern tables must name the constant writers"
    assert all(w.weight.shape == (lm.hidden_size,) for w in constant)


@pytest.mark.parametrize("model_type", TYPES)
def test_hooks_equal_weights_at_partial_scales(model_type):
    """Runtime hooks subtract a constant writer's scaled component only (its module's output carries other writes,
    already edited by their own hooks), so partial scales still match the weight edit."""
    lm = loaded(model_type)
    plan = edit_plan(lm, basis(lm.hidden_size), None, {0: 0.5, 1: 0.8}, True, 0.3)
    base = logits(lm.model)
    with torch.no_grad():
        hooks = apply_plan(lm, plan, "hooks")
        via_hooks = logits(lm.model)
        hooks.revert()
        weights = apply_plan(lm, plan, "weights")
        via_weights = logits(lm.model)
        weights.revert()
    assert (via_hooks - base).abs().max() > 1e-3
    assert (via_hooks - via_weights).abs().max() < 1e-5
    assert torch.equal(logits(lm.model), base), "revert must restore the model exactly"


def test_stream_edits_the_embedding_layernorm(tmp_path):
    """The streaming edit (meta-device anatomy, no probe) edits BLOOM's embeddings through their LayerNorm and the
    LayerNorm's bias, as the in-memory edit does."""
    lm = loaded("bloom")
    lm.model.save_pretrained(tmp_path / "src")
    r = basis(lm.hidden_size, 1)[0]
    stream_orthogonalize(tmp_path / "src", tmp_path / "out", r)
    edited = copy.deepcopy(lm.model)
    orthogonalize(LoadedModel(edited, None, checked_anatomy(edited), "bloom"), r)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert (logits(streamed) - logits(edited)).abs().max() < 1e-5
    assert (logits(streamed) - logits(lm.model)).abs().max() > 1e-3
    seen: list[torch.Tensor] = []
    handle = streamed.transformer.word_embeddings_layernorm.register_forward_hook(lambda _m, _a, out: seen.append(out))
    logits(streamed)
    handle.remove()
    assert float((seen[0] @ r).abs().max()) < 1e-5, "the normalized embeddings must have no component along r"


@pytest.mark.parametrize("hidden", [16, 15])
def test_norm_gain_tells_layernorm_from_rmsnorm(hidden):
    gen = torch.Generator().manual_seed(0)
    ln = nn.LayerNorm(hidden)
    rms = nn.RMSNorm(hidden)
    with torch.no_grad():
        for norm in (ln, rms):
            norm.weight.copy_(1 + 0.5 * torch.randn(hidden, generator=gen))
        ln.bias.copy_(torch.randn(hidden, generator=gen))
    gain, centered = norm_gain(ln, hidden)
    assert centered and torch.allclose(gain, ln.weight, atol=1e-4)
    gain, centered = norm_gain(rms, hidden)
    assert not centered and torch.allclose(gain, rms.weight, atol=1e-4)


def test_adapter_refuses_a_constant_writer(tmp_path):
    lm = loaded("jetmoe")
    plan = edit_plan(lm, basis(lm.hidden_size, 1), None, 1.0, False, None)
    with pytest.raises(AdapterError, match=r"mlp\.bias is a bias added to the residual outside any Linear") as err:
        export_adapter(lm, plan, tmp_path / "adapter")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "adapter").exists()
