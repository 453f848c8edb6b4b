"""Constant writers and the embeddings' post-norm, found by the name patterns in :mod:`abliterate.arch.patterns`.

A 1-D hidden-size parameter added to the residual stream outside any Linear (``BIAS_WRITERS``) is a writer of its
own, and so is the bias of a LayerNorm on the embeddings (``EMBEDDING_NORM_PATTERNS``), which also becomes the
embeddings' post-norm: removing ``P (g * r)`` (``P`` the mean-removal, ``g`` the gain) from the embeddings and ``r``
from the norm's bias leaves the norm's output orthogonal to ``r``."""

from __future__ import annotations

import re

import torch
from torch import nn

from abliterate.arch.patterns import BIAS_WRITERS, EMBEDDING_NORM_PATTERNS, OTHER_TOWERS
from abliterate.arch.writer import Writer


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def layer_bias_writers(layer: nn.Module, index: int, prefix: str, hidden: int) -> list[Writer]:
    """The constant writers of one decoder layer (see ``BIAS_WRITERS``)."""
    found: list[Writer] = []
    for rel, param in layer.named_parameters():
        if param.dim() != 1 or param.shape[0] != hidden:
            continue
        for pattern, hook_path, kind in BIAS_WRITERS:
            if re.fullmatch(pattern, rel) and (hook := _get(layer, hook_path)) is not None:
                owner, _, pname = rel.rpartition(".")
                module = _get(layer, owner) if owner else layer
                assert module is not None
                if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)) or type(module).__name__ == "Conv1D":
                    break  # a Linear's own bias is edited with its weight
                found.append(Writer(f"{prefix}.{rel}", module, pname, 0, None, index, kind=kind, hook=hook))
                break
    return found


def embedding_norm_writers(model: nn.Module, embeddings: list[Writer], hidden: int) -> list[Writer]:
    """Give ``embeddings`` the norm the model applies to them before the first layer (``EMBEDDING_NORM_PATTERNS``),
    and return that norm's bias as a writer (none without a bias)."""
    for name, module in model.named_modules():
        if re.search(OTHER_TOWERS, name) or not any(re.fullmatch(p, name) for p in EMBEDDING_NORM_PATTERNS):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != (hidden,):
            continue
        for w in embeddings:
            w.post_norm = module
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.shape == (hidden,):
            return [Writer(f"{name}.bias", module, "bias", 0, None, None, kind="embedding")]
        return []
    return []
