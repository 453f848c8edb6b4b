"""The projection maths shared by runtime hooks and weight edits."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from abliterate.arch.anatomy import Anatomy, Writer
from abliterate.errors import AbliterateError, ArchitectureError, DirectionError
from abliterate.ops.hooks import HookSet
from abliterate.ops.kernel import project_out
from abliterate.ops.placement import hook_device

MAX_TAPS = 16  # the longest causal filter after a writer that writer_basis reads off

Scale = float | Mapping[int, float]


@torch.no_grad()
def norm_gain(norm: nn.Module, hidden: int) -> tuple[torch.Tensor, bool]:
    """Elementwise gain of a norm and whether it removes the mean first (a LayerNorm; an RMSNorm does not), read off
    by normalizing a mean-free vector of +-1 entries ``y`` and ``-y`` (the halved difference is ``g * y / rms(y)``,
    free of any bias) and ``y + 3`` (the same output only when the mean is removed)."""
    param = next(norm.parameters(), None)
    if param is None:  # a norm without a gain (an L2 or plain RMS normalization)
        param = torch.empty(0)
    device = hook_device(norm) or param.device  # an offloaded norm computes where its hook says
    y = torch.ones(hidden, dtype=torch.float64)
    y[1::2] = -1.0
    if hidden % 2:
        y[-1] = 0.0
    probe = torch.stack([y, -y, y + 3.0]).to(device=device, dtype=param.dtype)
    out = norm(probe[:, None, :]).reshape(3, hidden).double().cpu()
    rms = float(y.pow(2).mean().sqrt())
    gain = torch.where(y != 0, (out[0] - out[1]) / 2 * rms / torch.where(y != 0, y, 1.0), 0.0)
    if hidden % 2:  # the last entry of y is 0: read its gain off a probe with a 1 there
        z = torch.zeros(hidden, dtype=torch.float64)
        z[-1], z[0] = 1.0, -1.0
        pair = norm(torch.stack([z, -z]).to(device=device, dtype=param.dtype)[:, None, :]).reshape(2, hidden)
        gain[-1] = float(pair[0, -1].double() - pair[1, -1].double()) / 2 * float(z.pow(2).mean().sqrt())
    centered = float((out[2] - out[0]).norm()) <= 1e-3 * float(out[0].norm()) + 1e-6
    return gain.float(), centered


def is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


@torch.no_grad()
def filter_taps(module: nn.Module, hidden: int) -> torch.Tensor | None:
    """``[D, hidden]`` taps ``a_d`` of a per-channel causal linear filter ``y(t) = sum_d a_d * x(t - d)`` (a
    depthwise causal convolution plus its skip), read off its response to an impulse and checked on a random
    input; None when ``module`` is no such filter (or a longer one than :data:`MAX_TAPS`)."""
    param = next(module.parameters(), None)
    if param is None or not param.dtype.is_floating_point:
        return None
    device = hook_device(module) or param.device

    def run(x: torch.Tensor) -> torch.Tensor | None:
        try:
            out = module(x.to(device, param.dtype))
        except Exception:  # a module that cannot take a plain (batch, time, hidden) probe is no such filter
            return None
        out = out[0] if isinstance(out, tuple) else out
        return out.double().cpu() if isinstance(out, torch.Tensor) and out.shape == x.shape else None

    impulse = torch.zeros(1, 2 * MAX_TAPS, hidden, dtype=torch.float64)
    impulse[0, 0] = 1.0
    response = run(impulse)
    if response is None or float(response[0, MAX_TAPS:].abs().max()) > 0:
        return None
    taps = response[0, :MAX_TAPS]
    x = torch.randn(1, 2 * MAX_TAPS, hidden, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = run(x)
    want = sum(taps[d] * torch.nn.functional.pad(x, (0, 0, d, 0))[:, : x.shape[1]] for d in range(MAX_TAPS))
    tolerance = 1e-4 if param.dtype == torch.float32 or param.dtype == torch.float64 else 2e-2
    if got is None or float((got - want).norm()) > tolerance * float(want.norm()):
        return None
    used = (taps.abs().sum(-1) > 0).nonzero()
    return taps[: int(used.max()) + 1].float() if len(used) else None


def hook_writer(hooks: HookSet, writer: Writer, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Attach a runtime edit of ``writer`` where its write is (see :attr:`Writer.hook_input`)."""
    (hooks.on_input if writer.hook_input else hooks.on_output)(writer.hook_module, fn)


def writer_basis(writer: Writer, basis: torch.Tensor, hidden: int) -> torch.Tensor:
    """The basis to remove from a writer's raw output so that what reaches the residual has none of it.

    Without a post-norm that is ``basis`` itself (a constant writer: its own component is subtracted). With an
    RMSNorm of gain ``g`` after the writer, removing ``g * r`` from the writer's output makes the normalized output
    orthogonal to ``r``; with a LayerNorm, ``P (g * r)`` with ``P`` the mean removal (its bias is a writer of its own).
    With a per-channel causal filter ``y(t) = sum_d a_d * x(t - d)`` (Inkling's short convolution plus its skip),
    ``y(t) . r = sum_d x(t - d) . (a_d * r)``: removing every ``a_d * r`` (an orthonormal basis of them) from the
    writer's output makes what reaches the residual orthogonal to ``r`` at every position.
    """
    device = writer.weight.device
    if device.type == "meta":  # a module tree without weights (streaming edit): the basis lives on the CPU
        device = torch.device("cpu")
    if writer.post_norm is None:
        return basis.to(device)
    if not is_norm(writer.post_norm):
        taps = filter_taps(writer.post_norm, hidden)
        if taps is None:
            raise ArchitectureError(
                f"{writer.name}'s output passes {type(writer.post_norm).__name__}, neither a norm nor a per-channel "
                "causal linear filter; abliterate cannot edit this writer exactly"
            )
        vectors = (basis.double()[:, None, :] * taps.double()[None]).reshape(-1, hidden)
        u, sv, _ = torch.linalg.svd(vectors.T, full_matrices=False)
        if float(sv[0]) < 1e-8:
            raise DirectionError(f"the filter after {writer.name} zeroes this direction; pick another layer")
        return u[:, sv > sv[0] * 1e-6].T.contiguous().float().to(device)
    gain, centered = norm_gain(writer.post_norm, hidden)
    scaled = basis.double() * gain.double()
    if centered:
        scaled = scaled - scaled.mean(dim=-1, keepdim=True)
    if (scaled.norm(dim=-1) < 1e-8).any():
        raise DirectionError(f"the post-norm after {writer.name} zeroes this direction; pick another layer")
    q, r = torch.linalg.qr(scaled.T)
    q = q * torch.sign(r.diagonal())
    return q.T.contiguous().float().to(device)


def ablate_fn(basis: torch.Tensor, scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A hook function removing ``scale`` times the component along ``basis`` from its input."""
    cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def fn(x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = basis.to(x.device)
        return project_out(x, cache[key], scale)

    return fn


def writer_fn(writer: Writer, basis: torch.Tensor, scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The runtime twin of editing ``writer``, for a hook on :attr:`Writer.hook_module`'s output: the projection
    of :func:`ablate_fn`, or for a constant writer the subtraction of ``scale`` times its bias's component (the
    module's output carries other writes too, which their own hooks edit)."""
    if not writer.is_bias:
        return ablate_fn(basis, scale)

    def fn(x: torch.Tensor) -> torch.Tensor:
        b = writer.weight.detach().to(x.device, torch.promote_types(x.dtype, torch.float32))
        u = basis.to(b.device, b.dtype)
        return (x - scale * (b @ u.T) @ u).to(x.dtype)

    return fn


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


def embedding_scale_of(
    layers: Sequence[int] | None, scale: Scale, embeddings: bool | None, embedding_scale: float | None
) -> float:
    """How much of the direction the embeddings lose: ``embedding_scale``, else ``scale`` (1 for a per-layer map),
    when ``embeddings`` (default: when every layer is edited), else 0."""
    use = (layers is None) if embeddings is None else embeddings
    value = embedding_scale if embedding_scale is not None else (1.0 if isinstance(scale, Mapping) else scale)
    if value < 0:
        raise AbliterateError(f"embedding_scale is negative ({value}); use a value >= 0")
    return float(value) if use else 0.0
