"""The edit the direction API describes, as one value: ``(direction, layers, scale, embeddings, embedding_scale,
norm_preserving)``. :func:`abliterate.ablate`, :func:`abliterate.orthogonalize` and
:func:`abliterate.checkpoint.stream_orthogonalize` each build a :class:`DirectionEdit` from their arguments and hand
its plan to the one edit path (:func:`abliterate.edit.plan.apply_plan`, or the streaming writer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from abliterate.arch.projection import Scale, embedding_scale_of, layer_scales
from abliterate.edit.plan import EditPlan, ResidualEdit, assemble
from abliterate.lm.model import LoadedModel
from abliterate.measure.directions import Direction, as_basis


@dataclass(frozen=True)
class DirectionEdit:
    """The edit the direction API describes (``ablate``, ``orthogonalize``, ``stream_orthogonalize``): remove
    ``direction`` (a unit vector, or a ``[k, hidden]`` set, orthonormalized) from the writers of ``layers`` (default
    all) at ``scale`` (a number or ``{layer: scale}``), and from the embeddings at ``embedding_scale`` (default: the
    scale, 1 for a map) when ``embeddings`` (default: when all layers are edited); ``norm_preserving`` as in
    :class:`~abliterate.edit.spec.EditSpec`. The arguments are checked when the plan is built."""

    direction: Direction | torch.Tensor
    layers: Sequence[int] | None = None
    scale: Scale = 1.0
    embeddings: bool | None = None
    embedding_scale: float | None = None
    norm_preserving: bool = False

    def plan(self, lm: LoadedModel, *, residual: bool = False) -> EditPlan:
        """This edit's plan for ``lm``. ``residual``: on a model loaded ``residual_only``, the runtime projection of
        the residual stream itself (:class:`ResidualEdit`) instead of the writers' edit (which it cannot have)."""
        if not (residual and lm.anatomy.residual_only):
            lm.anatomy.require_weights()
        basis = as_basis(self.direction, lm.hidden_size)
        layers = None if self.layers is None else list(self.layers)
        scales = layer_scales(lm.anatomy, layers, self.scale)
        emb_scale = embedding_scale_of(self.layers, self.scale, self.embeddings, self.embedding_scale)
        if lm.anatomy.residual_only:
            return EditPlan([], self.norm_preserving, residual=ResidualEdit(basis, scales, emb_scale))
        return assemble(lm, emb_scale, lambda i, _w: scales.get(i, 0.0), lambda _layer: basis, self.norm_preserving)


def edit_plan(
    lm: LoadedModel,
    direction: Direction | torch.Tensor,
    layers: Sequence[int] | None,
    scale: Scale,
    embeddings: bool | None,
    embedding_scale: float | None,
) -> EditPlan:
    """``DirectionEdit(direction, layers, scale, embeddings, embedding_scale).plan(lm)``."""
    return DirectionEdit(direction, layers, scale, embeddings, embedding_scale).plan(lm)
