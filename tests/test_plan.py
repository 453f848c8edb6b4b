"""Reversible edit plans: exact revert on every family (fp32 and bf16), weights == hooks, the classic spec ==
``orthogonalize``, failure part-way, offloaded models, and how specs turn into per-writer bases and scales."""

from __future__ import annotations

import ast
import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny import FAMILIES, HARMFUL, HARMLESS, tiny_lm

from abliterate import capture, load_model, orthogonalize
from abliterate.edit import plan as plan_mod
from abliterate.edit.plan import Directions, EditPlan, WriterEdit, applied, apply_plan, build_plan, release_buffers
from abliterate.edit.spec import EditSpec, Kernel
from abliterate.errors import AbliterateError
from abliterate.lm.loading import from_pretrained_objects
from abliterate.measure.directions import DirectionSet, as_basis, compute, mean_diff, unit

ALL = list(FAMILIES)
FUSED = ["qwen2_moe", "mixtral", "qwen3_moe"]  # MoE experts as one 3-D parameter

# A nontrivial spec: interpolated direction, a 2-D subspace, different kernels per component, embeddings on.
RICH = EditSpec(
    direction_index=1.4,
    k=2,
    attn=Kernel(peak=1.0, max_weight=1.3, edge_weight=0.4, width=1.5),
    mlp=Kernel(peak=0.5, max_weight=0.9, edge_weight=0.2, width=2.0),
    embedding=0.7,
    position=-2,
)


def logits(lm, prompts=HARMLESS[:3]):
    batch = lm.encode(lm.format(prompts))
    with torch.inference_mode():
        return lm.model(**batch).logits.float()


def snapshot(lm):
    """Every parameter and buffer: the object, its data pointer and a copy of its values."""
    tensors = [*lm.model.named_parameters(remove_duplicate=False), *lm.model.named_buffers()]
    return {name: (t, t.data_ptr(), t.detach().clone()) for name, t in tensors}


def assert_restored(lm, before, tied_before):
    after = {name: t for name, t in [*lm.model.named_parameters(remove_duplicate=False), *lm.model.named_buffers()]}
    assert after.keys() == before.keys()
    for name, (obj, ptr, values) in before.items():
        assert after[name] is obj and obj.data_ptr() == ptr, f"{name} was replaced"
        assert torch.equal(obj, values), f"{name} differs after revert"
    out, emb = lm.model.get_output_embeddings(), lm.model.get_input_embeddings()
    assert (out.weight is emb.weight) == tied_before
    assert lm.model.config.tie_word_embeddings == tied_before or not tied_before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules()), "hooks left behind"


@pytest.fixture(scope="module", params=ALL)
def setup(request):
    lm = tiny_lm(request.param)
    acts = capture(lm, HARMFUL, HARMLESS, positions=[-2, -1], batch_size=4)
    return lm, Directions(acts), acts


@pytest.fixture(scope="module")
def llama():
    lm = tiny_lm("llama")
    acts = capture(lm, HARMFUL, HARMLESS, positions=[-2, -1], batch_size=4)
    return lm, Directions(acts), acts


def clone(lm):
    return from_pretrained_objects(copy.deepcopy(lm.model), lm.tokenizer, source=lm.source)


@pytest.mark.parametrize(("dtype", "norm_preserving"), [(torch.float32, True), (torch.bfloat16, False)])
def test_revert_is_bit_identical(setup, dtype, norm_preserving):
    base_lm, source, _ = setup
    lm = clone(base_lm)
    lm.model.to(dtype)
    tied = lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight
    before, base = snapshot(lm), logits(lm)
    spec = replace(RICH, norm_preserving=norm_preserving)
    for _ in range(2):  # the second round reuses the first round's scratch tensors
        with applied(lm, spec, source) as handle:
            assert handle.mode == "weights" and handle.active
            assert lm.model.config.tie_word_embeddings is False or not tied
            edited = logits(lm)
            if tied:
                assert lm.model.get_output_embeddings().weight is not lm.model.get_input_embeddings().weight
        assert (edited - base).abs().max() > 1e-2, "the edit must change the model"
        assert not handle.active
        assert_restored(lm, before, tied)
        handle.revert()  # idempotent
        assert_restored(lm, before, tied)
    assert torch.equal(logits(lm), base)
    release_buffers(lm)


def weights_vs_hooks(lm, spec, source, generate: bool) -> None:
    base = logits(lm)
    with applied(lm, spec, source, mode="weights"):
        by_weights = logits(lm)
        generated_w = lm.generate(HARMFUL[:2], max_new_tokens=5) if generate else None
    with applied(lm, spec, source, mode="hooks") as handle:
        assert handle.mode == "hooks" and len(handle.hooks) > 0
        by_hooks = logits(lm)
        generated_h = lm.generate(HARMFUL[:2], max_new_tokens=5) if generate else None
    assert (by_weights - base).abs().max() > 1e-2
    assert (by_weights - by_hooks).abs().max() < 1e-4
    assert generated_w == generated_h
    assert torch.equal(logits(lm), base)


def test_weights_equal_hooks(setup):
    lm, source, _ = setup
    weights_vs_hooks(lm, RICH, source, generate=lm.source in ("tiny-llama", "tiny-gpt2", "tiny-qwen2_moe"))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "mixtral"])
def test_own_layer_directions_weights_equal_hooks(family):
    lm = tiny_lm(family)
    source = Directions(capture(lm, HARMFUL, HARMLESS, positions=[-1], batch_size=6))
    weights_vs_hooks(lm, EditSpec(attn=Kernel(0.0, 1.0, 1.0, 5.0), embedding=1.0), source, generate=False)


def test_norm_preserving_hooks_equal_the_weight_edit(setup):
    lm, source, _ = setup
    spec = replace(RICH, norm_preserving=True)
    plain = RICH
    before, base = snapshot(lm), logits(lm)
    with applied(lm, spec, source, mode="weights"):
        by_weights = logits(lm)
    with applied(lm, plain, source, mode="weights"):
        assert (logits(lm) - by_weights).abs().max() > 1e-3, "norm preservation must make a difference"
    if lm.source.removeprefix("tiny-") in FUSED:
        with pytest.raises(AbliterateError) as exc:
            apply_plan(lm, build_plan(lm, spec, source), mode="hooks")
        msg = str(exc.value)
        assert "\n" not in msg and "fused experts" in msg and "norm_preserving=False" in msg
    else:
        with applied(lm, spec, source, mode="hooks"):
            assert (logits(lm) - by_weights).abs().max() < 1e-4
    assert_restored(lm, before, lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight)
    assert torch.equal(logits(lm), base)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "qwen2_moe", "phi3"])
@pytest.mark.parametrize(
    ("method", "position", "norm_preserving", "dtype"),
    [
        ("mean_diff", -1, False, torch.float32),
        ("projected", -2, True, torch.float32),
        ("slerp", -1, False, torch.bfloat16),
        ("mean_diff", -2, True, torch.bfloat16),
    ],
)
def test_full_spec_equals_orthogonalize(family, method, position, norm_preserving, dtype):
    lm = tiny_lm(family)
    acts = capture(lm, HARMFUL, HARMLESS, positions=[-2, -1], batch_size=4)
    layer = 2
    direction = compute(acts, method, **({"t": 0.5} if method == "slerp" else {}))[layer, position]
    lm.model.to(dtype)
    want = clone(lm)
    orthogonalize(want, direction, norm_preserving=norm_preserving)
    spec = EditSpec.full(layer, method, position, slerp_t=0.5, norm_preserving=norm_preserving)
    with applied(lm, spec, Directions(acts), mode="weights"):
        got = dict(lm.model.named_parameters(remove_duplicate=False))
        expected = dict(want.model.named_parameters(remove_duplicate=False))
        assert got.keys() == expected.keys()
        for name, t in expected.items():
            assert torch.equal(got[name], t), name
        assert lm.model.config.tie_word_embeddings == want.model.config.tie_word_embeddings


def test_failure_part_way_reverts_everything(setup, monkeypatch):
    lm, source, _ = setup
    before = snapshot(lm)
    tied = lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight
    real, calls = plan_mod.project_tensor, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated failure in the fourth writer")
        return real(*args, **kwargs)

    monkeypatch.setattr(plan_mod, "project_tensor", flaky)
    with pytest.raises(RuntimeError, match="fourth writer"):
        apply_plan(lm, build_plan(lm, RICH, source), mode="weights")
    assert len(calls) == 4
    assert_restored(lm, before, tied)


def test_directions_interpolate_and_span(llama):
    lm, source, acts = llama
    units = mean_diff(acts).vectors[:, acts.position_index(-2)].float()
    u = [unit(v) for v in units]
    spec = EditSpec(position=-2)
    classic = as_basis(mean_diff(acts)[2, -2], lm.hidden_size)  # what orthogonalize(lm, ds[2, -2]) removes
    assert torch.equal(source.basis(EditSpec(position=-2, direction_index=2.0), 0), classic)
    b = source.basis(EditSpec(position=-2, direction_index=1.25), 5)
    want = unit(0.75 * u[1] + 0.25 * u[2])
    assert b.shape == (1, lm.hidden_size) and torch.allclose(b[0], want, atol=1e-6)
    # own direction: layer i's writers take point i + 1, the embeddings share layer 0's
    assert torch.allclose(source.basis(spec, 1)[0], u[2], atol=1e-6)
    assert torch.allclose(source.basis(spec, None)[0], u[1], atol=1e-6)
    # k = 2 around 1.25: the direction and point 1 (the nearest) span points 1 and 2. k = 3 skips point 2 (in
    # that span) and point 0 (zero: the raw embedding of a chat-template token is the same for every prompt)
    assert u[0].norm() == 0
    b2 = source.basis(EditSpec(position=-2, direction_index=1.25, k=2), 0)
    b3 = source.basis(EditSpec(position=-2, direction_index=1.25, k=3), 0)
    assert torch.allclose(b3 @ b3.T, torch.eye(3), atol=1e-5) and torch.equal(b3[:2], b2)
    assert rank(b2, u[1], u[2]) == 2 and rank(b3, u[1], u[2], u[3]) == 3
    # k = 2 at an integer point: its own direction and the nearest other point, ties to the lower one
    b2 = source.basis(EditSpec(position=-2, direction_index=2.0, k=2), 0)
    assert rank(b2, u[1], u[2]) == 2


def rank(*rows: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]).double(), tol=1e-4))


def test_directions_from_saved_sets(llama, tmp_path):
    lm, _, acts = llama
    path = mean_diff(acts).save(tmp_path / "dirs")

    saved = Directions.from_sets(DirectionSet.load(path))
    spec = EditSpec.full(1, position=-1)
    with applied(lm, spec, saved, mode="hooks"):
        from_saved = logits(lm)
    with applied(lm, spec, Directions(acts), mode="hooks"):
        assert torch.equal(logits(lm), from_saved)
    with pytest.raises(AbliterateError, match="no projected directions"):
        build_plan(lm, EditSpec.full(1, "projected"), saved)


def test_plan_scales_follow_the_kernels():
    lm = tiny_lm("gpt2")
    acts = capture(lm, HARMFUL, HARMLESS, positions=[-1], batch_size=6)
    spec = EditSpec(attn=Kernel(0.0, 1.0, 0.5, 1.0), mlp=Kernel(2.0, 0.8, 0.8, 0.0), embedding=0.3)
    plan = build_plan(lm, spec, Directions(acts))
    got = {(e.writer.layer, e.writer.kind): e.scale for e in plan.edits}
    assert got == {
        (None, "embedding"): 0.3,  # wte and wpe
        (0, "attn"): 1.0,
        (1, "attn"): 0.5,
        (2, "mlp"): 0.8,
    }
    assert len([e for e in plan.edits if e.writer.layer is None]) == 2
    assert build_plan(lm, EditSpec(mlp=spec.mlp), Directions(acts)).edits[0].writer.kind == "mlp"
    assert build_plan(lm, EditSpec(), Directions(acts)).edits == []


def test_writers_of_other_kinds_follow_the_attention_kernel():
    lm = tiny_lm("llama")
    acts = capture(lm, HARMFUL, HARMLESS, positions=[-1], batch_size=6)
    for w in lm.anatomy.all_writers():  # as a custom writer pattern outside attention and MLP would be
        if w.kind == "attn":
            w.kind = "other"
    plan = build_plan(lm, EditSpec(attn=Kernel(1.0, 0.7, 0.7, 0.0)), Directions(acts))
    assert [(e.writer.layer, e.writer.kind, e.scale) for e in plan.edits] == [(1, "other", 0.7)]


def test_hand_built_plan_and_bad_input(llama):
    lm, source, _ = llama
    w = lm.anatomy.writers[0][0]
    handmade = EditPlan([WriterEdit(w, source.basis(EditSpec(), 0), 1.0)])
    base = logits(lm)
    with applied(lm, handmade) as h:
        assert h.mode == "weights" and (logits(lm) - base).abs().max() > 1e-4
    with pytest.raises(AbliterateError, match=r"pass Directions\(acts\)"), applied(lm, RICH):
        pass
    with pytest.raises(AbliterateError, match="unknown edit mode"):
        apply_plan(lm, handmade, mode="fast")
    with pytest.raises(AbliterateError, match="'position'"):
        build_plan(lm, EditSpec(position=-5, embedding=1.0), source)
    other = tiny_lm("llama")
    other_acts = capture(other, HARMFUL, HARMLESS, positions=[-1], batch_size=6)
    other_acts.harmful_mean = other_acts.harmful_mean[:2]
    other_acts.harmless_mean = other_acts.harmless_mean[:2]
    with pytest.raises(AbliterateError, match="capture from this model"):
        build_plan(lm, EditSpec(embedding=1.0), Directions(other_acts))
    assert torch.equal(logits(lm), base)


def test_scratch_tensors_are_reused_then_released():
    lm = tiny_lm("qwen2")
    acts = capture(lm, HARMFUL, HARMLESS, positions=[-1], batch_size=6)
    spec = EditSpec.full(2)
    source = Directions(acts)
    with applied(lm, spec, source):
        first = {w.name: w.weight.data_ptr() for w in lm.anatomy.all_writers()}
    with applied(lm, spec, source):
        assert {w.name: w.weight.data_ptr() for w in lm.anatomy.all_writers()} == first
    assert plan_mod._POOLS.get(lm.model)
    release_buffers(lm)
    assert lm.model not in plan_mod._POOLS


def package_imports() -> dict[str, set[str]]:
    """abliterate module -> the abliterate modules it imports at module level (what loading it loads)."""
    root = Path(plan_mod.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        found = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {a.name for a in node.names}
        graph[path.stem] = found
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_weights_and_streaming_do_not_import_the_runtime_hooks():
    graph = package_imports()
    for module in ("plan", "weights", "streaming", "kernel", "space"):
        assert "interventions" not in reachable(graph, module), module
    assert reachable(graph, "space") <= {"errors"}, "the edit space must stay model-free"
    for module in graph:
        assert module not in reachable(graph, module), f"import cycle through {module}"


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2_moe"])
def test_offloaded_model_uses_hooks_with_the_same_logits(family, tmp_path):
    from test_loading import write_model
    from test_offload import split_map

    src = tmp_path / "model"
    write_model(src, family)
    plain = load_model(src)
    off = load_model(src, device_map=split_map(plain, {1, 2}), offload_folder=tmp_path / "offload")
    acts = capture(plain, HARMFUL, HARMLESS, positions=[-2, -1], batch_size=4)
    source = Directions(acts)
    specs = [RICH]
    if family not in FUSED:
        specs.append(replace(RICH, norm_preserving=True))
    base = logits(off)
    for spec in specs:
        with applied(plain, spec, source) as h:
            assert h.mode == "weights"
            want = logits(plain)
        with applied(off, spec, source) as h:
            assert h.mode == "hooks"
            got = logits(off)
        assert (got - want).abs().max() < 1e-4
    with pytest.raises(AbliterateError, match="mode='hooks'"):
        apply_plan(off, build_plan(off, RICH, source), mode="weights")
    assert torch.equal(logits(off), base)
