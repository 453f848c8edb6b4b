"""Streaming weight edit == in-memory orthogonalize + save, tensor for tensor, sharded and single-file."""

from __future__ import annotations

import copy
import errno
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import tiny_lm
from transformers import AutoModelForCausalLM

from abliterate import DirectionError, LayerError, ModelLoadError, OutputError, orthogonalize
from abliterate.checkpoint import shard_edit, shards
from abliterate.checkpoint import stream_edit as st
from abliterate.checkpoint.stream_edit import stream_orthogonalize
from abliterate.lm.loading import from_pretrained_objects

FAMILIES = ["llama", "gpt2", "qwen2_moe", "gemma2", "mixtral"]
IDS = torch.tensor([[5, 17, 33, 90, 100, 7, 250]])


def unit(hidden: int, seed: int = 1, k: int = 1) -> torch.Tensor:
    v = torch.randn(k, hidden, generator=torch.Generator().manual_seed(seed))
    return (v / v.norm(dim=-1, keepdim=True)).squeeze(0)


def save(lm, path: Path, *, sharded: bool, dtype: torch.dtype = torch.float32) -> Path:
    model = copy.deepcopy(lm.model).to(dtype)
    model.save_pretrained(path, max_shard_size="200KB" if sharded else "50GB")
    lm.tokenizer.save_pretrained(path)
    return path


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    return out


def weight_map(path: Path) -> dict[str, str] | None:
    index = path / shards.INDEX
    return json.loads(index.read_text())["weight_map"] if index.is_file() else None


def reference(lm, tmp: Path, direction, dtype: torch.dtype = torch.float32, **kwargs):
    """The in-memory edit of ``lm``, saved in ``dtype``: (edited LoadedModel, its tensors, its config)."""
    edited = from_pretrained_objects(copy.deepcopy(lm.model), lm.tokenizer, source=lm.source)
    orthogonalize(edited, direction, **kwargs)
    model = copy.deepcopy(edited.model).to(dtype)
    model.save_pretrained(tmp / "ref")
    return edited, tensors(tmp / "ref"), json.loads((tmp / "ref" / "config.json").read_text())


def logits(path_or_model) -> torch.Tensor:
    model = path_or_model
    if isinstance(path_or_model, Path):
        model = AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(IDS).logits


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert (got[key].double() - want[key].double()).abs().max() <= atol, key


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single"])
@pytest.mark.parametrize("family", FAMILIES)
def test_stream_equals_in_memory_edit(family, sharded, tmp_path):
    lm = tiny_lm(family)
    src = save(lm, tmp_path / "src", sharded=sharded)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    r = unit(lm.hidden_size)
    seen: list[tuple[int, int]] = []
    report = stream_orthogonalize(src, tmp_path / "out", r, progress=lambda a, b: seen.append((a, b)))
    edited, want, want_config = reference(lm, tmp_path, r)

    out = tmp_path / "out"
    assert_same(tensors(out), want)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before, "the input must be untouched"
    config = json.loads((out / "config.json").read_text())
    assert config.get("tie_word_embeddings", True) == want_config.get("tie_word_embeddings", True)
    assert report.untied == (family in ("llama", "gpt2", "gemma2"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in src.glob("*.safetensors"))
    if sharded:
        old, new = weight_map(src), weight_map(out)
        assert old is not None and new is not None and len(set(old.values())) > 1
        added = {k: v for k, v in new.items() if k not in old}
        assert {k: new[k] for k in old} == old and set(new.values()) == set(old.values())
        assert set(added) == ({"lm_head.weight"} if report.untied else set())
        index = json.loads((out / shards.INDEX).read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    else:
        assert weight_map(out) is None
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"} <= set(report.copied)
    assert seen and seen[-1][0] == seen[-1][1] == report.bytes_written
    assert (logits(out) - logits(edited.model)).abs().max() < 1e-5
    assert (logits(out) - logits(lm.model)).abs().max() > 1e-3, "the edit must change the model"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary directory left behind"


@pytest.mark.parametrize("norm_preserving", [False, True])
@pytest.mark.parametrize(
    ("family", "dtype"), [("llama", torch.float32), ("qwen2_moe", torch.bfloat16), ("gpt2", torch.float64)]
)
def test_tensors_are_edited_in_row_blocks(family, dtype, norm_preserving, tmp_path, monkeypatch):
    """With a 200-element work buffer every writer spans many row blocks (read, and for Linear weights read
    twice, block by block from the file): same result as the in-memory edit, and no whole tensor is read."""
    lm = tiny_lm(family)
    src = save(lm, tmp_path / "src", sharded=True, dtype=dtype)
    r = unit(lm.hidden_size, seed=5)
    blocks: list[int] = []
    real_block = shards.Workspace.block

    def block(self, nbytes):
        blocks.append(nbytes)
        return real_block(self, nbytes)

    monkeypatch.setattr(shards.Workspace, "block", block)
    monkeypatch.setattr(st, "Workspace", lambda: shards.Workspace(200))
    stream_orthogonalize(src, tmp_path / "out", r, norm_preserving=norm_preserving)
    loaded = from_pretrained_objects(AutoModelForCausalLM.from_pretrained(src, dtype=dtype), lm.tokenizer, source="x")
    (tmp_path / "exact").mkdir()
    exact = reference(loaded, tmp_path / "exact", r, dtype=dtype, norm_preserving=norm_preserving)[1]
    got = tensors(tmp_path / "out")
    assert set(got) == set(exact)
    tol = 2**-7 if dtype == torch.bfloat16 else 1e-6
    for key, w in exact.items():
        assert ((got[key].double() - w.double()).abs() <= tol * w.double().abs() + 1e-7).all(), key
    writer_bytes = lm.hidden_size * lm.hidden_size * dtype.itemsize  # an o_proj
    assert blocks and max(blocks) < writer_bytes / 2, "writers must be read in blocks, not whole"


@pytest.mark.parametrize(
    ("family", "dtype"),
    [(f, torch.bfloat16) for f in ("llama", "gemma2", "qwen2_moe", "gpt2")] + [("mixtral", torch.float16)],
)
def test_half_precision_checkpoint(family, dtype, tmp_path):
    lm = tiny_lm(family)
    src = save(lm, tmp_path / "src", sharded=True, dtype=dtype)
    r = unit(lm.hidden_size, seed=3)
    stream_orthogonalize(src, tmp_path / "out", r)
    got = tensors(tmp_path / "out")
    assert all(t.dtype == dtype for t in got.values())
    # what `load in float32, orthogonalize, save in the stored dtype` gives: the same float32 arithmetic
    loaded = from_pretrained_objects(
        AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), lm.tokenizer, source="half"
    )
    (tmp_path / "exact").mkdir()
    exact = reference(loaded, tmp_path / "exact", r, dtype=dtype)[1]
    assert set(got) == set(exact)
    for key, w in exact.items():  # the same float32 arithmetic: equal up to a last-bit rounding flip
        assert ((got[key].float() - w.float()).abs() <= 2**-7 * w.float().abs()).all(), key
    # the float32 edit of the float32 original, cast to the stored dtype: equal within its rounding
    _, want, _ = reference(lm, tmp_path, r, dtype=dtype)
    for key, w in want.items():
        diff = (got[key].float() - w.float()).abs()
        assert (diff <= 2**-7 * w.float().abs() + 2**-8 * w.float().abs().max()).all(), key


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt2", "gemma2"])
def test_norm_preserving_layer_scales_and_subspace(family, tmp_path):
    lm = tiny_lm(family)
    src = save(lm, tmp_path / "src", sharded=True)
    basis = unit(lm.hidden_size, seed=5, k=2)
    cases = [
        {"norm_preserving": True},
        {"scale": {0: 1.0, 2: 0.5}},
        {"layers": [1, 2], "scale": 0.7, "embeddings": True, "embedding_scale": 0.3},
        {"layers": [0], "norm_preserving": True},
    ]
    for i, kwargs in enumerate(cases):
        report = stream_orthogonalize(src, tmp_path / f"out{i}", basis, **kwargs)
        (tmp_path / f"ref{i}").mkdir()
        edited, want, _ = reference(lm, tmp_path / f"ref{i}", basis, **kwargs)
        assert_same(tensors(tmp_path / f"out{i}"), want)
        assert (logits(tmp_path / f"out{i}") - logits(edited.model)).abs().max() < 1e-5
        assert report.untied == (family != "qwen2_moe" and i != 3)  # tied, and the embedding edited


def test_checkpoint_without_base_model_prefix(tmp_path):
    """Old GPT-2 checkpoints name tensors ``h.0.attn.c_proj.weight``, without ``transformer.``."""
    lm = tiny_lm("gpt2")
    src = tmp_path / "src"
    save(lm, src, sharded=False)
    stored = tensors(src)
    save_file({k.removeprefix("transformer."): v for k, v in stored.items()}, src / shards.SINGLE, {"format": "pt"})
    r = unit(lm.hidden_size, seed=7)
    stream_orthogonalize(src, tmp_path / "out", r)
    edited, want, _ = reference(lm, tmp_path, r)
    got = tensors(tmp_path / "out")
    assert_same({f"transformer.{k}" if k != "lm_head.weight" else k: v for k, v in got.items()}, want)
    assert (logits(tmp_path / "out") - logits(edited.model)).abs().max() < 1e-5


def test_tied_checkpoint_that_stores_the_lm_head(tmp_path):
    """Some tied checkpoints also store lm_head.weight: it is kept (not duplicated) and the config untied."""
    lm = tiny_lm("qwen2")
    src = save(lm, tmp_path / "src", sharded=False)
    stored = tensors(src)
    save_file({**stored, "lm_head.weight": stored["model.embed_tokens.weight"].clone()}, src / shards.SINGLE)
    r = unit(lm.hidden_size, seed=11)
    report = stream_orthogonalize(src, tmp_path / "out", r)
    edited, want, _ = reference(lm, tmp_path, r)
    assert report.untied and report.bytes_written == (src / shards.SINGLE).stat().st_size
    assert_same(tensors(tmp_path / "out"), want)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert (logits(tmp_path / "out") - logits(edited.model)).abs().max() < 1e-5


def test_other_files_copied_and_foreign_weights_left_out(tmp_path, monkeypatch):
    lm = tiny_lm("qwen2")
    src = save(lm, tmp_path / "src", sharded=True)
    (src / "pytorch_model.bin").write_bytes(b"old weights")
    (src / "extra").mkdir()
    (src / "extra" / "notes.txt").write_text("hello")

    def no_kernel_copy(*args, **kwargs):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", no_kernel_copy)  # the buffered fallback gives the same bytes
    report = stream_orthogonalize(src, tmp_path / "out", unit(lm.hidden_size))
    assert report.skipped == ["pytorch_model.bin"]
    assert (tmp_path / "out" / "extra" / "notes.txt").read_text() == "hello"
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()
    assert_same(tensors(tmp_path / "out"), reference(lm, tmp_path, unit(lm.hidden_size))[1])


def test_overwrite_replaces_output(tmp_path):
    lm = tiny_lm("llama")
    src = save(lm, tmp_path / "src", sharded=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("x")
    with pytest.raises(OutputError, match="already exists"):
        stream_orthogonalize(src, tmp_path / "out", unit(lm.hidden_size))
    stream_orthogonalize(src, tmp_path / "out", unit(lm.hidden_size), overwrite=True)
    assert not (tmp_path / "out" / "stale.txt").exists() and (tmp_path / "out" / shards.SINGLE).is_file()


# --- bad input: one-line errors, nothing written -------------------------------------------------------------


@pytest.fixture
def llama_src(tmp_path):
    lm = tiny_lm("llama")
    return lm, save(lm, tmp_path / "src", sharded=True)


def fails(exc_type, match, src, out, direction, **kwargs):
    with pytest.raises(exc_type, match=match) as info:
        stream_orthogonalize(src, out, direction, **kwargs)
    assert "\n" not in str(info.value)
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return info.value


def test_shards_without_index(llama_src, tmp_path):
    lm, src = llama_src
    (src / shards.INDEX).unlink()
    fails(
        ModelLoadError, r"3 \.safetensors shards but no model\.safetensors\.index\.json", src, tmp_path / "o", unit(64)
    )


def test_missing_shard_and_no_weights(llama_src, tmp_path):
    lm, src = llama_src
    next(src.glob("model-00002-*.safetensors")).unlink()
    fails(ModelLoadError, "missing shard", src, tmp_path / "o", unit(64))
    for p in src.glob("*.safetensors*"):
        p.unlink()
    fails(ModelLoadError, "no .safetensors weights", src, tmp_path / "o", unit(64))


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.float8_e4m3fn])
def test_quantized_writer_dtype(dtype, tmp_path):
    lm = tiny_lm("llama")
    src = save(lm, tmp_path / "src", sharded=False)
    stored = tensors(src)
    stored["model.layers.1.mlp.down_proj.weight"] = stored["model.layers.1.mlp.down_proj.weight"].to(dtype)
    save_file(stored, src / shards.SINGLE, {"format": "pt"})
    fails(ModelLoadError, "down_proj.weight is stored as .*dequantize first", src, tmp_path / "o", unit(64))


def test_quantization_config(llama_src, tmp_path):
    lm, src = llama_src
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (src / "config.json").write_text(json.dumps(config))
    fails(ModelLoadError, r"quantized checkpoint \(bitsandbytes\).*dequantize first", src, tmp_path / "o", unit(64))


def test_direction_and_layers_must_fit(llama_src, tmp_path):
    lm, src = llama_src
    fails(DirectionError, "hidden size is 64", src, tmp_path / "o", unit(32))
    fails(LayerError, "out of range", src, tmp_path / "o", unit(64), scale={0: 1.0, 7: 1.0})
    fails(LayerError, "out of range", src, tmp_path / "o", unit(64), layers=[3])


def test_output_must_not_be_the_input(llama_src, tmp_path):
    lm, src = llama_src
    with pytest.raises(OutputError, match="overwrite the input"):
        stream_orthogonalize(src, src, unit(64), overwrite=True)
    with pytest.raises(OutputError, match="inside the input"):
        stream_orthogonalize(src, src / "edited", unit(64))


def test_out_of_disk_space_leaves_nothing(llama_src, tmp_path, monkeypatch):
    lm, src = llama_src
    real, calls = st.write_shard, []

    def full_disk(shard, dst, *args):
        calls.append(dst)
        if len(calls) == 2:  # one shard written, the second half-written
            dst.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(shard, dst, *args)

    monkeypatch.setattr(st, "write_shard", full_disk)
    fails(OutputError, "No space left on device; nothing was written", src, tmp_path / "o", unit(64))
    monkeypatch.setattr(st, "free_space", lambda path: 1000)
    fails(OutputError, "not enough disk space", src, tmp_path / "o", unit(64))


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "buffered"])
def test_background_copy_places_ranges(kernel, tmp_path, monkeypatch):
    if not kernel:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    data = os.urandom(3 << 20)
    (tmp_path / "in").write_bytes(data)
    dst = tmp_path / "out"
    dst.write_bytes(b"\0" * 16)
    ranges = [(100, 0, 1000), (5000, 1000, (2 << 20) + 7), (0, (2 << 20) + 1007, 50)]
    with shards.BackgroundCopy(tmp_path / "in", dst, ranges):
        pass
    want = data[100:1100] + data[5000 : 5000 + (2 << 20) + 7] + data[:50]
    assert dst.read_bytes() == want


def test_background_copy_errors_reach_the_caller(tmp_path):
    (tmp_path / "in").write_bytes(b"x" * 100)
    (tmp_path / "out").write_bytes(b"")
    with (
        pytest.raises(ModelLoadError, match="ends early"),
        shards.BackgroundCopy(tmp_path / "in", tmp_path / "out", [(50, 0, 200)]),
    ):
        pass


def test_copy_thread_disk_full_leaves_nothing(llama_src, tmp_path, monkeypatch):
    lm, src = llama_src

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)
    fails(OutputError, "No space left on device; nothing was written", src, tmp_path / "o", unit(64))
    assert not any(t.name == "abliterate-copy" for t in threading.enumerate())


def test_interrupt_while_editing_stops_the_copy(llama_src, tmp_path, monkeypatch):
    lm, src = llama_src
    started: list[threading.Thread] = []
    real_enter = shards.BackgroundCopy.__enter__

    def enter(self):
        started.append(self.thread)
        return real_enter(self)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards.BackgroundCopy, "__enter__", enter)
    monkeypatch.setattr(shard_edit, "edit_in_blocks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stream_orthogonalize(src, tmp_path / "o", unit(64))
    assert started and not any(t.is_alive() for t in started)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temporary sibling


@pytest.mark.parametrize("family", ["llama", "qwen2_moe", "gpt2", "gemma2"])
def test_stream_edit_of_a_searched_spec_equals_the_in_memory_plan(family, tmp_path):
    """``apply --edit --stream``: kernels over layers, a 2-direction subspace, the embeddings, norm preservation."""
    import math

    from abliterate.edit.plan import Directions, apply_plan, build_plan
    from abliterate.edit.spec import EditSpec, Kernel
    from abliterate.measure.directions import DirectionSet

    lm = tiny_lm(family)
    src = save(lm, tmp_path / "src", sharded=True)
    vectors = torch.randn(lm.num_layers + 1, 1, lm.hidden_size, generator=torch.Generator().manual_seed(3))
    source = Directions.from_sets(DirectionSet(vectors.double(), [-1], "mean_diff"))
    specs = [
        EditSpec(
            direction_index=1.4,
            k=2,
            attn=Kernel(1.0, 1.2, 0.3, 1.5),
            mlp=Kernel(2.0, 0.8, 0.8, math.inf),
            embedding=0.5,
        ),
        EditSpec(attn=Kernel(0.0, 1.0, 0.5, 2.0), mlp=None, norm_preserving=True),
    ]
    for i, spec in enumerate(specs):
        st.stream_edit(src, tmp_path / f"out{i}", spec, source)
        edited = from_pretrained_objects(copy.deepcopy(lm.model), lm.tokenizer, source=lm.source)
        apply_plan(edited, build_plan(edited, spec, source), mode="weights")
        edited.model.save_pretrained(tmp_path / f"ref{i}")
        assert_same(tensors(tmp_path / f"out{i}"), tensors(tmp_path / f"ref{i}"))
        assert (logits(tmp_path / f"out{i}") - logits(edited.model)).abs().max() < 1e-5


def test_stream_edit_checks_the_architecture_on_a_small_copy(tmp_path):
    """The streaming edit runs no forward on the checkpoint: a post-LN OPT, refused by load_model, is refused here
    too (on a small copy of its config), nothing written; verify=False edits by the name patterns alone."""
    from test_residual_stream import post_ln_opt

    from abliterate import ArchitectureError

    post_ln_opt().save_pretrained(tmp_path / "src")
    u = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(0)), dim=0)
    with pytest.raises(ArchitectureError, match=r"small copy of this checkpoint's architecture fails .*post-LN"):
        stream_orthogonalize(tmp_path / "src", tmp_path / "out", u)
    assert not (tmp_path / "out").exists()
    report = stream_orthogonalize(tmp_path / "src", tmp_path / "out", u, verify=False)
    assert report.edited


def test_no_verify_needs_stream(tmp_path):
    from test_cli import invoke

    res = invoke("apply", str(tmp_path), str(tmp_path / "d.safetensors"), "--out", str(tmp_path / "o"), "--no-verify")
    assert res.exit_code == 2 and "--no-verify applies to --stream only" in res.output
