"""llama.cpp control vector export: the GGUF layout llama.cpp reads, and its layer numbering."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from tiny import tiny_lm

from abliterate import Direction, DirectionError, DirectionSet, LayerError, add
from abliterate.outputs.control_vector import LLAMA_CPP_ARCH, export_control_vector, model_hint_for

H, L = 64, 3


def direction_set(positions: list | None = None) -> DirectionSet:
    positions = positions or [-1]
    vectors = torch.randn(L + 1, len(positions), H, generator=torch.Generator().manual_seed(0)) * 3
    return DirectionSet(vectors, positions, "mean_diff")


def read(path) -> tuple[dict, dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    for t in reader.tensors:
        assert t.tensor_type.name == "F32" and list(t.shape) == [H], t.name
    return fields, {t.name: np.array(t.data) for t in reader.tensors}


def unit(v: torch.Tensor) -> np.ndarray:
    return (v.double() / v.double().norm()).float().numpy()


def test_direction_set_layout(tmp_path):
    ds = direction_set()
    out = export_control_vector(ds, tmp_path / "cv" / "refusal.gguf", model_hint="llama", scale=2.5)
    fields, tensors = read(out)
    assert fields == {"general.architecture": "controlvector", "controlvector.model_hint": "llama",
                      "controlvector.layer_count": 2}  # fmt: skip
    assert gguf.GGUFReader(str(out)).fields["controlvector.layer_count"].types == [gguf.GGUFValueType.INT32]
    # residual point p (input of layer p; point L = output of the last layer) -> direction.(p - 1)
    assert sorted(tensors) == ["direction.1", "direction.2"]
    for p in (2, 3):
        np.testing.assert_allclose(tensors[f"direction.{p - 1}"], 2.5 * unit(ds.vectors[p, 0]), rtol=1e-6, atol=1e-7)
    assert not list((tmp_path / "cv").glob(".*")), "no temporary file left behind"


def test_layers_per_point_scale_and_position(tmp_path):
    ds = direction_set(positions=[-1, -2])
    with pytest.raises(DirectionError, match="several positions"):
        export_control_vector(ds, tmp_path / "x.gguf", model_hint="qwen2")
    out = export_control_vector(ds, tmp_path / "x.gguf", model_hint="qwen2", layers=[-1], scale={3: -1.5}, position=-2)
    fields, tensors = read(out)
    assert fields["controlvector.layer_count"] == 1 and list(tensors) == ["direction.2"]
    np.testing.assert_allclose(tensors["direction.2"], -1.5 * unit(ds.vectors[3, 1]), rtol=1e-6, atol=1e-7)
    with pytest.raises(LayerError, match=r"no scale for point\(s\) \[2\]"):
        export_control_vector(ds, tmp_path / "y.gguf", model_hint="qwen2", layers=[2, 3], scale={3: 1.0}, position=-1)


def test_mapping_tensor_and_single_direction(tmp_path):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(H, generator=g), torch.randn(H, generator=g)
    _, tensors = read(export_control_vector({2: a, 5: Direction(b)}, tmp_path / "m.gguf", model_hint="llama"))
    assert sorted(tensors) == ["direction.1", "direction.4"]
    np.testing.assert_allclose(tensors["direction.4"], unit(b), rtol=1e-6, atol=1e-7)
    stacked = torch.stack([a, b, a, b])  # [points, hidden]
    _, tensors = read(export_control_vector(stacked, tmp_path / "s.gguf", model_hint="llama", scale=0.5))
    assert sorted(tensors) == ["direction.1", "direction.2"]
    np.testing.assert_allclose(tensors["direction.2"], 0.5 * unit(b), rtol=1e-6, atol=1e-7)
    own = Direction(b / b.norm(), layer=2)
    _, tensors = read(export_control_vector(own, tmp_path / "d.gguf", model_hint="llama"))
    assert list(tensors) == ["direction.1"]
    _, tensors = read(export_control_vector(a, tmp_path / "t.gguf", model_hint="llama", layers=[2, 3]))
    np.testing.assert_array_equal(tensors["direction.1"], tensors["direction.2"])


def test_bad_input(tmp_path):
    ds = direction_set()
    out = tmp_path / "bad.gguf"
    cases = [
        (LayerError, "llama.cpp steers the outputs of layers", dict(directions=ds, layers=[1, 2])),
        (LayerError, "llama.cpp steers", dict(directions=ds, layers=[0])),
        (LayerError, "out of range", dict(directions=ds, layers=[4])),
        (LayerError, "out of range", dict(directions=torch.ones(4, H), layers=[9])),
        (LayerError, r"no direction for point\(s\) \[3\]", dict(directions={2: torch.ones(H)}, layers=[2, 3])),
        (LayerError, "out of range", dict(directions={2: torch.ones(H), 9: torch.ones(H)}, num_layers=L)),
        (DirectionError, "pass layers=", dict(directions=torch.ones(H))),
        (DirectionError, "zero or not finite", dict(directions=torch.zeros(H), layers=[2])),
        (DirectionError, "zero or not finite", dict(directions=torch.full((H,), float("nan")), layers=[2])),
        (DirectionError, "one vector per layer", dict(directions=Direction(torch.eye(H)[:2], layer=2))),
        (DirectionError, "different hidden sizes", dict(directions={2: torch.ones(H), 3: torch.ones(H + 1)})),
    ]
    for exc, match, kwargs in cases:
        with pytest.raises(exc, match=match) as info:
            export_control_vector(kwargs.pop("directions"), out, model_hint="llama", **kwargs)
        assert "\n" not in str(info.value)
        assert not out.exists() and not list(tmp_path.iterdir())


def test_llama_cpp_semantics_match_abliterate_add(tmp_path):
    """Apply the file as llama.cpp does (direction.n added to the output of block n) on a tiny model: same
    logits as abliterate's activation addition at residual point n + 1."""
    lm = tiny_lm("llama")
    r = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(2))
    r = r / r.norm()
    path = export_control_vector(Direction(r, layer=2), tmp_path / "cv.gguf", model_hint="llama", scale=4.0)
    batch = lm.encode(lm.format(["hello there"]))
    hooks = []
    for t in gguf.GGUFReader(str(path)).tensors:
        block = int(t.name.split(".")[1])
        vec = torch.from_numpy(np.array(t.data))

        def after_block(module, args, output, vec=vec):
            if isinstance(output, tuple):
                return (output[0] + vec.to(output[0].dtype), *output[1:])
            return output + vec.to(output.dtype)

        hooks.append(lm.anatomy.layers[block].register_forward_hook(after_block))
    try:
        with torch.inference_mode():
            llama_cpp = lm.model(**batch).logits
    finally:
        for h in hooks:
            h.remove()
    with add(lm, r, 4.0, layers=[2]), torch.inference_mode():
        ours = lm.model(**batch).logits
    with torch.inference_mode():
        base = lm.model(**batch).logits
    assert (ours - base).abs().max() > 1e-3
    assert (llama_cpp - ours).abs().max() < 1e-5


def test_model_hints_are_llama_cpp_architectures():
    known = set(gguf.MODEL_ARCH_NAMES.values())
    assert set(LLAMA_CPP_ARCH.values()) <= known
    assert model_hint_for("qwen2_moe") == "qwen2moe" and model_hint_for("mixtral") == "llama"
    assert model_hint_for("starcoder2") == "starcoder2"
