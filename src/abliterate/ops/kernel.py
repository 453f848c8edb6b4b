"""The weight-projection kernel shared by permanent edits, reversible plans and the streaming writer.

``W <- W - s * U^T U W`` along a weight's residual axis, computed in float32 (float64 for float64 weights)
in row blocks of one reused work buffer and cast back once per block, so a bf16 weight is rounded exactly
once. The rows may live in memory (:class:`TensorRows`), be read from one tensor and written to another
(:class:`CopyRows`, used by reversible edits so that the original is never touched) or live on disk
(``shards.FileRows``); every variant runs the same arithmetic, so the results are bit-identical.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


def project_out(x: torch.Tensor, basis: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``x - scale * (x U^T) U`` along the last axis, computed in float32 (or better) and cast back."""
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    u = basis.to(work.device, work.dtype)
    return (work - scale * (work @ u.T) @ u).to(x.dtype)


WORK_ELEMENTS = 1 << 22  # 16 MiB of float32: large enough for fast matmuls, small next to any real weight


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
    """:class:`Rows` over an in-memory tensor, edited in place."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.shape = t, (t.shape[0], t.shape[1])

    def load(self, start: int, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.t[start : start + len(out)])

    def store(self, start: int, values: torch.Tensor) -> None:
        self.t[start : start + len(values)].copy_(values)


class CopyRows(TensorRows):
    """:class:`Rows` read from ``src`` and written to ``dst`` (same shape): ``src`` is left untouched."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        super().__init__(src)
        self.dst = dst

    def store(self, start: int, values: torch.Tensor) -> None:
        self.dst[start : start + len(values)].copy_(values)


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


def _project_direct(
    weight: torch.Tensor, dst: torch.Tensor, out_axis: int, u: torch.Tensor, scale: float, norm_preserving: bool
) -> None:
    """The edit of a float32/float64 tensor (2-D, or 3-D experts batched) as two matmuls on the tensor itself:
    the blocked kernel's arithmetic without copying blocks in and out of a work buffer."""
    rows = out_axis == weight.dim() - 1  # the residual is the last axis (embeddings, Conv1D); else Linear
    axis = -1 if rows else -2  # the axis that holds one input unit's output vector
    coeff = weight @ u.T if rows else u @ weight  # [..., rows, k] or [..., k, cols]
    old = weight.norm(dim=axis, keepdim=True) if norm_preserving else None
    if dst is not weight:
        dst.copy_(weight)
    left, right = (coeff, u) if rows else (u.T, coeff)
    if weight.dim() == 3:
        dst.baddbmm_(
            left.expand(weight.shape[0], *left.shape[-2:]),
            right.expand(weight.shape[0], *right.shape[-2:]),
            alpha=-scale,
        )
    else:
        dst.addmm_(left, right, alpha=-scale)
    if old is not None:
        dst.mul_(old / dst.norm(dim=axis, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def project_tensor(
    weight: torch.Tensor,
    out_axis: int,
    basis: torch.Tensor,
    scale: float = 1.0,
    norm_preserving: bool = False,
    *,
    work: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> None:
    """Project ``basis`` (orthonormal rows) out of ``weight`` along ``out_axis``: 2-D, 3-D fused experts
    (edited expert by expert) or 1-D. In place, or into ``out`` (same shape and dtype; ``weight`` untouched).

    The maths runs in float32 (float64 for float64 weights) in row blocks of one reused buffer (``work``,
    from :func:`work_buffer`; allocated here when not given) and each block is cast back once, so a bf16
    weight is rounded exactly once. With ``norm_preserving`` every input unit's output vector keeps its norm.
    """
    dst = weight if out is None else out
    if weight.dim() == 1:
        dst.copy_(project_out(weight[None], basis, scale)[0])
        return
    if weight.dtype in (torch.float32, torch.float64):  # already the compute dtype: no block copies needed
        _project_direct(weight, dst, out_axis, basis.to(weight.device, weight.dtype), scale, norm_preserving)
        return
    if work is None:
        per = weight.shape[-1] * (weight.shape[-2] if weight.dim() == 3 else weight.shape[0])
        work = work_buffer(weight, min(WORK_ELEMENTS, per))
    u = basis.to(work.device, work.dtype)
    if weight.dim() == 3:
        for e in range(weight.shape[0]):
            project_tensor(weight[e], out_axis - 1, u, scale, norm_preserving, work=work, out=dst[e])
        return
    rows = TensorRows(weight) if out is None else CopyRows(weight, dst)
    project_rows(rows, out_axis, u, scale, norm_preserving, work)


def tied_embeddings(model: nn.Module) -> bool:
    """Whether the LM head shares its weight with the input embeddings."""
    out = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    return out is not None and (out.weight is emb.weight or out.weight.data_ptr() == emb.weight.data_ptr())
