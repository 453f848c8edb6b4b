"""Direction methods, DirectionSet storage and indexing, subspace ablation and per-layer scales."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from tiny import HARMFUL, HARMLESS, tiny_lm

from abliterate import Direction, DirectionError, DirectionSet, LayerError, ablate, capture, directions, orthogonalize
from abliterate.lm.loading import from_pretrained_objects

POSITIONS = [-2, -1, "gen"]


@pytest.fixture(scope="module")
def setup():
    lm = tiny_lm("llama")
    acts = capture(lm, HARMFUL, HARMLESS, positions=POSITIONS, batch_size=6)
    return lm, acts


def unit(v):
    return v / v.norm(dim=-1, keepdim=True)


def live(acts):
    """Points/positions where the two sets differ: the chat template's fixed suffix gives identical
    embeddings at point 0 for the prompt positions, where every method must return zeros."""
    mask = (acts.harmful_mean - acts.harmless_mean).norm(dim=-1) > 1e-6
    assert mask.sum() >= mask.numel() - 2
    return mask


@pytest.mark.parametrize("method", list(directions.METHODS))
def test_identical_means_give_zero_not_nan(setup, method):
    ds = directions.compute(setup[1], method)
    assert torch.isfinite(ds.vectors).all()
    dead = ~live(setup[1])
    assert dead.any() and (ds.vectors[dead] == 0).all()


def test_mean_diff_is_harmful_minus_harmless(setup):
    _, acts = setup
    ds = directions.mean_diff(acts)
    assert ds.method == "mean_diff" and ds.positions == acts.positions
    assert ds.vectors.shape == acts.harmful_mean.shape
    assert torch.allclose(ds.vectors.double(), acts.harmful_mean - acts.harmless_mean, atol=1e-6)
    assert ds.norms().shape == (acts.num_points, len(POSITIONS))
    # indexing gives the normalized raw vector for that point and position
    d = ds[2, -2]
    assert (d.layer, d.position, d.method) == (2, -2, "mean_diff")
    assert torch.allclose(d.vector, unit(ds.vectors[2, 0]), atol=1e-6)


def test_slerp_t1_is_difference_of_normalized_means(setup):
    _, acts = setup
    ds = directions.slerp(acts, t=1.0)
    expected = unit(unit(acts.harmful_mean) - unit(acts.harmless_mean))
    assert ds.vectors.shape == expected.shape
    m = live(acts)
    assert torch.allclose(ds.vectors.double()[m], expected[m], atol=1e-5)
    assert ds.meta["t"] == 1.0


def test_slerp_half_lies_between(setup):
    _, acts = setup
    m = live(acts)
    half = directions.slerp(acts, t=0.5).vectors.double()[m]
    full = directions.slerp(acts, t=1.0).vectors.double()[m]
    a, b = unit(acts.harmless_mean)[m], unit(acts.harmful_mean)[m]
    assert torch.allclose(half.norm(dim=-1), torch.ones(half.shape[:-1], dtype=torch.float64), atol=1e-5)
    # in the plane of the two normalized means ...
    basis = torch.linalg.qr(torch.stack([a, b], dim=-1)).Q  # [..., hidden, 2]
    in_plane = (basis @ (basis.transpose(-1, -2) @ half[..., None]))[..., 0]
    assert torch.allclose(in_plane, half, atol=1e-5)
    # ... and the chord to the arc's midpoint is omega/4 away from the chord to its end
    omega = torch.arccos((a * b).sum(-1).clamp(-1, 1))
    assert torch.allclose((half * full).sum(-1), torch.cos(omega / 4), atol=1e-4)
    assert (omega > 1e-3).all()
    # strictly between: a different direction from t=1, turning the same way
    assert ((half * full).sum(-1) < 1 - 1e-7).all()
    assert ((half * (b - a)).sum(-1) > 0).all()


@pytest.mark.parametrize("t", [0.0, -0.5, 1.5])
def test_slerp_rejects_bad_t(setup, t):
    with pytest.raises(DirectionError, match="slerp t"):
        directions.slerp(setup[1], t=t)


def test_projected_is_orthogonal_to_harmless_mean(setup):
    _, acts = setup
    ds = directions.projected(acts)
    m = live(acts)
    raw = (acts.harmful_mean - acts.harmless_mean)[m]
    h = unit(acts.harmless_mean)[m]
    vec = ds.vectors.double()[m]
    assert (vec.norm(dim=-1) > 1e-4).all()
    cos = (unit(vec) * h).sum(-1)
    assert cos.abs().max() < 1e-5
    # what was removed is exactly the harmless-mean component
    assert torch.allclose(raw - vec, (raw * h).sum(-1, keepdim=True) * h, atol=1e-5)


def test_compute_by_name(setup):
    _, acts = setup
    assert torch.equal(directions.compute(acts, "projected").vectors, directions.projected(acts).vectors)
    assert directions.compute(acts, "slerp", t=0.5).meta["t"] == 0.5
    with pytest.raises(DirectionError, match="unknown direction method"):
        directions.compute(acts, "pca")


def test_save_load_round_trip(setup, tmp_path):
    _, acts = setup
    ds = directions.slerp(acts, t=0.75)
    path = ds.save(tmp_path / "sub" / "refusal")
    assert path == tmp_path / "sub" / "refusal.safetensors" and path.is_file()
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    assert meta["format"] == directions.FORMAT and meta["method"] == "slerp" and meta["positions"] == POSITIONS
    assert meta["t"] == 0.75 and meta["n_harmful"] == len(HARMFUL) and meta["prompt_hash"] == acts.prompt_hash
    back = DirectionSet.load(path)
    assert torch.equal(back.vectors, ds.vectors)
    assert back.positions == ds.positions == POSITIONS
    assert back.method == "slerp"
    assert back.meta == ds.meta
    assert torch.equal(back[1, "gen"].vector, ds[1, "gen"].vector)
    assert not list(tmp_path.rglob(".*.tmp")), "no temporary file is left behind"


def test_save_keeps_dots_in_name(setup, tmp_path):
    ds = directions.mean_diff(setup[1])
    path = ds.save(tmp_path / "llama-3.1-8b")
    assert path.name == "llama-3.1-8b.safetensors"
    assert (tmp_path / "llama-3.1-8b.json").is_file()
    assert torch.equal(DirectionSet.load(path).vectors, ds.vectors)
    assert ds.save(tmp_path / "x.safetensors").name == "x.safetensors"


def test_load_rejects_other_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(2, 3)}, str(plain))
    with pytest.raises(DirectionError, match="not an abliterate direction file"):
        DirectionSet.load(plain)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"directions": torch.zeros(2, 1, 3)}, str(foreign), metadata={"other": "x"})
    with pytest.raises(DirectionError, match="not an abliterate direction file"):
        DirectionSet.load(foreign)
    text = tmp_path / "text.safetensors"
    text.write_text("hello")
    with pytest.raises(DirectionError, match="not an abliterate direction file"):
        DirectionSet.load(text)
    with pytest.raises(DirectionError, match="no direction file"):
        DirectionSet.load(tmp_path / "missing.safetensors")


def test_indexing(setup):
    _, acts = setup
    ds = directions.mean_diff(acts)
    with pytest.raises(DirectionError, match="several positions"):
        ds[1]
    with pytest.raises(DirectionError, match="not in this direction set"):
        ds[1, -5]
    with pytest.raises(LayerError, match="out of range"):
        ds[ds.num_points, -1]
    with pytest.raises(LayerError, match="out of range"):
        ds[-ds.num_points - 1, -1]
    assert ds[-1, -1].layer == ds.num_points - 1
    single = DirectionSet(ds.vectors[:, 1:2], [-1], "mean_diff")
    assert torch.equal(single[2].vector, ds[2, -1].vector)
    assert single[2].position == -1


def hidden_states(lm, prompts):
    batch = lm.encode(lm.format(prompts))
    with torch.inference_mode():
        return lm.model(**batch, output_hidden_states=True).hidden_states[: lm.num_layers]


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3_moe"])
def test_subspace_ablation_removes_both(family):
    lm = tiny_lm(family)
    acts = capture(lm, HARMFUL, HARMLESS, positions=[-1], batch_size=6)
    ds = directions.mean_diff(acts)
    r1, r2 = ds[1], ds[lm.num_layers]
    assert abs(float(r1.vector @ r2.vector)) < 0.99
    sub = directions.combine([r1, r2.vector], lm.hidden_size)
    assert sub.k == 2 and sub.method == "subspace"
    assert torch.allclose(sub.vector @ sub.vector.T, torch.eye(2), atol=1e-5)
    before = hidden_states(lm, HARMFUL[:3])
    with ablate(lm, sub):
        after = hidden_states(lm, HARMFUL[:3])
    for u in (r1.vector, r2.vector):
        assert max(float((h @ u).abs().max() / h.norm(dim=-1).max()) for h in before) > 1e-2
        assert max(float((h @ u).abs().max() / h.norm(dim=-1).max()) for h in after) < 1e-5
    # ablating only one of them leaves the other's component
    with ablate(lm, r1):
        one = hidden_states(lm, HARMFUL[:3])
    rest = r2.vector - (r2.vector @ r1.vector) * r1.vector
    assert max(float((h @ rest).abs().max() / h.norm(dim=-1).max()) for h in one) > 1e-3
    with pytest.raises(DirectionError):
        directions.combine([], lm.hidden_size)


def writer_io(lm, layers):
    """Record (raw, edited) outputs of the first writer of each layer: raw recomputed from its input."""
    seen, handles = {}, []
    for i in layers:
        writer = lm.anatomy.writers[i][0]

        def hook(module, args, out, i=i):
            seen[i] = (module.forward(*args), out)

        handles.append(writer.module.register_forward_hook(hook))  # after (appended to) the ablation hook
    return seen, handles


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scale_leaves_that_fraction(family):
    lm = tiny_lm(family)
    acts = capture(lm, HARMFUL, HARMLESS, positions=[-1], batch_size=6)
    u = directions.mean_diff(acts)[1].vector
    batch = lm.encode(lm.format(HARMFUL[:2]))

    def run(**kw):
        seen, handles = writer_io(lm, range(lm.num_layers))
        try:
            with ablate(lm, u, **kw), torch.inference_mode():
                lm.model(**batch)
        finally:
            for h in handles:
                h.remove()
        return seen

    def check(raw, out, kept):
        along_raw, along_out = raw @ u, out @ u
        assert along_raw.abs().max() > 1e-3
        assert torch.allclose(along_out, kept * along_raw, atol=1e-5)
        assert torch.allclose(out - along_out[..., None] * u, raw - along_raw[..., None] * u, atol=1e-5)

    for raw, out in run(scale=0.5).values():
        check(raw, out, 0.5)
    mapped = run(scale={0: 1.0, 2: 0.5})
    check(*mapped[0], 0.0)
    check(*mapped[1], 1.0)
    check(*mapped[2], 0.5)


def test_orthogonalize_with_scale_mapping_equals_ablate():
    lm = tiny_lm("qwen2")
    acts = capture(lm, HARMFUL, HARMLESS, positions=[-1], batch_size=6)
    r = directions.mean_diff(acts)[1]
    batch = lm.encode(lm.format(HARMLESS[:3]))
    scale = {0: 1.0, 2: 0.5}
    with torch.inference_mode():
        base = lm.model(**batch).logits
        with ablate(lm, r, scale=scale):
            runtime = lm.model(**batch).logits
        with ablate(lm, r):
            full = lm.model(**batch).logits
    edited = from_pretrained_objects(copy.deepcopy(lm.model), lm.tokenizer)
    report = orthogonalize(edited, r, scale=scale)
    assert not any(".layers.1." in name for name in report.edited)
    with torch.inference_mode():
        baked = edited.model(**batch).logits
    assert (runtime - base).abs().max() > 1e-3
    assert (runtime - full).abs().max() > 1e-3, "the mapping must differ from ablating every layer fully"
    assert (baked - runtime).abs().max() < 1e-4


def test_direction_k():
    assert Direction(torch.ones(4)).k == 1
    assert Direction(torch.eye(4)[:3]).k == 3
    assert math.isclose(float(directions.unit(torch.tensor([3.0, 4.0])).norm()), 1.0, rel_tol=1e-6)
