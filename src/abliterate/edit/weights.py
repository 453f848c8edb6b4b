"""Permanent edits: orthogonalize the weights that write into the residual stream.

``W <- W - s * r r^T W`` on each writer's output axis (and ``b <- b - s (b.r) r`` for biases),
computed in float32 or better, chunk by chunk, and cast back to the parameter's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from abliterate.arch.anatomy import Writer
from abliterate.arch.projection import Scale
from abliterate.edit.direction_edit import DirectionEdit
from abliterate.edit.plan import apply_plan
from abliterate.errors import AbliterateError, ArchitectureError, DirectionError
from abliterate.lm.model import LoadedModel
from abliterate.measure.directions import Direction, as_basis
from abliterate.ops.placement import is_offloaded


@dataclass
class EditReport:
    """What an edit changed: parameter names and whether the input/output embeddings were untied."""

    edited: list[str] = field(default_factory=list)
    untied: bool = False


def _check_in_memory(writers: list[Writer]) -> None:
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
    The plan of the :class:`~abliterate.edit.direction_edit.DirectionEdit`, applied in place for good.

    Args:
        lm: the loaded model (in memory: not quantized or offloaded).
        direction: a :class:`Direction`, a ``[hidden]`` vector or a ``[k, hidden]`` subspace.
        layers: the layers whose writers are edited (default: all).
        scale: the fraction of the component removed, one number or ``{layer: scale}``.
        embeddings: edit the embeddings too (default: when all layers are edited).
        embedding_scale: the fraction removed from the embeddings (default: ``scale``, or layer 0's).
        norm_preserving: keep each writer's per-input-unit output norm.

    Returns:
        The :class:`EditReport`: the names of the edited weights and whether tied embeddings were untied.

    Example:
        >>> from abliterate import orthogonalize
        >>> orthogonalize(lm, r[14])
        >>> lm.save("out/")
    """
    plan = DirectionEdit(direction, layers, scale, embeddings, embedding_scale, norm_preserving).plan(lm)
    _check_in_memory([e.writer for e in plan.edits])
    done = apply_plan(lm, plan, "weights", permanent=True)
    return EditReport(done.edited, done.untied)


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

    Args:
        lm: the loaded model (in memory; its embeddings must write straight into the residual).
        direction: a single :class:`Direction` or ``[hidden]`` vector.
        coefficient: the component pinned at the inputs of layers ``0..through_layer``.
        through_layer: the last layer at whose input the component is pinned.

    Returns:
        The :class:`EditReport` of the orthogonalization (edited weight names, untied embeddings).

    Example:
        >>> from abliterate import bake_induction
        >>> bake_induction(lm, r[14], 12.5, through_layer=14)
        >>> lm.save("induced/")
    """
    layer = lm.anatomy.check_layer(through_layer)
    basis = as_basis(direction, lm.hidden_size)
    if basis.shape[0] != 1:
        raise DirectionError("bake_induction takes a single direction")
    normed = [w.name for w in lm.anatomy.embeddings if w.post_norm is not None or w.hook_input or w.is_bias]
    if normed:
        raise ArchitectureError(
            f"{lm.name}'s embeddings pass a norm before the residual ({', '.join(normed)}), so a constant added to "
            "the rows does not pin the residual's component; induce at run time instead (induce, or apply "
            "--runtime-check --mode induce)"
        )
    report = orthogonalize(lm, basis[0], layers=range(layer), embeddings=True, embedding_scale=1.0)
    emb = lm.anatomy.embeddings[0]
    gain = _embedding_gain(lm)
    emb.weight.data += (coefficient / gain * basis[0]).to(emb.weight.device, emb.weight.dtype)
    return report
