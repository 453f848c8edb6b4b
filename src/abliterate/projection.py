"""The projection maths shared by runtime hooks and weight edits."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .anatomy import Anatomy, Writer
from .errors import AbliterateError, DirectionError
from .placement import hook_device

Scale = float | Mapping[int, float]


def project_out(x: torch.Tensor, basis: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``x - scale * (x U^T) U`` along the last axis, computed in float32 (or better) and cast back."""
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    u = basis.to(work.device, work.dtype)
    return (work - scale * (work @ u.T) @ u).to(x.dtype)


@torch.no_grad()
def norm_gain(norm: nn.Module, hidden: int) -> torch.Tensor:
    """Elementwise gain of an RMSNorm, read off by normalizing a vector of ones (whose RMS is 1)."""
    param = next(norm.parameters())
    device = hook_device(norm) or param.device  # an offloaded norm computes where its hook says
    gain = norm(torch.ones(1, hidden, device=device, dtype=param.dtype))
    return gain.reshape(-1).float()


def writer_basis(writer: Writer, basis: torch.Tensor, hidden: int) -> torch.Tensor:
    """The basis to remove from a writer's raw output so that what reaches the residual has none of it.

    Without a post-norm that is ``basis`` itself. With an RMSNorm of gain ``g`` after the writer,
    removing ``g * r`` from the writer's output makes the normalized output orthogonal to ``r``.
    """
    device = writer.weight.device
    if device.type == "meta":  # a module tree without weights (streaming edit): the basis lives on the CPU
        device = torch.device("cpu")
    if writer.post_norm is None:
        return basis.to(device)
    gain = norm_gain(writer.post_norm, hidden).cpu().double()
    scaled = basis.double() * gain
    if (scaled.norm(dim=-1) < 1e-8).any():
        raise DirectionError(f"the post-norm after {writer.name} zeroes this direction; pick another layer")
    q, r = torch.linalg.qr(scaled.T)
    q = q * torch.sign(r.diagonal())
    return q.T.contiguous().float().to(device)


def layer_scales(anatomy: Anatomy, layers: list[int] | range | None, scale: Scale) -> dict[int, float]:
    """Resolve ``layers`` and ``scale`` (one number or ``{layer: scale}``) to ``{layer: scale}``."""
    if isinstance(scale, Mapping):
        chosen = dict(scale) if layers is None else {i: scale[i] for i in layers if i in scale}
    else:
        chosen = {i: float(scale) for i in (range(anatomy.num_layers) if layers is None else layers)}
    out: dict[int, float] = {}
    for layer, s in chosen.items():
        idx = anatomy.check_layer(int(layer))
        if not isinstance(s, (int, float)) or s != s:
            raise AbliterateError(f"scale for layer {layer} must be a number, got {s!r}")
        if s < 0:
            raise AbliterateError(f"scale for layer {layer} is negative ({s}); use a value >= 0")
        if s:
            out[idx] = float(s)
    return out
