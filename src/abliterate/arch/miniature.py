"""A miniature of a checkpoint's architecture: its own config with every width shrunk (hidden 64, a few heads and
experts, vocabulary 128) and every flag and every layer kept, random weights with norm gains off one and biases off
zero. The streaming edit never runs the real model, so it verifies the anatomy on this instead: the same layers, the
same writers, one short probe."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from abliterate.arch.anatomy import Anatomy
from abliterate.arch.selfcheck import checked_anatomy
from abliterate.errors import ArchitectureError

# Width fields, by the names configs use, and the miniature's value (only fields a config already has are set).
SIZES: dict[str, Any] = {
    "vocab_size": 128,
    "ngram_vocab_size_base": 256,  # Qwen4-exp PLE n-gram table (20M rows by default)
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32,
    "kv_lora_rank": 16,
    "q_lora_rank": 24,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "qk_head_dim": 16,
    "v_head_dim": 16,
    "n_group": 1,
    "topk_group": 1,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "mamba_d_state": 8,
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_n_groups": 1,
    "mamba_chunk_size": 8,
    "d_model": 64,
    "n_embd": 64,
    "n_head": 4,
    "n_inner": 96,
    "ffn_dim": 96,
    "word_embed_proj_dim": 64,
    "decoder_ffn_dim": 96,
    "decoder_attention_heads": 4,
    "state_size": 8,
    "time_step_rank": 8,
    "rotary_dim": 8,
    "moe_num_experts": 4,
    "num_experts_per_token": 2,
    "index_head_dim": 16,
    "index_n_heads": 2,
    "index_topk": 4,
    "num_nextn_predict_layers": 0,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _shrink(values: dict[str, Any]) -> dict[str, Any]:
    def small(key: str, value: Any) -> Any:  # never larger than the checkpoint's (0 shared experts stays 0)
        if key in SIZES and isinstance(value, int) and not isinstance(value, bool):
            return min(value, SIZES[key])
        return value

    out = {k: small(k, v) for k, v in values.items()}
    if "kv_lora_rank" in out and "num_key_value_heads" in out:  # MLA: as many key/value heads as query heads
        out["num_key_value_heads"] = out.get("num_attention_heads", SIZES["num_attention_heads"])
    for key, value in values.items():
        if isinstance(value, dict) and "model_type" in value:  # a sub-config (text_config, ...)
            out[key] = _shrink(value)
    out.pop("quantization_config", None)
    return out


def miniature(model: nn.Module, seed: int = 0) -> nn.Module:
    """A small random copy of ``model``'s architecture (``model`` may live on the meta device): its config's widths
    shrunk, its layer count and every flag kept. Raises :class:`ArchitectureError` when no such copy builds."""
    config = getattr(model, "config", None)
    if config is None:
        raise ArchitectureError(f"{type(model).__name__} has no config to build a small copy from")
    try:
        small = type(config)(**_shrink(copy.deepcopy(config.to_dict())))
        torch.manual_seed(seed)
        copy_ = type(model)._from_config(small, dtype=torch.float32)
    except Exception as exc:  # a config whose fields depend on each other in ways the shrinking breaks
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise ArchitectureError(
            f"cannot build a small copy of {type(model).__name__}'s config to verify its anatomy "
            f"({type(exc).__name__}: {first})"
        ) from exc
    return randomize(copy_)


@torch.no_grad()
def randomize(model: nn.Module) -> nn.Module:
    """Weights far from their initialisation (norm gains off one, biases off zero, matrices at a small random scale),
    so that no writer or post-norm hides behind a symmetry; eval mode."""
    for name, p in model.named_parameters():
        if "norm" in name or "ln_" in name:
            p.add_(0.3 * torch.randn_like(p))
        elif name.endswith("bias"):
            p.normal_(0, 0.05)
        elif p.dim() >= 2:
            p.normal_(0, 0.08)
    return model.eval()


def check_on_miniature(
    model: nn.Module, anatomy: Anatomy, layers_path: str | None, writer_patterns: Sequence[str] | None
) -> None:
    """Verify ``anatomy`` (found by name patterns on ``model``, possibly on the meta device) on a miniature of the
    same architecture: the probe must pass there with the same writers in every layer and nothing only probing
    finds. Raises :class:`ArchitectureError` in one line otherwise."""
    cls = type(model).__name__
    small = miniature(model)
    try:
        mini = checked_anatomy(small, layers_path=layers_path, writer_patterns=writer_patterns)
    except ArchitectureError as exc:
        why = f"a small copy of this checkpoint's architecture fails the anatomy check: {exc}"
        raise ArchitectureError(why) from None
    except Exception as exc:  # the copy builds but does not run: its shrunk widths disagree somewhere
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise ArchitectureError(
            f"a small copy of {cls}'s config to verify its anatomy on does not run ({type(exc).__name__}: {first})"
        ) from exc
    if mini.discovered:
        raise ArchitectureError(
            f"{cls} needs writers that only probing finds ({', '.join(mini.discovered[:4])}), and the streaming edit "
            "uses the name patterns alone; load the model through transformers to edit it"
        )

    def names(a: Anatomy) -> list[list[str]]:
        return [sorted(w.name.removeprefix(f"{a.layers_path}.{i}.") for w in ws) for i, ws in enumerate(a.writers)]

    real, checked = names(anatomy), names(mini)
    if real != checked or len(anatomy.embeddings) != len(mini.embeddings):
        layer = next((i for i, (a, b) in enumerate(zip(real, checked, strict=False)) if a != b), None)
        where = f"layer {layer}: {real[layer]} vs {checked[layer]}" if layer is not None else "the embeddings"
        raise ArchitectureError(
            f"the writers found in {cls}'s checkpoint and in a small copy of it differ ({where}); load the model "
            "through transformers to edit it"
        )
