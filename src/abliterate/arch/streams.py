"""Residual streams wider than one vector: hyper-connection models (DeepSeek V4, HY V4, Qwen4-exp) carry several
copies of the residual, as a ``(batch, tokens, streams, hidden)`` tensor or flattened to ``(batch, tokens,
streams * hidden)``. Each stream only ever gets writes added with a scalar weight, so a direction removed from every
write is absent from every stream. Capture reads their mean; runtime hooks act on each stream."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from abliterate.arch.projection import ablate_fn
from abliterate.ops.hooks import HookSet

Calls = list[list[tuple[torch.Tensor, torch.Tensor]]]  # per layer: (input, output) of every call


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    d = float(den.norm())
    return float(num.norm()) / d if d > 0 else (0.0 if float(num.norm()) == 0 else float("inf"))


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
    """Project ``basis`` out of the residual stream itself, removing ``scale`` of its component once at each point:
    the embeddings at layer 0's input (``embedding_scale``), the output of each layer in ``scales``, and the input of
    each such layer after the first, unless that input is the very tensor the previous layer's hook returned (so a
    partial scale is not applied twice where nothing happens between layers, and a transform between layers is
    still covered)."""
    last: list[torch.Tensor | None] = [None]

    def at_input(s: float) -> Callable[[torch.Tensor], torch.Tensor]:
        project = per_stream(ablate_fn(basis, s), hidden)
        return lambda x: x if x is last[0] else project(x)

    def at_output(s: float) -> Callable[[torch.Tensor], torch.Tensor]:
        project = per_stream(ablate_fn(basis, s), hidden)

        def fn(x: torch.Tensor) -> torch.Tensor:
            last[0] = project(x)
            return last[0]

        return fn

    if embedding_scale:
        hooks.on_input(layers[0], per_stream(ablate_fn(basis, float(embedding_scale)), hidden))
    for i, s in sorted(scales.items()):
        if i > 0:
            hooks.on_input(layers[i], at_input(s))
        hooks.on_output(layers[i], at_output(s))


# Layout checks on a probe: (input, output) of every call of every layer.


def width_error(base: Calls, hidden: int, tokens: tuple[int, ...]) -> str | None:
    """One residual of shape (batch, tokens, hidden), or several streams of it: (batch, tokens, streams, hidden)
    or flattened (batch, tokens, streams * hidden) (hyper-connections)."""
    for i, calls in enumerate(base):
        for inp, out in calls:
            view = as_streams(inp, hidden)
            if inp.shape != out.shape or view.shape[-1] != hidden or view.dim() not in (3, 4):
                return (
                    f"layer {i} takes a {tuple(inp.shape)} input and returns {tuple(out.shape)}, not one "
                    f"{hidden}-wide residual stream"
                )
            if view.shape[0] != tokens[0]:
                return (
                    f"layer {i} takes a {tuple(inp.shape)} input for a batch of {tokens[0]} x {tokens[1]} tokens: "
                    "its axes are not (batch, tokens, hidden) or (batch, tokens, streams, hidden)"
                )
    return None


def token_error(base: Calls, hidden: int, tokens: tuple[int, ...]) -> str | None:
    """A token axis longer than the input (prefix tokens, extra prediction streams along the tokens)."""
    for i, calls in enumerate(base):
        for inp, _out in calls:
            if as_streams(inp, hidden).shape[1] != tokens[1]:
                return f"layer {i} takes {as_streams(inp, hidden).shape[1]} positions for {tokens[1]} tokens"
    return None


def single_pass_error(base: Calls) -> str | None:
    """Capture reads each layer's input once per forward."""
    for i, calls in enumerate(base):
        if len(calls) > 1:
            return f"layer {i} runs {len(calls)} times in one forward pass (the layers are re-run in a loop)"
    return None


def gap_error(base: Calls, order: list[int]) -> str | None:
    """Something that changes the residual between one layer's output and the next layer's input."""
    seen = [0] * len(base)
    previous: tuple[int, torch.Tensor] | None = None
    for i in order:
        inp, out = base[i][seen[i]]
        seen[i] += 1
        if previous is not None and (inp.shape != previous[1].shape or _ratio(inp - previous[1], previous[1]) > 1e-4):
            return f"the residual changes between layer {previous[0]}'s output and layer {i}'s input"
        previous = (i, out)
    return None
