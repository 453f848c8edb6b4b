"""Permanent edits: orthogonalize the weights that write into the residual stream.

``W <- W - s * r r^T W`` on each writer's output axis (and ``b <- b - s (b.r) r`` for biases),
computed in float32 or better, chunk by chunk, and cast back to the parameter's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .anatomy import Writer
from .directions import Direction, as_basis
from .errors import AbliterateError, DirectionError
from .interventions import edit_plan
from .model import LoadedModel
from .placement import flat_hooks
from .projection import Scale, project_out

CHUNK = 8192


@dataclass
class EditReport:
    """What an edit changed: parameter names and whether the input/output embeddings were untied."""

    edited: list[str] = field(default_factory=list)
    untied: bool = False


def _rows(weight: torch.Tensor, basis: torch.Tensor, scale: float, norm_preserving: bool) -> None:
    """Edit a 2-D tensor whose last axis is the residual axis, in place, CHUNK rows at a time."""
    for start in range(0, weight.shape[0], CHUNK):
        block = weight[start : start + CHUNK]
        work = block.to(torch.promote_types(block.dtype, torch.float32))
        new = project_out(work, basis, scale)
        if norm_preserving:
            new = new * (work.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        block.copy_(new.to(block.dtype))


def _columns(weight: torch.Tensor, basis: torch.Tensor, scale: float, norm_preserving: bool) -> None:
    """Edit a 2-D tensor whose first axis is the residual axis (``nn.Linear``), CHUNK columns at a time."""
    for start in range(0, weight.shape[1], CHUNK):
        block = weight[:, start : start + CHUNK]
        work = block.T.to(torch.promote_types(block.dtype, torch.float32))
        new = project_out(work, basis, scale)
        if norm_preserving:
            new = new * (work.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        block.copy_(new.T.to(block.dtype))


def project_tensor(
    weight: torch.Tensor, out_axis: int, basis: torch.Tensor, scale: float = 1.0, norm_preserving: bool = False
) -> None:
    """Project ``basis`` out of ``weight`` along ``out_axis`` in place (2-D, or 3-D fused experts).

    With ``norm_preserving`` every input unit's output vector keeps its original norm.
    """
    basis = basis.to(weight.device)
    if weight.dim() == 3:  # [experts, ., .]: edit expert by expert
        for e in range(weight.shape[0]):
            project_tensor(weight[e], out_axis - 1, basis, scale, norm_preserving)
        return
    if weight.dim() == 1:
        weight.copy_(project_out(weight[None], basis, scale)[0])
        return
    (_columns if out_axis == 0 else _rows)(weight, basis, scale, norm_preserving)


def _tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    return (
        out is not None
        and out.weight is emb.weight
        or (out is not None and out.weight.data_ptr() == emb.weight.data_ptr())
    )


def untie_embeddings(model: nn.Module) -> bool:
    """Give the LM head its own copy of tied embeddings, so editing the input side leaves logits
    alone; the saved model then keeps a separate ``lm_head``. Returns whether anything was untied."""
    if not _tied(model):
        return False
    out = model.get_output_embeddings()
    out.weight = nn.Parameter(out.weight.detach().clone(), requires_grad=False)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    return True


@torch.no_grad()
def _edit(writer: Writer, basis: torch.Tensor, scale: float, norm_preserving: bool) -> list[str]:
    project_tensor(writer.weight.data, writer.out_axis, basis, scale, norm_preserving)
    names = [f"{writer.name}.{writer.param}" if writer.param == "weight" else writer.name]
    bias = writer.bias_tensor
    if bias is not None:
        bias.data.copy_(project_out(bias.data, basis, scale))
        names.append(f"{writer.name}.{writer.bias}" if writer.param == "weight" else f"{writer.name}_bias")
    return names


def _check_in_memory(lm: LoadedModel, writers: list[Writer]) -> None:
    """An offloaded weight lives in accelerate's weights map (often the checkpoint file itself), not in the
    parameter: editing the parameter would change nothing, or fail half-way."""
    off = [
        w.name
        for w in writers
        if w.weight.device.type == "meta" or any(getattr(h, "offload", False) for h in flat_hooks(w.module))
    ]
    if off:
        raise AbliterateError(
            f"{off[0]} (and {len(off) - 1} more) are offloaded by device_map, so they cannot be edited in memory; "
            "write the edited checkpoint with stream_orthogonalize (abliterate apply --stream), or load without offload"
        )


def orthogonalize(
    lm: LoadedModel,
    direction: Direction | torch.Tensor,
    *,
    layers: Sequence[int] | None = None,
    scale: Scale = 1.0,
    embeddings: bool | None = None,
    embedding_scale: float | None = None,
    norm_preserving: bool = False,
) -> EditReport:
    """Permanently remove ``direction`` from the embeddings and residual writers (in memory).

    Arguments match :func:`abliterate.ablate`; with ``norm_preserving=False`` the edited model's
    logits equal the runtime ablation's. ``norm_preserving=True`` keeps each writer's per-input-unit
    output norm (an exact, weight-only variant with no runtime twin). Save with ``lm.save(dir)``.
    """
    plan = edit_plan(lm, direction, layers, scale, embeddings, embedding_scale)
    _check_in_memory(lm, [w for w, _, _ in plan])
    report = EditReport()
    if any(w.layer is None for w, _, _ in plan):
        report.untied = untie_embeddings(lm.model)
    for writer, basis, s in plan:
        report.edited += _edit(writer, basis, s, norm_preserving)
    return report


@torch.no_grad()
def _embedding_gain(lm: LoadedModel) -> float:
    """Scalar the embedding module applies to its rows (e.g. sqrt(hidden) in Gemma)."""
    emb = lm.anatomy.embeddings[0].module
    row = int(emb.weight.float().norm(dim=-1).argmax())
    out = emb(torch.tensor([[row]], device=emb.weight.device)).float().reshape(-1)
    return float(out.norm() / emb.weight[row].float().norm())


@torch.no_grad()
def bake_induction(
    lm: LoadedModel, direction: Direction | torch.Tensor, coefficient: float, *, through_layer: int
) -> EditReport:
    """Permanent induction through a bias: pin the residual's component along ``direction`` to
    ``coefficient`` at the input of layers ``0..through_layer``.

    The embeddings and the writers of layers ``< through_layer`` are orthogonalized, and
    ``coefficient * r`` is added to every embedding row (the embedding acts as a bias on the
    residual stream, so plain transformers loads the result). The component is then exactly
    ``coefficient`` everywhere in the residual up to layer ``through_layer``'s input, mid-layer
    residuals included. Runtime twin: ``ablate(lm, r, layers=range(through_layer),
    embeddings=True)`` together with ``add(lm, r, coefficient, layers=[0])``.
    """
    layer = lm.anatomy.check_layer(through_layer)
    basis = as_basis(direction, lm.hidden_size)
    if basis.shape[0] != 1:
        raise DirectionError("bake_induction takes a single direction")
    report = orthogonalize(lm, basis[0], layers=range(layer), embeddings=True, embedding_scale=1.0)
    emb = lm.anatomy.embeddings[0]
    gain = _embedding_gain(lm)
    emb.weight.data += (coefficient / gain * basis[0]).to(emb.weight.device, emb.weight.dtype)
    return report
