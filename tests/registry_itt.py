"""Tiny random image-text-to-text models (VLMs) for every type transformers registers only under
``AutoModelForImageTextToText`` (the others are in the causal-LM registry): built by passing sub-config sizes to the
constructor, checked text-only like the causal LMs (see tests/test_architectures.py)."""

from __future__ import annotations

from typing import Any

import torch
import transformers
from registry import OVERRIDES, SIZES, randomize, tiny_kwargs
from transformers import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

ITT_TYPES = sorted(t for t in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)

# The text sizes, plus what vision towers and projectors call theirs.
ITT_SIZES: dict[str, Any] = {
    **SIZES,
    "image_size": 32,
    "patch_size": 8,
    "depth": 2,
    "embed_dim": 64,
    "num_heads": 4,
    "out_hidden_size": 64,
    "projection_dim": 64,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_channels": 3,
    "vision_feature_layer": -1,
    "mm_tokens_per_image": 4,
    "image_seq_length": 4,
}


def _mrope(section: list[int]) -> dict[str, Any]:
    """Multimodal rotary sections that fit the tiny head size."""
    return {
        "text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}}
    }


ITT_OVERRIDES: dict[str, dict[str, Any]] = {
    **{t: _mrope([2, 3, 3]) for t in ("qwen2_vl", "qwen2_5_vl", "paddleocr_vl", "glm4v", "glm46v", "glm_ocr", "glmga")},
    "glm4v_moe": _mrope([1, 1, 2]),
}


def itt_class(model_type: str) -> type[torch.nn.Module]:
    return getattr(transformers, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type])


@torch.no_grad()
def tiny_itt_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cls = CONFIG_MAPPING[model_type]
    extra = {**OVERRIDES.get(model_type, {}), **ITT_OVERRIDES.get(model_type, {})}
    config = cls(**tiny_kwargs(cls, extra, ITT_SIZES))
    return randomize(itt_class(model_type)._from_config(config, dtype=torch.float32))
