"""Residual streams wider than one vector: hyper-connection models (DeepSeek V4, HY V4, Qwen4-exp) carry several
copies of the residual, as a ``(batch, tokens, streams, hidden)`` tensor or flattened to ``(batch, tokens,
streams * hidden)``. Each stream only ever gets writes added with a scalar weight, so a direction removed from every
write is absent from every stream. Capture reads their mean; runtime hooks act on each stream."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .hooks import HookSet
from .projection import project_out


def as_streams(x: torch.Tensor, hidden: int) -> torch.Tensor:
    """``x`` with its last axis split into ``(streams, hidden)`` when it is a multiple of ``hidden`` (a view)."""
    width = x.shape[-1]
    if width == hidden or width % hidden:
        return x
    return x.unflatten(-1, (width // hidden, hidden))


def stream_mean(x: torch.Tensor, hidden: int) -> torch.Tensor:
    """``(batch, tokens, hidden)``: the residual itself, or the mean of its streams."""
    view = as_streams(x, hidden)
    return view.mean(-2) if view.dim() == 4 else view


def per_stream(fn: Callable[[torch.Tensor], torch.Tensor], hidden: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` (which acts on the last, hidden-size axis) applied to every stream of a residual of any layout."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        return fn(as_streams(x, hidden)).reshape(x.shape)

    return apply


def residual_hooks(
    hooks: HookSet,
    layers: Sequence[nn.Module],
    basis: torch.Tensor,
    hidden: int,
    scales: Mapping[int, float],
    embedding_scale: float = 0.0,
) -> None:
    """Project ``basis`` out of the residual stream itself: at the input and output of each layer in ``scales``
    (scaling the component by ``1 - scale`` each time) and, for the embeddings, at layer 0's input."""
    if embedding_scale:
        hooks.on_input(layers[0], per_stream(lambda x, s=float(embedding_scale): project_out(x, basis, s), hidden))
    for i, s in sorted(scales.items()):
        fn = per_stream(lambda x, s=s: project_out(x, basis, s), hidden)
        hooks.on_input(layers[i], fn)
        hooks.on_output(layers[i], fn)
