"""GGUF in -> GGUF out: the edit written into a copy of the source GGUF (library, ``run``, ``apply --stream``,
``export``), read back by transformers' GGUF loader and compared with the edited model in memory."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_tiny import write_tiny_gguf

from abliterate.checkpoint.gguf_file import read_gguf
from abliterate.checkpoint.gguf_stream import write_plan_gguf
from abliterate.edit.direction_edit import DirectionEdit
from abliterate.edit.plan import apply_plan
from abliterate.errors import AbliterateError
from abliterate.lm.loading import load_model

IDS = torch.tensor([[5, 70, 80, 90, 100, 33, 41, 7]])
# Per type, the largest error of re-encoding one value, relative to its block's largest magnitude: half a step of
# Q8_0 (127 levels a side, symmetric), a whole step of Q5_0/Q4_0 (their scale puts the largest value at -16/-8, so
# the other side clips at +15/+7), plus the block scale's own f16 rounding; or F16's relative rounding.
F16_SCALE = 2.0**-10
WEIGHT_BOUND = {
    "F32": 0.0,
    "F16": 2.0**-11,
    "BF16": 2.0**-8,
    "Q8_0": 0.5 / 127 + F16_SCALE,
    "Q5_0": 1 / 16 + F16_SCALE,
    "Q4_0": 1 / 8 + F16_SCALE,
}


def sha(data: bytes | np.ndarray) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def pair(source):
    """The source model edited in memory, and its plan (one load for the tests that only read them)."""
    return edited(source)


def edited(path: Path, norm_preserving: bool = True):
    """The model loaded from ``path`` with a random direction removed everywhere (embeddings included); its plan."""
    lm = load_model(str(path), dtype="float32")
    d = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(1))
    plan = DirectionEdit(d / d.norm(), None, 1.0, True, None, norm_preserving).plan(lm)
    apply_plan(lm, plan, mode="weights")
    return lm, plan


def logits(path_or_lm) -> torch.Tensor:
    lm = load_model(str(path_or_lm), dtype="float32") if isinstance(path_or_lm, Path) else path_or_lm
    with torch.no_grad():
        return lm.model(IDS).logits[0]


def test_f32_gguf_holds_exactly_the_edited_model(source, pair, tmp_path):
    lm, plan = pair
    written = write_plan_gguf(source, tmp_path / "out.gguf", plan, lm.hidden_size, gguf_type="F32")
    back = load_model(str(written.path), dtype="float32")
    want = lm.model.state_dict()
    for name, value in back.model.state_dict().items():
        torch.testing.assert_close(value, want[name], atol=0, rtol=0, msg=name)
    assert torch.equal(logits(back), logits(lm))
    assert set(written.edited) == {"token_embd.weight"} | {
        f"blk.{i}.{t}.weight" for i in range(3) for t in ("attn_output", "ffn_down")
    }


def test_auto_type_keeps_encodable_types_and_bounds_the_error(source, pair, tmp_path):
    lm, plan = pair
    written = write_plan_gguf(source, tmp_path / "out.gguf", plan, lm.hidden_size)
    kinds = {name: after for name, (_, after) in written.edited.items()}
    befores = {name: before for name, (before, _) in written.edited.items()}
    assert befores["blk.0.ffn_down.weight"] == "Q6_K" and kinds["blk.0.ffn_down.weight"] == "Q8_0"  # K-quant
    assert kinds["blk.0.attn_output.weight"] == "Q5_0" and kinds["token_embd.weight"] == "Q8_0"  # as they were
    reader, sd = read_gguf(written.path), lm.model.state_dict()
    hf = {"token_embd.weight": "model.embed_tokens.weight"} | {
        f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight"
        for i in range(3)
        for g, h in (("attn_output", "self_attn.o_proj"), ("ffn_down", "mlp.down_proj"))
    }
    for t in reader.tensors:
        if t.name in hf:
            got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            want = sd[hf[t.name]]
            blocks = want.reshape(want.shape[0], -1, 32)  # every type here has blocks of 32 along a row
            scale = blocks.abs().amax(-1, keepdim=True)
            err = (got.reshape(blocks.shape) - blocks).abs()
            assert (err <= WEIGHT_BOUND[t.tensor_type.name] * scale + 1e-7).all(), t.name
    delta = (logits(written.path) - logits(lm)).abs().max()
    assert 0 < delta < 0.25 * (logits(lm) - logits(source)).abs().max()  # re-encoding error, well below the edit


def test_untouched_tensors_and_every_key_are_copied(source, pair, tmp_path):
    lm, plan = pair
    written = write_plan_gguf(source, tmp_path / "out.gguf", plan, lm.hidden_size, edit={"spec": "x"})
    src, out = read_gguf(source), read_gguf(written.path)
    before = {t.name: (t.tensor_type, sha(t.data)) for t in src.tensors}
    after = {t.name: (t.tensor_type, sha(t.data)) for t in out.tensors}
    assert list(before) == list(after)
    changed = {n for n in before if before[n] != after[n]}
    assert changed == set(written.edited)  # every other tensor byte for byte (and its type)
    for key, field in src.fields.items():
        if not key.startswith("GGUF."):
            assert out.fields[key].contents() == field.contents(), key
            assert out.fields[key].types == field.types, key
    assert "abliterate" in out.fields["general.abliterated"].contents()
    assert json.loads(out.fields["general.abliterate.edit"].contents()) == {"spec": "x"}
    assert written.sha256 == hashlib.sha256(written.path.read_bytes()).hexdigest()


def test_tied_head_is_kept_as_a_copy_of_the_original_embedding(tmp_path):
    src = write_tiny_gguf(tmp_path / "tied.gguf", tied=True)
    lm, plan = edited(src, norm_preserving=False)
    written = write_plan_gguf(src, tmp_path / "out.gguf", plan, lm.hidden_size, gguf_type="F32")
    assert written.appended == ["output.weight"]
    out = {t.name: t for t in read_gguf(written.path).tensors}
    original = next(t for t in read_gguf(src).tensors if t.name == "token_embd.weight")
    assert sha(out["output.weight"].data) == sha(original.data)
    torch.testing.assert_close(logits(written.path), logits(lm), atol=1e-5, rtol=0)


def test_bad_input_is_one_line_and_writes_nothing(source, pair, tmp_path):
    lm, plan = pair
    digest = sha(source.read_bytes())
    with pytest.raises(AbliterateError, match="is the input GGUF"):
        from abliterate.checkpoint.gguf_stream import check_target

        check_target(source, source, overwrite=True)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(AbliterateError, match="truncated|not a readable GGUF"):
        write_plan_gguf(truncated, tmp_path / "o.gguf", plan, lm.hidden_size)
    with pytest.raises(AbliterateError, match="cannot write type|unknown"):
        write_plan_gguf(source, tmp_path / "o.gguf", plan, lm.hidden_size, gguf_type="Q6_K")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]  # nothing partial left
    assert sha(source.read_bytes()) == digest


def test_a_run_on_the_demo_model_writes_into_the_demo_gguf(tmp_path, monkeypatch):
    from abliterate.outputs.gguf_out import gguf_source

    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path))
    (tmp_path / "qwen2.5-coder-0.5b-instruct").mkdir()
    assert gguf_source(str(tmp_path / "qwen2.5-coder-0.5b-instruct")) is None  # no GGUF kept: none written
    (tmp_path / "qwen2.5-coder-0.5b-instruct.gguf").write_bytes(b"GGUF")
    assert gguf_source(str(tmp_path / "qwen2.5-coder-0.5b-instruct")) == tmp_path / "qwen2.5-coder-0.5b-instruct.gguf"
    assert gguf_source(str(tmp_path)) is None
