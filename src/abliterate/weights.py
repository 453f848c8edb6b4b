"""Permanent edits: orthogonalize the weights that write into the residual stream.

``W <- W - s * r r^T W`` on each writer's output axis (and ``b <- b - s (b.r) r`` for biases),
computed in float32 or better, chunk by chunk, and cast back to the parameter's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from .anatomy import Writer
from .directions import Direction, as_basis
from .errors import AbliterateError, DirectionError
from .interventions import edit_plan
from .model import LoadedModel
from .placement import is_offloaded
from .projection import Scale, project_out

WORK_ELEMENTS = 1 << 22  # 16 MiB of float32: large enough for fast matmuls, small next to any real weight


@dataclass
class EditReport:
    """What an edit changed: parameter names and whether the input/output embeddings were untied."""

    edited: list[str] = field(default_factory=list)
    untied: bool = False


def work_buffer(weight: torch.Tensor, elements: int = WORK_ELEMENTS) -> torch.Tensor:
    """A reusable scratch buffer for :func:`project_tensor` in the compute dtype of ``weight``."""
    return torch.empty(elements, device=weight.device, dtype=torch.promote_types(weight.dtype, torch.float32))


class Rows(Protocol):
    """A 2-D tensor visited in row blocks, in memory or on disk: ``load`` fills a float block with rows
    ``start ..``, ``store`` writes a block back (on disk: strictly in order, each block once)."""

    shape: tuple[int, int]

    def load(self, start: int, out: torch.Tensor) -> torch.Tensor: ...

    def store(self, start: int, values: torch.Tensor) -> None: ...


class TensorRows:
    """:class:`Rows` over an in-memory tensor."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.shape = t, (t.shape[0], t.shape[1])

    def load(self, start: int, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.t[start : start + len(out)])

    def store(self, start: int, values: torch.Tensor) -> None:
        self.t[start : start + len(values)].copy_(values)


def _spans(shape: tuple[int, int], work: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(first row, view of the work buffer for that row block) covering all rows."""
    rows, cols = shape
    step = max(1, work.numel() // max(cols, 1))
    if step < min(rows, 16):  # a buffer too small for this tensor: grow it for this call only
        work, step = torch.empty(16 * cols, device=work.device, dtype=work.dtype), 16
    return [(i, work[: min(step, rows - i) * cols].view(-1, cols)) for i in range(0, rows, step)]


def _project_rows(src: Rows, u: torch.Tensor, scale: float, norm_preserving: bool, work: torch.Tensor) -> None:
    """The residual is the last axis: each row loses ``s (row U^T) U`` independently. One pass."""
    for i, w in _spans(src.shape, work):
        src.load(i, w)
        old = w.norm(dim=1, keepdim=True) if norm_preserving else None
        w.addmm_(w @ u.T, u, alpha=-scale)
        src.store(i, w if old is None else w.mul_(old / w.norm(dim=1, keepdim=True).clamp_min(1e-12)))


def _project_columns(src: Rows, u: torch.Tensor, scale: float, norm_preserving: bool, work: torch.Tensor) -> None:
    """The residual is the first axis (``nn.Linear``): ``C = U W`` summed over row blocks, then ``W -= s U^T C``
    block by block (two passes; three when norm-preserving, to get each column's new norm first)."""
    spans = _spans(src.shape, work)
    cols = src.shape[1]
    coeff = torch.zeros(u.shape[0], cols, device=work.device, dtype=u.dtype)
    old, new = (torch.zeros(cols, device=work.device, dtype=u.dtype) for _ in range(2))
    for i, w in spans:
        coeff.addmm_(u[:, i : i + len(w)], src.load(i, w))
        if norm_preserving:
            old += (w * w).sum(0)

    def edited(i: int, w: torch.Tensor) -> torch.Tensor:
        return src.load(i, w).addmm_(u[:, i : i + len(w)].T, coeff, alpha=-scale)

    for i, w in spans if norm_preserving else ():
        new += (edited(i, w) ** 2).sum(0)
    gain = old.sqrt() / new.sqrt().clamp_min(1e-12) if norm_preserving else None
    for i, w in spans:
        src.store(i, edited(i, w) if gain is None else edited(i, w).mul_(gain))


def project_rows(
    src: Rows, out_axis: int, basis: torch.Tensor, scale: float, norm_preserving: bool, work: torch.Tensor
) -> None:
    """Project ``basis`` out of a 2-D :class:`Rows` along ``out_axis`` (0: Linear, 1: embedding/Conv1D rows),
    in float row blocks of ``work``; ``basis`` must already be in ``work``'s device and dtype."""
    (_project_columns if out_axis == 0 else _project_rows)(src, basis, scale, norm_preserving, work)


@torch.no_grad()
def project_tensor(
    weight: torch.Tensor,
    out_axis: int,
    basis: torch.Tensor,
    scale: float = 1.0,
    norm_preserving: bool = False,
    *,
    work: torch.Tensor | None = None,
) -> None:
    """Project ``basis`` (orthonormal rows) out of ``weight`` along ``out_axis``, in place: 2-D, 3-D fused
    experts (edited expert by expert) or 1-D.

    The maths runs in float32 (float64 for float64 weights) in row blocks of one reused buffer (``work``,
    from :func:`work_buffer`; allocated here when not given) and each block is cast back once, so a bf16
    weight is rounded exactly once. With ``norm_preserving`` every input unit's output vector keeps its norm.
    """
    if weight.dim() == 1:
        weight.copy_(project_out(weight[None], basis, scale)[0])
        return
    if work is None:
        per = weight.shape[-1] * (weight.shape[-2] if weight.dim() == 3 else weight.shape[0])
        work = work_buffer(weight, min(WORK_ELEMENTS, per))
    u = basis.to(work.device, work.dtype)
    if weight.dim() == 3:
        for e in range(weight.shape[0]):
            project_tensor(weight[e], out_axis - 1, u, scale, norm_preserving, work=work)
        return
    project_rows(TensorRows(weight), out_axis, u, scale, norm_preserving, work)


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
    off = [w.name for w in writers if is_offloaded(w.module)]
    quantized = [w for w in writers if not w.weight.dtype.is_floating_point]
    if quantized:
        raise AbliterateError(
            f"{quantized[0].name} is quantized ({type(quantized[0].module).__name__}), so it cannot be edited in "
            "place; write the edited checkpoint from the original weights with stream_orthogonalize "
            "(abliterate apply --stream)"
        )
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
