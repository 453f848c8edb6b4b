"""Tiny random configs for every causal-LM type transformers registers (see tests/test_architectures.py)."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import CONFIG_MAPPING, PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from abliterate import ArchitectureError, LoadedModel, ablate, orthogonalize
from abliterate.arch.miniature import SIZES as MINIATURE_SIZES
from abliterate.arch.miniature import randomize
from abliterate.arch.selfcheck import checked_anatomy
from abliterate.arch.streams import as_streams
from abliterate.arch.verify import forward, probe_ids
from abliterate.ops.hooks import HookSet

VOCAB = 128
MINIATURE_ONLY = {
    "n_embd",
    "n_head",
    "word_embed_proj_dim",
    "rotary_dim",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
}

# Size fields, by the name configs use, and a tiny value for each (only fields a config has are passed): the
# miniature's (abliterate.arch.miniature.SIZES, the same values), less the few the registry leaves at each config's
# default, plus the fields of the encoder-decoder and hybrid configs the registry also builds.
SIZES: dict[str, Any] = {
    **{k: v for k, v in MINIATURE_SIZES.items() if k not in MINIATURE_ONLY},
    "num_hidden_layers": 2,
    "max_position_embeddings": 128,
    "first_k_dense_replace": 1,
    "encoder_ffn_dim": 96,
    "decoder_layers": 2,
    "encoder_layers": 2,
    "encoder_attention_heads": 4,
    "swa_head_dim": 16,
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2,
    "linear_head_dim": 16,
    "linear_num_heads": 4,
    "unpadded_vocab_size": VOCAB,
    "rel_extent": 16,
}

QWEN4 = {
    "indexer_n_heads": 2,
    "indexer_kv_heads": 1,
    "indexer_head_dim": 16,
    "indexer_budget": 16,
    "indexer_compress_ratio": 4,
    "hc_lowrank": 16,
    "ple_embed_dim": 64,
}

# type -> extra constructor kwargs (hybrids: layer kinds; odd field names)
OVERRIDES: dict[str, dict[str, Any]] = {
    "bamba": {"attn_layer_indices": [1]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "falcon_h1": {"mamba_d_ssm": 128},
    "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 1},
    "zamba2": {"layers_block_type": ["linear_attention", "hybrid"]},
    "zaya": {"num_experts_per_tok": 1},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "xlnet": {"d_head": 16},
    "codegen": {"rotary_dim": 8},
    "gptj": {"rotary_dim": 8},
    "longcat_flash": {"head_dim": 8, "num_layers": 2},
    "dbrx": {
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 96, "moe_num_experts": 4, "moe_top_k": 2},
    },
    "reformer": {
        "is_decoder": True,
        "attn_layers": ["local", "lsh"],
        "axial_pos_shape": [4, 32],
        "axial_pos_embds_dim": [32, 32],
        "attention_head_size": 16,
        "feed_forward_size": 96,
        "local_attn_chunk_length": 4,
        "lsh_attn_chunk_length": 4,
    },
    "xlstm": {"embedding_dim": 64, "num_heads": 4, "chunk_size": 8, "qk_dim_factor": 1.0},
    "musicgen": {"num_codebooks": 1},
    "musicgen_melody": {"num_codebooks": 1},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "qwen4_exp_text": QWEN4,
    "qwen4_exp": QWEN4,
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
    "gemma3n_text": {"num_kv_shared_layers": 0},
    "axk2": {"index_topk": 16},
    "deepseek_v32": {"index_topk": 16},
    "glm4_moe_lite": {"index_topk": 16},
    "glm_moe_dsa": {"index_topk": 16},
    # its loop (layers 6..17 run three times by default) must exist in the tiny model too: layers 2..3 run twice
    "inkling2_loop_text": {
        "num_hidden_layers": 4,
        "n_layers_per_attn_res_block": 2,
        "loop_layer_index_start": 2,
        "loop_layer_index_end": 4,
        "loop_num_passes": 2,
        "layer_types": ["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"],
    },
}


AFTER_BUILD: dict[str, Callable[[torch.nn.Module], None]] = {
    "xmod": lambda m: m.set_default_language("en_XX"),
    # ZAYA's per-channel scales on the embeddings and on the residual start at one: make them differ per channel
    "zaya": lambda m: [p.add_(0.3 * torch.randn_like(p)) for n, p in m.named_parameters() if n.endswith("_scale")],
}


def _fields(cls: type[PreTrainedConfig]) -> set[str]:
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return names | set(getattr(cls, "attribute_map", {}))


def _default(cls: type[PreTrainedConfig]) -> PreTrainedConfig | None:
    try:
        return cls()
    except Exception:  # some configs cannot be built with their own defaults
        return None


def _layer_kinds(default: PreTrainedConfig | None, fields: set[str], layers: int) -> dict[str, Any]:
    """Per-layer list fields (``layer_types``, ``mlp_layer_types``, ...) cut to the fewest layers that still hold
    every kind the full-size default config mixes (hybrids: attention and linear-attention/SSM layers)."""
    if default is None:
        return {}
    n = getattr(default, "num_hidden_layers", None)
    if not isinstance(n, int):
        return {}
    lists = {
        k: v
        for k, v in vars(default).items()
        if k in fields and isinstance(v, list) and len(v) == n and v and all(isinstance(x, str) for x in v)
    }
    if not lists:
        return {}
    chosen: list[int] = []
    seen: set[tuple[str, str]] = set()
    for i in range(n):
        kinds = {(k, v[i]) for k, v in lists.items()}
        if kinds - seen:
            chosen.append(i)
            seen |= kinds
    for i in range(n):
        if len(chosen) >= layers:
            break
        if i not in chosen:
            chosen.append(i)
    chosen.sort()
    return {"num_hidden_layers": len(chosen), **{k: [v[i] for i in chosen] for k, v in lists.items()}}


def tiny_kwargs(
    cls: type[PreTrainedConfig], extra: dict[str, Any] | None = None, sizes: dict[str, Any] | None = None
) -> dict[str, Any]:
    sizes = SIZES if sizes is None else sizes
    fields = _fields(cls)
    kwargs = {k: v for k, v in sizes.items() if k in fields}
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if name in fields:
            kwargs[name] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[name]
    if "kv_lora_rank" in fields:  # MLA: as many key/value heads as query heads
        kwargs["num_key_value_heads"] = SIZES["num_attention_heads"]
    default = _default(cls)
    kwargs.update(_layer_kinds(default, fields, SIZES["num_hidden_layers"]))
    extra = dict(extra or {})
    for name, sub in (getattr(cls, "sub_configs", None) or {}).items():
        if not (isinstance(sub, type) and issubclass(sub, PreTrainedConfig)) or sub.__name__ == "AutoConfig":
            sub = type(getattr(default, name, None))
        if isinstance(sub, type) and issubclass(sub, PreTrainedConfig) and sub is not PreTrainedConfig:
            kwargs[name] = tiny_kwargs(sub, dict(extra.pop(name, {})), sizes)
            if sub.model_type:
                kwargs[name]["model_type"] = sub.model_type
    kwargs.update(extra)
    return kwargs


def causal_lm_class(model_type: str) -> type[torch.nn.Module]:
    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def config_class(model_type: str) -> type[PreTrainedConfig]:
    """The type's own config, unless the causal-LM class takes only a part of it (the text or decoder config)."""
    own, wanted = CONFIG_MAPPING[model_type], causal_lm_class(model_type).config_class
    return wanted if getattr(own, "sub_configs", None) and not issubclass(own, wanted) else own


def tiny_config(model_type: str) -> PreTrainedConfig:
    cls = config_class(model_type)
    return cls(**tiny_kwargs(cls, OVERRIDES.get(model_type)))


@torch.no_grad()
def tiny_registry_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(model_type)
    model = causal_lm_class(model_type)._from_config(config, dtype=torch.float32)
    if model_type in AFTER_BUILD:
        AFTER_BUILD[model_type](model)
    return randomize(model)


CAUSAL_TYPES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)

# Types whose checkpoints are encoders or encoder-decoders (transformers exposes their decoder, or the encoder run
# causally, as a causal LM). They may be refused; the support target counts the other, decoder-only, types.
ENCODER_TYPES = frozenset(
    [
        "bart",
        "bert",
        "bert-generation",
        "big_bird",
        "bigbird_pegasus",
        "blenderbot",
        "blenderbot-small",
        "camembert",
        "data2vec-text",
        "electra",
        "ernie",
        "marian",
        "mbart",
        "megatron-bert",
        "mvp",
        "pegasus",
        "plbart",
        "prophetnet",
        "rembert",
        "roberta",
        "roberta-prelayernorm",
        "roc_bert",
        "roformer",
        "trocr",
        "whisper",
        "xlm",
        "xlm-roberta",
        "xlm-roberta-xl",
        "xmod",
        "xlnet",
        "musicgen",
        "musicgen_melody",
        "moss_transcribe_diarize",
        "git",
    ]
)


@dataclass
class Outcome:
    """What the registry check found for one type: ``status`` is ``supported``, ``refused`` (a clear
    ArchitectureError, in ``detail``) or ``unbuildable`` (no tiny model builds and runs; why, in ``detail``)."""

    model_type: str
    status: str
    detail: str = ""
    writers: int = 0
    per_layer: tuple[int, int] = (0, 0)  # fewest and most writers in a layer
    post_norms: bool = False  # some writer's output is normalized before it is added
    layers_path: str = ""
    discovered: list[str] = field(default_factory=list)
    runtime_vs_weights: float = math.nan  # max |logits(runtime ablation) - logits(orthogonalized weights)|
    residual_leak: float = math.nan  # max |h.r| / |h| over every layer's input and output under ablation
    effect: float = math.nan  # max |logits change| the ablation causes
    # a refused type loaded with residual_only=True: the runtime residual-stream ablation's leak and effect, or why
    # that load is refused too
    runtime_only: str = ""
    runtime_leak: float = math.nan
    runtime_effect: float = math.nan


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = forward(model, ids)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def _direction_and_ids(hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(hidden, generator=gen), dim=0)
    return u, torch.randint(3, VOCAB, (2, 8), generator=gen)


def _ablated(lm: LoadedModel, u: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Logits under ``ablate(lm, u)`` and the largest ``|h.u| / |h|`` over every layer's input and output (each
    stream of a hyper-connection residual on its own)."""
    seen: list[torch.Tensor] = []
    with HookSet() as watch:
        for layer in lm.anatomy.layers:
            watch.watch_input(layer, lambda x: seen.append(as_streams(x.float(), lm.hidden_size)))
            watch.watch_output(layer, lambda x: seen.append(as_streams(x.float(), lm.hidden_size)))
        with ablate(lm, u):
            runtime = _logits(lm.model, ids)
    leak = max(float((h @ u).abs().max() / h.norm(dim=-1).max().clamp_min(1e-12)) for h in seen)
    return runtime, leak


def _runtime_only(model: torch.nn.Module, outcome: Outcome) -> Outcome:
    """A refused type, loaded for runtime ablation of the residual stream instead."""
    try:
        anatomy = checked_anatomy(model, residual_only=True)
    except ArchitectureError as exc:
        outcome.runtime_only = str(exc)
        return outcome
    lm = LoadedModel(model, None, anatomy, outcome.model_type)
    u, ids = _direction_and_ids(anatomy.hidden_size)
    base = _logits(model, ids)
    runtime, outcome.runtime_leak = _ablated(lm, u, ids)
    outcome.runtime_effect = float((runtime - base).abs().max())
    return outcome


@torch.no_grad()
def check_type(model_type: str, build: Callable[[str], torch.nn.Module] | None = None) -> Outcome:
    """Build the tiny model (``build``, default :func:`tiny_registry_model`), find and verify its anatomy, then
    compare runtime ablation of a random direction with the orthogonalized weights and look for the direction in the
    residual stream."""
    try:
        model = (build or tiny_registry_model)(model_type)
        forward(model, probe_ids(model))
    except Exception as exc:  # any failure to build or run the tiny model
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return Outcome(model_type, "unbuildable", f"{type(exc).__name__}: {first}")
    try:
        anatomy = checked_anatomy(model)
    except ArchitectureError as exc:
        return _runtime_only(model, Outcome(model_type, "refused", str(exc)))
    lm = LoadedModel(model, None, anatomy, model_type)
    u, ids = _direction_and_ids(anatomy.hidden_size)
    base = _logits(model, ids)
    runtime, leak = _ablated(lm, u, ids)
    edited_model, edited_anatomy = copy.deepcopy((model, anatomy))
    orthogonalize(LoadedModel(edited_model, None, edited_anatomy, model_type), u)
    edited = _logits(edited_model, ids)
    return Outcome(
        model_type,
        "supported",
        writers=len(anatomy.all_writers()),
        per_layer=(min(map(len, anatomy.writers)), max(map(len, anatomy.writers))),
        post_norms=any(w.post_norm is not None for w in anatomy.all_writers()),
        layers_path=anatomy.layers_path,
        discovered=list(anatomy.discovered),
        runtime_vs_weights=float((runtime - edited).abs().max()),
        residual_leak=leak,
        effect=float((runtime - base).abs().max()),
    )
