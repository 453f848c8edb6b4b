"""A tiny random Qwen2 model written as a GGUF (F32/F16/Q8_0/Q5_0 and a K-quant), for the GGUF tests: transformers
reads it back (dequantized), llama.cpp runs it, and ``run``/``apply`` write its edited copy."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
import transformers as tf
from tiny import CHATML, SPECIALS, tokenizer_json
from transformers import AutoModelForCausalLM

from abliterate.arch.miniature import randomize

H, L, HEADS, KV, FF, VOCAB = 64, 3, 4, 2, 256, 320
# GGUF name part -> stored type: every type the edit re-encodes as it is, and Q6_K, which it cannot (-> Q8_0)
TYPES = {
    "token_embd": "Q8_0",
    "attn_output": "Q5_0",
    "ffn_down": "Q6_K",
    "ffn_up": "Q4_0",
    "ffn_gate": "F16",
    "attn_q.weight": "Q8_0",
    "output": "Q8_0",
}


def tiny_qwen2(seed: int = 0, tied: bool = False, layers: int = L) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tf.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=H,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        intermediate_size=FF,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return randomize(AutoModelForCausalLM.from_config(config, dtype=torch.float32))


def random_q6_k(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Stored Q6_K bytes of a [rows, cols] tensor: random quants and scales, a small finite f16 scale per block
    (the gguf package reads Q6_K but cannot write it)."""
    rows, cols = shape
    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q6_K][1]
    raw = np.random.default_rng(seed).integers(0, 256, size=(rows, cols // 256, block_bytes), dtype=np.uint8)
    raw[..., -2:] = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    return raw.reshape(rows, -1)


def _tokens() -> list[str]:
    import json

    vocab = json.loads(tokenizer_json())["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    return [*tokens, "ab"] + [f"<|extra_{i}|>" for i in range(VOCAB - len(tokens) - 1)]  # "ab": one merge


def write_tiny_gguf(
    path: Path, *, tied: bool = False, seed: int = 0, types: dict[str, str] | None = None, layers: int = L
) -> Path:
    """The tiny model as ``path`` (a qwen2 GGUF with a byte-level BPE tokenizer and a ChatML template)."""
    model = tiny_qwen2(seed, tied, layers)
    types = TYPES if types is None else types
    w = gguf.GGUFWriter(str(path), arch="qwen2")
    w.add_name("tiny qwen2")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(float(model.config.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(model.config.rms_norm_eps))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    tokens = _tokens()
    w.add_token_list(tokens)
    kinds = [
        gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.UNUSED if "extra" in t else gguf.TokenType.NORMAL
        for t in tokens
    ]
    w.add_token_types(kinds)
    w.add_token_merges(["a b"])  # transformers reads a GGUF without merges as scored
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, layers)
    for i, (name, tensor) in enumerate(model.state_dict().items()):
        if tied and name == "lm_head.weight":
            continue
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, name
        data = tensor.numpy()
        kind = next((t for part, t in types.items() if part in gname), "F32") if data.ndim == 2 else "F32"
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            w.add_tensor(gname, data)
        elif kind == "F16":
            w.add_tensor(gname, data.astype(np.float16))
        elif kind == "Q6_K":
            w.add_tensor(
                gname, random_q6_k(data.shape, seed + i), raw_shape=random_q6_k(data.shape, 0).shape, raw_dtype=qtype
            )
        else:
            q = gguf.quants.quantize(data, qtype)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
