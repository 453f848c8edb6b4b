"""Writes that pass something other than a norm before the residual: a per-channel causal filter (Inkling's depthwise
short convolution plus its skip) after every attention and MLP, and a norm inside the token-embedding module. The
edit removes from each writer every tap-scaled copy of the direction, so nothing reaches the residual along it at any
position; runtime hooks act where the weights do (the embedding's hook: on the inner norm's input, the rows)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from registry import tiny_registry_model
from torch import nn

from abliterate import LoadedModel, ablate, orthogonalize
from abliterate.arch.projection import filter_taps
from abliterate.arch.selfcheck import checked_anatomy
from abliterate.arch.verify import forward
from abliterate.checkpoint.stream_edit import stream_orthogonalize
from abliterate.edit.direction_edit import edit_plan
from abliterate.ops.hooks import HookSet
from abliterate.outputs.adapter import AdapterError

HIDDEN, K = 6, 3
needs_inkling = pytest.mark.skipif(
    "inkling_text" not in transformers.CONFIG_MAPPING, reason="this transformers has no Inkling"
)


class ConvSkip(nn.Module):
    """``x + depthwise_causal_conv(x)``, as Inkling's short convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(HIDDEN, HIDDEN, K, groups=HIDDEN, padding=K - 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1d(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
        return x + y


def test_filter_taps_reads_a_depthwise_causal_filter():
    torch.manual_seed(0)
    module = ConvSkip().double()
    taps = filter_taps(module, HIDDEN)
    assert taps is not None and taps.shape == (K, HIDDEN)
    w = module.conv1d.weight[:, 0].detach()  # [hidden, K]; lag d multiplies x(t - d) by w[:, K - 1 - d]
    torch.testing.assert_close(taps[0].double(), 1 + w[:, K - 1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(taps[1].double(), w[:, K - 2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(taps[2].double(), w[:, 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "module",
    [
        nn.RMSNorm(HIDDEN),  # not linear
        nn.Sequential(ConvSkip(), nn.SiLU()),  # not linear
        nn.Linear(HIDDEN, HIDDEN),  # mixes channels
    ],
)
def test_filter_taps_refuses_what_is_no_such_filter(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    assert filter_taps(module, HIDDEN) is None


def _inkling():
    model = tiny_registry_model("inkling_text")
    return model, LoadedModel(model, None, checked_anatomy(model), "inkling")


def _unit(hidden: int) -> torch.Tensor:
    return nn.functional.normalize(torch.randn(hidden, generator=torch.Generator().manual_seed(5)), dim=0)


@needs_inkling
def test_inkling_writers_through_filters_and_the_inner_embedding_norm():
    model, lm = _inkling()
    emb = lm.anatomy.embeddings[0]
    assert emb.hook_input and emb.hook_module is model.model.embed_tokens.embed_norm
    convs = {type(w.post_norm).__name__ for w in lm.anatomy.all_writers()}
    assert convs == {"InklingShortConvolution"}
    u = _unit(lm.hidden_size)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    seen: list[torch.Tensor] = []
    with HookSet() as watch, torch.no_grad():
        for layer in lm.anatomy.layers:
            watch.watch_input(layer, lambda x: seen.append(x.float()))
            watch.watch_output(layer, lambda x: seen.append(x.float()))
        with ablate(lm, u):
            runtime = forward(model, ids).logits
    assert max(float((h @ u).abs().max() / h.norm(dim=-1).max()) for h in seen) < 1e-5
    edited = copy.deepcopy(model)
    orthogonalize(LoadedModel(edited, None, checked_anatomy(edited), "inkling"), u)
    with torch.no_grad():
        assert float((forward(edited, ids).logits - runtime).abs().max()) < 1e-4


@needs_inkling
def test_stream_edit_of_an_inkling_checkpoint_equals_the_in_memory_edit(tmp_path):
    model, lm = _inkling()
    model.save_pretrained(tmp_path / "src")
    u = _unit(lm.hidden_size)
    stream_orthogonalize(tmp_path / "src", tmp_path / "out", u)
    orthogonalize(lm, u)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    state = reloaded.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@needs_inkling
def test_an_adapter_of_an_embedding_with_an_inner_norm_is_refused(tmp_path):
    pytest.importorskip("peft")
    from abliterate.outputs.adapter import export_adapter

    _, lm = _inkling()
    plan = edit_plan(lm, _unit(lm.hidden_size), None, 1.0, True, None)
    with pytest.raises(AdapterError, match="normalizes its lookup inside the module"):
        export_adapter(lm, plan, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("model_type", ["inkling_text", "bloom"])
def test_bake_induction_refuses_embeddings_that_pass_a_norm(model_type):
    """A constant added to the rows does not pin the component after a norm (Inkling's inner RMSNorm, BLOOM's
    embedding LayerNorm): refused before anything is edited, instead of saving an induction that is off."""
    from abliterate import ArchitectureError, bake_induction

    if model_type not in transformers.CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {model_type}")
    model = tiny_registry_model(model_type)
    lm = LoadedModel(model, None, checked_anatomy(model), model_type)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ArchitectureError, match="embeddings pass a norm before the residual"):
        bake_induction(lm, _unit(lm.hidden_size), 3.0, through_layer=1)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@needs_inkling
def test_a_nonlinear_transform_after_a_writer_is_refused_for_weights_and_served_at_run_time():
    """A tanh after the short convolution is neither a norm nor a linear filter: no weight edit, one line naming the
    runtime path, which then loads (and says why weights would not do)."""
    from abliterate import ArchitectureError

    class Squashed(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
            return torch.tanh(self.inner(x, **kwargs))

    model = tiny_registry_model("inkling_text")
    for layer in model.model.layers:
        layer.attn_sconv = Squashed(layer.attn_sconv)
    with pytest.raises(ArchitectureError, match=r"neither a norm nor a per-channel causal .*residual_only"):
        checked_anatomy(model)
    anatomy = checked_anatomy(model, residual_only=True)
    assert anatomy.residual_only and "neither a norm nor a per-channel" in (anatomy.weight_error or "")
