"""The runtime twin of one writer's weight edit, as hooks: what :func:`abliterate.edit.plan.apply_plan` attaches in
``"hooks"`` mode (and so what :func:`abliterate.ablate` runs). A plain edit projects the writer's output; a
norm-preserving one also scales the writer's inputs by each input unit's norm gain (an embedding: each output row
gets its old norm back).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from abliterate.arch.anatomy import Writer
from abliterate.arch.projection import ablate_fn, hook_writer, writer_fn
from abliterate.errors import AbliterateError
from abliterate.ops.hooks import HookSet
from abliterate.ops.placement import flat_hooks


def _norm_kept_fn(basis: torch.Tensor, scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Runtime twin of a norm-preserving embedding edit: project, then give each output row its old norm."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        work = x.to(torch.promote_types(x.dtype, torch.float32))
        u = basis.to(work.device, work.dtype)
        new = work - scale * (work @ u.T) @ u
        return (new * (work.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp_min(1e-12))).to(x.dtype)

    return fn


def _gain_fn(gain: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        work = x.to(torch.promote_types(x.dtype, torch.float32))
        return (work * gain.to(work.device, work.dtype)).to(x.dtype)

    return fn


def _stored_weight(w: Writer) -> torch.Tensor:
    """A writer's float weight, read from accelerate's weights map when the module is offloaded."""
    weight = w.weight
    if not weight.dtype.is_floating_point:
        raise AbliterateError(
            f"{w.name} is quantized, so a norm-preserving edit of it has no runtime twin; "
            "use norm_preserving=False, or edit the unquantized model"
        )
    if weight.device.type != "meta":
        return weight
    for hook in flat_hooks(w.module):
        weights_map = getattr(hook, "weights_map", None)
        if weights_map is not None and w.param in weights_map:
            return weights_map[w.param]
    raise AbliterateError(f"cannot read the offloaded weight of {w.name}; use norm_preserving=False")


@torch.no_grad()
def _input_gain(w: Writer, basis: torch.Tensor, scale: float) -> torch.Tensor:
    """Per input unit, old norm / edited norm of its output vector: what a norm-preserving edit multiplies by."""
    weight = _stored_weight(w)
    x = weight.to(torch.promote_types(weight.dtype, torch.float32))
    x = x if w.out_axis == 1 else x.T  # [input units, hidden]
    u = basis.to(x.device, x.dtype)
    new = x - scale * (x @ u.T) @ u
    return x.norm(dim=1) / new.norm(dim=1).clamp_min(1e-12)


def hook_edit(hooks: HookSet, writer: Writer, basis: torch.Tensor, scale: float, norm_preserving: bool) -> None:
    """Add to ``hooks`` the runtime twin of removing ``scale`` times ``basis`` from ``writer``'s weights."""
    if not norm_preserving or writer.is_bias:
        hook_writer(hooks, writer, writer_fn(writer, basis, scale))
    elif writer.layer is None:
        hook_writer(hooks, writer, _norm_kept_fn(basis, scale))
    elif writer.weight.dim() == 3:
        raise AbliterateError(
            f"a norm-preserving edit of the fused experts {writer.name} has no runtime twin (its gains act "
            "inside the experts module); edit the weights (a model in memory) or use norm_preserving=False"
        )
    else:
        hooks.on_input(writer.hook_module, _gain_fn(_input_gain(writer, basis, scale)))
        hooks.on_output(writer.hook_module, ablate_fn(basis, scale))
