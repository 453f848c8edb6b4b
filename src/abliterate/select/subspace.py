"""Multi-direction refusal subspaces, with k chosen on validation prompts.

Two constructions of a k-dimensional subspace, both orthonormalized and ablated jointly:

* ``pca``: the top-k right singular vectors of the per-prompt differences between harmful
  activations and the harmless mean at one layer (needs ``capture(..., keep_per_prompt=True)``);
  the first one is sign-aligned with the mean difference.
* ``layers``: the mean-difference directions of k neighbouring layers around a chosen layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from abliterate.edit.interventions import ablate
from abliterate.errors import DirectionError
from abliterate.lm.model import LoadedModel
from abliterate.measure.capture import Activations, Position
from abliterate.measure.directions import Direction, as_basis, mean_diff
from abliterate.select.scorer import Scorer
from abliterate.select.sweep import check_validation, validation_scorer


def pca(acts: Activations, layer: int, position: Position = -1, k: int = 2) -> Direction:
    """Top-k principal directions of ``harmful_i - mean(harmless)`` at ``layer``."""
    if acts.harmful is None:
        raise DirectionError("pca needs per-prompt activations; capture with keep_per_prompt=True")
    if not 1 <= k <= acts.harmful.shape[0]:
        raise DirectionError(
            f"k must be between 1 and the number of harmful prompts ({acts.harmful.shape[0]}), got {k}"
        )
    p = acts.position_index(position)
    x = acts.harmful[:, layer, p].double() - acts.harmless_mean[layer, p]
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    basis = vh[:k].clone()
    diff = acts.harmful_mean[layer, p] - acts.harmless_mean[layer, p]
    if float(basis[0] @ diff) < 0:
        basis[0] = -basis[0]
    return Direction(as_basis(basis, x.shape[-1]), layer, position, f"pca(k={k})")


def neighbour_layers(acts: Activations, layer: int, position: Position = -1, k: int = 2) -> Direction:
    """Mean-difference directions of the k layers nearest ``layer`` (itself first), orthonormalized."""
    ds = mean_diff(acts)
    last = ds.num_points - 2  # directions exist for layer inputs 0..num_layers-1
    order = sorted(range(last + 1), key=lambda i: (abs(i - layer), i))[:k]
    if len(order) < k:
        raise DirectionError(f"only {len(order)} layers available for a {k}-layer subspace")
    stacked = torch.stack([ds[i, position].vector for i in order])
    return Direction(as_basis(stacked, stacked.shape[-1]), layer, position, f"layers(k={k})")


BUILDERS = {"pca": pca, "layers": neighbour_layers}


@dataclass
class SubspaceScore:
    k: int
    bypass: float
    kl: float
    passed: bool


@dataclass
class SubspaceChoice:
    kind: str
    layer: int
    position: Position
    scores: list[SubspaceScore]
    chosen_k: int | None
    direction: Direction | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "layer": self.layer,
            "position": self.position,
            "chosen_k": self.chosen_k,
            "scores": [asdict(s) for s in self.scores],
        }


def choose_k(
    lm: LoadedModel,
    acts: Activations,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    *,
    layer: int,
    position: Position = -1,
    kind: str = "pca",
    ks: Sequence[int] = (1, 2, 3, 4),
    kl_threshold: float = 0.1,
    batch_size: int = 16,
    scorer: Scorer | None = None,
) -> SubspaceChoice:
    """Score subspaces of each size in ``ks`` (bypass and KL, generation-free) and keep the
    best bypass whose KL stays under ``kl_threshold``. ``scorer``: as in :func:`~abliterate.select.sweep.select`."""
    if kind not in BUILDERS:
        raise DirectionError(f"unknown subspace kind '{kind}'; use one of {', '.join(BUILDERS)}")
    harmful_val, harmless_val = list(harmful_val), list(harmless_val)
    check_validation(acts, harmful_val, harmless_val)
    scorer = validation_scorer(lm, acts, harmful_val, harmless_val, batch_size, scorer)
    scores: list[SubspaceScore] = []
    built: dict[int, Direction] = {}
    for k in ks:
        direction = BUILDERS[kind](acts, layer, position, k)
        built[k] = direction
        with ablate(lm, direction):
            got = scorer.score()
        scores.append(SubspaceScore(k, got.refusal, got.kl, got.kl <= kl_threshold and not math.isnan(got.refusal)))
    passed = [s for s in scores if s.passed]
    best = min(passed, key=lambda s: s.bypass) if passed else None
    return SubspaceChoice(kind, layer, position, scores, best.k if best else None, built[best.k] if best else None)
