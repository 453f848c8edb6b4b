"""One residual writer: a parameter whose output is added to the residual stream."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Writer:
    """One parameter that writes into the residual stream.

    ``out_axis`` is the weight axis of size ``hidden_size`` (the residual side). ``module`` is the
    module whose forward output is that write (the experts module for fused experts).
    ``post_norm`` is what the write passes before it is added, if anything: a norm (RMSNorm, or LayerNorm) or a
    per-channel causal linear filter (a depthwise convolution with its skip); see
    :func:`abliterate.arch.projection.writer_basis`.
    ``kind`` is ``"attn"`` (attention or another token mixer), ``"mlp"`` (MLP,
    every MoE expert, shared experts), ``"embedding"`` or ``"other"`` (a custom writer pattern matching neither),
    from :func:`writer_kind`.

    A 1-D ``param`` (:attr:`is_bias`) is a constant write: a LayerNorm's bias, or a bias added outside any Linear.
    ``module`` holds it; ``hook`` is then the module whose (first) output carries it, where runtime edits act.
    ``hook_input``: runtime edits act on ``hook``'s input instead (an embedding whose lookup passes a norm inside the
    embedding module: the hook sits on that norm's input, where the rows are).
    """

    name: str
    module: nn.Module
    param: str
    out_axis: int
    bias: str | None
    layer: int | None
    post_norm: nn.Module | None = None
    kind: str = "other"
    hook: nn.Module | None = None
    hook_input: bool = False

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.param)

    @property
    def bias_tensor(self) -> torch.Tensor | None:
        return None if self.bias is None else getattr(self.module, self.bias)

    @property
    def is_bias(self) -> bool:
        """A constant write (a 1-D parameter added as it is): runtime edits subtract its component."""
        return self.weight.dim() == 1

    @property
    def hook_module(self) -> nn.Module:
        """The module whose (first) output (or input, with :attr:`hook_input`) runtime edits change."""
        return self.module if self.hook is None else self.hook
