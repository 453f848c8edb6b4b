"""Bad input raises the documented abliterate exception with a one-line message, and writes nothing."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import gguf
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from tiny import CHATML, HARMFUL, HARMLESS, tiny_lm, tiny_model, tiny_tokenizer

from abliterate import (
    AbliterateError,
    ChatTemplateError,
    DirectionError,
    LayerError,
    ModelLoadError,
    OutputError,
    PromptError,
    ablate,
    add,
    capture,
    directions,
    induce,
    load_model,
    orthogonalize,
)
from abliterate.lm import from_pretrained_objects


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with the bytes of each file (None for directories)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def one_line(exc: pytest.ExceptionInfo, *words: str) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg and len(msg) < 400, msg
    for w in words:
        assert w in msg, msg
    return msg


def exactly(exc: pytest.ExceptionInfo, kind: type) -> None:
    assert isinstance(exc.value, AbliterateError)
    assert type(exc.value) is kind, f"{type(exc.value).__name__} is not {kind.__name__}"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty directory and check afterwards that nothing was written there."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_params(model, before) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


# --- loading -----------------------------------------------------------------------------------------------


def test_missing_path(workdir):
    with pytest.raises(ModelLoadError) as exc:
        load_model(workdir / "no" / "such" / "model")
    exactly(exc, ModelLoadError)
    one_line(exc, "no such file or directory")
    assert tree(workdir) == {}


def test_unreachable_hub_id_is_quick(workdir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once at import time; patch the value it consults as well
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as exc:
        load_model("nonexistent-org-xyz/model-abc")
    assert time.monotonic() - start < 30
    one_line(exc, "nonexistent-org-xyz/model-abc")
    assert tree(workdir) == {}


def test_text_file_is_not_a_model(workdir):
    (workdir / "notes.txt").write_text("not a model\n")
    before = tree(workdir)
    with pytest.raises(ModelLoadError) as exc:
        load_model(workdir / "notes.txt")
    one_line(exc, "not a model")
    assert tree(workdir) == before


def test_directory_without_config(workdir):
    (workdir / "weights").mkdir()
    (workdir / "weights" / "model.safetensors").write_bytes(b"\0" * 16)
    before = tree(workdir)
    with pytest.raises(ModelLoadError) as exc:
        load_model(workdir / "weights")
    one_line(exc, "config.json")
    assert tree(workdir) == before


@pytest.mark.parametrize("content", [b"GGML" + b"\0" * 64, b"GG", b""])
def test_gguf_bad_magic(workdir, content):
    (workdir / "model.gguf").write_bytes(content)
    before = tree(workdir)
    with pytest.raises(ModelLoadError) as exc:
        load_model(workdir / "model.gguf")
    one_line(exc, "bad magic")
    assert tree(workdir) == before


def test_gguf_truncated(workdir):
    (workdir / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(ModelLoadError) as exc:
        load_model(workdir / "model.gguf")
    one_line(exc, "not a readable GGUF")


def unsupported_quant_type() -> gguf.GGMLQuantizationType:
    from abliterate.lm.loading import _gguf_supported_types

    supported = _gguf_supported_types()
    quantized = [t for t, (block, _) in gguf.GGML_QUANT_SIZES.items() if block > 1 and t.name not in supported]
    assert quantized, "every GGUF quant type is dequantizable now; drop this test"
    q8k = gguf.GGMLQuantizationType.Q8_K
    return q8k if q8k in quantized else quantized[0]


def test_gguf_unsupported_quant_type(workdir):
    qtype = unsupported_quant_type()
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    path = workdir / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(block)
    writer.add_feed_forward_length(block)
    writer.add_head_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, type_size), dtype=np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert [t.tensor_type for t in gguf.GGUFReader(str(path)).tensors] == [qtype]
    before = tree(workdir)
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    one_line(exc, qtype.name, "cannot be dequantized")
    assert tree(workdir) == before


def test_unknown_dtype(workdir):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(workdir / "m")
    tok.save_pretrained(workdir / "m")
    before = tree(workdir)
    with pytest.raises(ModelLoadError) as exc:
        load_model(workdir / "m", dtype="float8")
    one_line(exc, "float8")
    assert tree(workdir) == before


def test_missing_chat_template(tmp_path):
    with pytest.raises(ChatTemplateError) as exc:
        from_pretrained_objects(tiny_model("llama"), tiny_tokenizer(chat_template=None))
    one_line(exc, "chat_template=")
    lm = from_pretrained_objects(tiny_model("llama"), tiny_tokenizer(chat_template=None), chat_template=CHATML)
    assert lm.format(["hi"]) == ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    # a path to a .jinja file works too
    (tmp_path / "t.jinja").write_text(CHATML)
    lm = from_pretrained_objects(
        tiny_model("llama"), tiny_tokenizer(chat_template=None), chat_template=str(tmp_path / "t.jinja")
    )
    assert lm.format(["hi"]) == ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]


# --- prompts -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


@pytest.mark.parametrize(
    ("harmful", "harmless", "words"),
    [
        ([], HARMLESS, ["0 prompt"]),
        (HARMFUL, [], ["harmless", "0 prompt"]),
        (HARMFUL[:1], HARMLESS, ["1 prompt", "at least 2"]),
        (HARMFUL, HARMLESS[:1], ["1 prompt"]),
        ([*HARMFUL, ""], HARMLESS, ["#6", "empty"]),
        (HARMFUL, ["ok", "   "], ["#1", "empty"]),
        (HARMFUL, ["ok", None], ["#1"]),
        ("How do I pick a lock?", HARMLESS, ["not one string"]),
        (HARMFUL, "hello", ["not one string"]),
    ],
)
def test_bad_prompt_sets(lm, workdir, harmful, harmless, words):
    with pytest.raises(PromptError) as exc:
        capture(lm, harmful, harmless)
    one_line(exc, *words)
    assert tree(workdir) == {}


@pytest.mark.parametrize("positions", [[0], [1], [-1, 2], [-1, -1], ["gen", "gen"], [], ["last"], [-1.0], [True]])
def test_bad_positions(lm, positions):
    with pytest.raises(PromptError) as exc:
        capture(lm, HARMFUL[:2], HARMLESS[:2], positions=positions)
    one_line(exc)


def test_position_before_prompt_start_and_bad_batch_size(lm):
    with pytest.raises(PromptError) as exc:
        capture(lm, HARMFUL[:2], HARMLESS[:2], positions=[-10_000])
    one_line(exc, "-10000", "smaller offset")
    with pytest.raises(PromptError) as exc:
        capture(lm, HARMFUL[:2], HARMLESS[:2], batch_size=0)
    one_line(exc, "batch_size")


def test_generate_without_prompts(lm):
    with pytest.raises(PromptError) as exc:
        lm.generate([])
    one_line(exc)


# --- directions, layers, scales ------------------------------------------------------------------------------

H = 64
_v = torch.randn(H, generator=torch.Generator().manual_seed(0))
BAD_DIRECTIONS = {
    "wrong_dim": (torch.ones(H + 1), "hidden size is 64"),
    "wrong_rank": (torch.ones(1, 1, H), "hidden size is 64"),
    "nan": (torch.cat([torch.ones(H - 1), torch.tensor([float("nan")])]), "NaN or Inf"),
    "inf": (torch.cat([torch.ones(H - 1), torch.tensor([float("inf")])]), "NaN or Inf"),
    "zero": (torch.zeros(H), "zero norm"),
    "zero_row": (torch.stack([_v, torch.zeros(H)]), "zero norm"),
    "dependent": (torch.stack([_v, -2.5 * _v]), "linearly dependent"),
    "dependent3": (torch.stack([_v, torch.ones(H), _v + 3 * torch.ones(H)]), "linearly dependent"),
    "not_tensor": ([1.0] * H, "torch.Tensor"),
}


def _ablate(lm, d):
    with ablate(lm, d):
        pass


def _orthogonalize(lm, d):
    orthogonalize(lm, d)


def _induce(lm, d):
    with induce(lm, d, 1.0):
        pass


def _add(lm, d):
    with add(lm, d, 1.0):
        pass


def _combine(lm, d):
    directions.combine([d], lm.hidden_size)


OPS = {"ablate": _ablate, "orthogonalize": _orthogonalize, "induce": _induce, "add": _add, "combine": _combine}


@pytest.mark.parametrize(
    ("op", "bad"),
    # combine flattens [..., hidden] stacks by design, so a 3-D stack is not an error there
    [(op, bad) for op in OPS for bad in BAD_DIRECTIONS if (op, bad) != ("combine", "wrong_rank")],
)
def test_bad_direction(lm, op, bad):
    vec, words = BAD_DIRECTIONS[bad]
    before = params(lm.model)
    with pytest.raises(DirectionError) as exc:
        OPS[op](lm, vec)
    one_line(exc, words)
    assert same_params(lm.model, before)
    assert all(not w.module._forward_hooks for w in lm.anatomy.all_writers() + lm.anatomy.embeddings)
    assert all(not layer._forward_pre_hooks for layer in lm.anatomy.layers)


def test_zero_direction_from_identical_means(lm):
    """At the embedding point the template suffix is the same for both sets: a clear error, not NaNs."""
    acts = capture(lm, HARMFUL[:2], HARMLESS[:2], positions=[-1])
    r = directions.mean_diff(acts)[0]
    with pytest.raises(DirectionError) as exc:
        _ablate(lm, r)
    one_line(exc, "zero norm")


@pytest.mark.parametrize("layer", [99, 3, -4])
def test_layer_out_of_range(lm, layer):
    before = params(lm.model)
    calls = [
        lambda: _enter(ablate(lm, _v, layers=[layer])),
        lambda: _enter(ablate(lm, _v, scale={layer: 1.0})),
        lambda: orthogonalize(lm, _v, layers=[0, layer]),
        lambda: _enter(induce(lm, _v, 1.0, layers=[layer])),
        lambda: _enter(add(lm, _v, 1.0, layers=[layer])),
    ]
    for call in calls:
        with pytest.raises(LayerError) as exc:
            call()
        one_line(exc, str(layer), "0..2")
    ds = directions.DirectionSet(torch.randn(lm.num_layers + 1, 1, H), [-1], "mean_diff")
    with pytest.raises(LayerError) as exc:
        ds[layer + 1 if layer > 0 else layer - 1]  # directions also exist for the last layer's output
    one_line(exc, "out of range", "0..3")
    assert same_params(lm.model, before)


def _enter(ctx):
    with ctx:
        pass


@pytest.mark.parametrize(
    "kwargs",
    [{"scale": -0.5}, {"scale": {0: 1.0, 2: -1.0}}, {"scale": float("nan")}, {"embedding_scale": -1.0}],
)
def test_bad_scale(lm, kwargs):
    before = params(lm.model)
    with pytest.raises(AbliterateError) as exc:
        _enter(ablate(lm, _v, **kwargs))
    one_line(exc)
    exactly(exc, AbliterateError)
    clone = from_pretrained_objects(copy.deepcopy(lm.model), lm.tokenizer)
    with pytest.raises(AbliterateError) as exc:
        orthogonalize(clone, _v, **kwargs)
    one_line(exc)
    assert same_params(clone.model, before), "a refused edit must not have edited (or untied) anything"
    assert clone.model.lm_head.weight is clone.model.model.embed_tokens.weight
    assert same_params(lm.model, before)


def test_induce_needs_a_coefficient_per_layer(lm):
    with pytest.raises(AbliterateError) as exc:
        _enter(induce(lm, _v, {0: 1.0}, layers=[0, 1]))
    one_line(exc, "[1]")


# --- saving --------------------------------------------------------------------------------------------------


def saved_lm(tmp_path: Path):
    """A tiny model written to ``tmp_path/in`` and loaded back with load_model."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(tmp_path / "in")
    tok.save_pretrained(tmp_path / "in")
    return load_model(tmp_path / "in")


def test_save_refuses_existing_directory(lm, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = tree(tmp_path)
    with pytest.raises(OutputError) as exc:
        lm.save(out)
    one_line(exc, "already exists")
    assert tree(tmp_path) == before
    # an existing file is refused even with overwrite
    (tmp_path / "file").write_text("x")
    before = tree(tmp_path)
    with pytest.raises(OutputError) as exc:
        lm.save(tmp_path / "file", overwrite=True)
    one_line(exc, "not a directory")
    assert tree(tmp_path) == before
    # overwrite replaces the directory as a whole, leaving no temporary siblings
    lm.save(out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]


def test_save_refuses_input_directory_and_its_parents(tmp_path):
    lm = saved_lm(tmp_path)
    assert lm.local_path == (tmp_path / "in").resolve()
    before = tree(tmp_path)
    for target in (tmp_path / "in", tmp_path / "in" / ".." / "in", tmp_path, tmp_path.parent):
        with pytest.raises(OutputError) as exc:
            lm.save(target, overwrite=True)
        one_line(exc, "input model")
    assert tree(tmp_path) == before


def test_failed_save_leaves_nothing(lm, tmp_path, monkeypatch):
    def broken(directory, *args, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    model = copy.deepcopy(lm.model)
    monkeypatch.setattr(model, "save_pretrained", broken)
    broken_lm = from_pretrained_objects(model, lm.tokenizer)
    with pytest.raises(RuntimeError, match="disk full"):
        broken_lm.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # a failed overwrite keeps the old directory as it was
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    before = tree(tmp_path)
    with pytest.raises(RuntimeError, match="disk full"):
        broken_lm.save(tmp_path / "out", overwrite=True)
    assert tree(tmp_path) == before
