"""The direction API (``ablate``, ``orthogonalize``, ``stream_orthogonalize``) is a :class:`DirectionEdit` planned and
applied by the one edit path: each old-style call gives bit-identical logits / weights / files to the equivalent spec
call (a :class:`DirectionEdit`, or the classic :class:`EditSpec`), and to the writer-by-writer edit it replaced."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_residual_stream import post_ln_opt
from tiny import HARMFUL, HARMLESS, tiny_lm, tiny_tokenizer

from abliterate import AbliterateError, ablate, capture, orthogonalize
from abliterate.arch.projection import hook_writer, writer_fn
from abliterate.arch.streams import residual_hooks
from abliterate.checkpoint.stream_edit import stream_edit, stream_orthogonalize
from abliterate.edit import weights as weights_mod
from abliterate.edit.direction_edit import DirectionEdit
from abliterate.edit.plan import Directions, applied, apply_plan
from abliterate.edit.spec import EditSpec
from abliterate.lm import from_pretrained_objects
from abliterate.measure.directions import as_basis, mean_diff
from abliterate.ops.hooks import HookSet
from abliterate.ops.kernel import project_out, project_tensor

IDS = torch.tensor([[5, 17, 33, 90, 100, 7, 250]])
# (layers, scale, embeddings, embedding_scale): all layers; a per-layer map with a partial embedding edit; one layer
CALLS = [
    (None, 1.0, None, None),
    (None, {0: 0.5, 2: 1.3}, True, 0.4),
    ([1], 0.8, False, None),
]


def direction(hidden: int, k: int = 1, seed: int = 3) -> torch.Tensor:
    v = torch.randn(k, hidden, generator=torch.Generator().manual_seed(seed))
    return (v / v.norm(dim=-1, keepdim=True)).squeeze(0)


def logits(lm) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(IDS).logits


def params(lm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.model.named_parameters(remove_duplicate=False)}


def clone(lm):
    return from_pretrained_objects(copy.deepcopy(lm.model), lm.tokenizer, source=lm.source)


def old_orthogonalize(lm, basis, layers, scale, embeddings, embedding_scale, norm_preserving=False) -> None:
    """The edit as ``orthogonalize`` made it before the one path: writer by writer, in place."""
    plan = DirectionEdit(basis, layers, scale, embeddings, embedding_scale).plan(lm)
    if any(e.writer.layer is None for e in plan.edits) and lm.model.get_output_embeddings() is not None:
        out = lm.model.get_output_embeddings()
        if out.weight is lm.model.get_input_embeddings().weight:
            out.weight = torch.nn.Parameter(out.weight.detach().clone(), requires_grad=False)
    with torch.no_grad():
        for e in plan.edits:
            project_tensor(e.writer.weight.data, e.writer.out_axis, e.basis, e.scale, norm_preserving)
            if e.writer.bias is not None:
                e.writer.bias_tensor.data.copy_(project_out(e.writer.bias_tensor.data, e.basis, e.scale))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "qwen2_moe"])
@pytest.mark.parametrize("call", CALLS, ids=["all", "map", "one"])
def test_ablate_equals_its_direction_edit_and_the_old_hooks(family, call):
    lm = tiny_lm(family)
    layers, scale, embeddings, embedding_scale = call
    u = direction(lm.hidden_size, k=2)
    with ablate(lm, u, layers=layers, scale=scale, embeddings=embeddings, embedding_scale=embedding_scale) as hooks:
        assert isinstance(hooks, HookSet) and len(hooks) > 0
        old_style = logits(lm)
    edit = DirectionEdit(u, layers, scale, embeddings, embedding_scale)
    with applied(lm, edit, mode="hooks"):
        spec_style = logits(lm)
    with HookSet() as hooks:  # the hooks ablate added itself before the one path
        for e in edit.plan(lm).edits:
            hook_writer(hooks, e.writer, writer_fn(e.writer, e.basis, e.scale))
        by_hand = logits(lm)
    assert torch.equal(old_style, spec_style) and torch.equal(old_style, by_hand)
    assert not torch.equal(old_style, logits(lm)), "the edit changes the logits"


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_ablate_equals_the_classic_spec(family):
    lm = tiny_lm(family)
    acts = capture(lm, HARMFUL, HARMLESS, positions=[-1], batch_size=4)
    with ablate(lm, mean_diff(acts)[2, -1]):
        old_style = logits(lm)
    with applied(lm, EditSpec.full(2), Directions(acts), mode="hooks"):
        spec_style = logits(lm)
    assert torch.equal(old_style, spec_style)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "qwen2_moe", "phi3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("call", CALLS, ids=["all", "map", "one"])
def test_orthogonalize_equals_its_direction_edit_and_the_old_edit(family, dtype, call):
    lm = tiny_lm(family)
    lm.model.to(dtype)
    layers, scale, embeddings, embedding_scale = call
    u = direction(lm.hidden_size, k=2)
    norm_preserving = dtype == torch.float32
    old = clone(lm)
    old_orthogonalize(old, as_basis(u, lm.hidden_size), layers, scale, embeddings, embedding_scale, norm_preserving)
    new = clone(lm)
    report = orthogonalize(
        new,
        u,
        layers=layers,
        scale=scale,
        embeddings=embeddings,
        embedding_scale=embedding_scale,
        norm_preserving=norm_preserving,
    )
    edit = DirectionEdit(u, layers, scale, embeddings, embedding_scale, norm_preserving)
    want = params(old)
    assert params(new).keys() == want.keys()
    assert all(torch.equal(t, want[n]) for n, t in params(new).items())
    tied = lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight
    edits_embeddings = embeddings or (embeddings is None and layers is None)
    assert report.untied == (tied and bool(edits_embeddings))
    assert new.model.config.tie_word_embeddings is not report.untied or not tied
    plan = edit.plan(lm)
    assert len(report.edited) == len(plan.edits) + sum(e.writer.bias is not None for e in plan.edits)
    with applied(lm, edit, mode="weights") as handle:
        assert all(torch.equal(t, want[n]) for n, t in params(lm).items())
        assert handle.edited == report.edited and handle.untied == report.untied
    assert torch.equal(logits(lm), logits(clone(lm)))


def test_a_permanent_plan_edits_in_place_and_keeps_nothing():
    lm = tiny_lm("llama")
    plan = DirectionEdit(direction(lm.hidden_size)).plan(lm)
    ptrs = {n: p.data_ptr() for n, p in lm.model.named_parameters()}
    handle = apply_plan(lm, plan, "weights", permanent=True)
    assert not handle.active, "nothing to revert"
    assert handle.untied and lm.model.config.tie_word_embeddings is False
    after = {n: p.data_ptr() for n, p in lm.model.named_parameters()}
    assert after.pop("lm_head.weight") not in ptrs.values(), "the LM head keeps its own copy of the embeddings"
    assert after == ptrs, "edited in place, no copies"
    assert "lm_head.weight" not in handle.edited and "model.embed_tokens.weight" in handle.edited
    with pytest.raises(AbliterateError, match="permanent edit changes the weights; use mode='weights'"):
        apply_plan(lm, plan, "hooks", permanent=True)


def test_residual_only_ablate_is_the_residual_plan():
    lm = from_pretrained_objects(post_ln_opt(), tiny_tokenizer(), residual_only=True)
    u = direction(lm.hidden_size)
    with ablate(lm, u, scale={1: 0.5}, embeddings=True, embedding_scale=0.3):
        old_style = logits(lm)
    plan = DirectionEdit(u, None, {1: 0.5}, True, 0.3).plan(lm, residual=True)
    assert plan.edits == [] and plan.residual is not None
    handle = apply_plan(lm, plan)  # "auto" runs a residual plan as hooks
    assert handle.mode == "hooks"
    spec_style = logits(lm)
    handle.revert()
    with HookSet() as hooks:  # what ablate did on such a load before the one path
        residual_hooks(hooks, lm.anatomy.layers, as_basis(u, lm.hidden_size), lm.hidden_size, {1: 0.5}, 0.3)
        by_hand = logits(lm)
    assert torch.equal(old_style, spec_style) and torch.equal(old_style, by_hand)
    with pytest.raises(AbliterateError, match="loaded with residual_only=True"):
        apply_plan(lm, plan, "weights")


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stream_orthogonalize_equals_stream_edit_of_its_direction_edit_and_the_classic_spec(family, tmp_path):
    lm = tiny_lm(family)
    acts = capture(lm, HARMFUL, HARMLESS, positions=[-1], batch_size=4)
    src = tmp_path / "src"
    lm.model.save_pretrained(src)
    lm.tokenizer.save_pretrained(src)
    d = mean_diff(acts)[2, -1]
    stream_orthogonalize(src, tmp_path / "old", d)
    stream_edit(src, tmp_path / "edit", DirectionEdit(d))
    stream_edit(src, tmp_path / "spec", EditSpec.full(2), Directions(acts))
    old = _files(tmp_path / "old")
    assert old == _files(tmp_path / "edit") == _files(tmp_path / "spec")
    layers, scale = [0, 2], {0: 0.5, 2: 1.2}
    stream_orthogonalize(src, tmp_path / "old2", d, layers=layers, scale=scale, embeddings=True, norm_preserving=True)
    stream_edit(src, tmp_path / "edit2", DirectionEdit(d, layers, scale, True, None, True))
    assert _files(tmp_path / "old2") == _files(tmp_path / "edit2") != old
    mem = clone(lm)
    orthogonalize(mem, d)
    with safe_open(str(tmp_path / "old" / "model.safetensors"), "pt") as fh:
        streamed = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    state = mem.model.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in streamed.items())


def test_the_kernel_has_one_home():
    assert not hasattr(weights_mod, "project_tensor") and not hasattr(weights_mod, "work_buffer")
