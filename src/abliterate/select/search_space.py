"""The searched ranges of the edit space and how one Optuna trial samples an :class:`~abliterate.edit.spec.EditSpec`
from them (conditional parameters), plus the classic edit as parameters for the warm start."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from abliterate.edit.spec import METHODS, EditSpec, Kernel
from abliterate.errors import AbliterateError


class SearchError(AbliterateError):
    """A search that cannot start, resume or choose (bad budget, foreign journal, no useful trial)."""


# The upper end of each range the edit itself bounds (EditSpec.validate and Kernel.check reject more), with why.
RANGE_LIMITS: dict[str, tuple[float, str]] = {
    "direction_range": (1.0, "a fraction of the layer count (the last residual point is L)"),
    "peak_range": (1.0, "a fraction of the last layer index (a kernel peaks on a layer)"),
    "slerp_t_range": (1.0, "slerp's t is at most 1"),
}


@dataclass(frozen=True)
class SearchSpace:
    """The ranges the search samples (the identity of a journal: resuming with other ranges is refused).

    Layer positions are fractions of the layer count ``L``; the kernel of each component is a tent over
    layers (see :class:`~abliterate.edit.spec.Kernel`)."""

    methods: tuple[str, ...] = ("mean_diff", "projected")
    positions: tuple[int | str, ...] = (-1,)
    direction_range: tuple[float, float] = (0.3, 0.9)  # one direction at a float point in [a L, b L]
    per_layer: bool = True  # also try "every writer removes its own point's direction"
    max_k: int = 2  # subspaces of up to max_k neighbouring directions
    peak_range: tuple[float, float] = (0.2, 1.0)  # kernel peak, as a fraction of L - 1
    weight_range: tuple[float, float] = (0.4, 1.5)  # kernel peak weight
    mlp_optional: bool = True  # MLP writers may be left untouched
    embedding: bool = True  # embeddings on/off is searched (else off)
    norm_preserving: tuple[bool, ...] = (False, True)
    slerp_t_range: tuple[float, float] = (0.3, 1.0)

    def check(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if not self.methods or bad:
            raise SearchError(f"search methods {list(self.methods)} are not all known; use some of {list(METHODS)}")
        for name in ("direction_range", "peak_range", "weight_range", "slerp_t_range"):
            lo, hi = getattr(self, name)
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
                raise SearchError(f"search {name} is {[lo, hi]}; use two finite numbers 0 <= low <= high")
            top = RANGE_LIMITS.get(name)
            if top is not None and hi > top[0]:
                raise SearchError(f"search {name} is {[lo, hi]}; {top[1]}: use 0 <= low <= high <= {top[0]:g}")
        if not self.positions:
            raise SearchError("search positions are empty; give at least one captured position")
        if self.max_k < 1:
            raise SearchError(f"search max_k is {self.max_k}; use an integer >= 1")
        if not self.norm_preserving:
            raise SearchError("search norm_preserving choices are empty; use [false], [true] or both")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


def _choice(trial: Any, name: str, options: Sequence[Any]) -> Any:
    return options[0] if len(options) == 1 else trial.suggest_categorical(name, list(options))


def _kernel(trial: Any, prefix: str, space: SearchSpace, num_layers: int) -> Kernel:
    last = max(num_layers - 1, 1)
    peak = trial.suggest_float(f"{prefix}_peak", space.peak_range[0] * last, space.peak_range[1] * last)
    weight = trial.suggest_float(f"{prefix}_weight", *space.weight_range)
    edge = trial.suggest_float(f"{prefix}_edge", 0.0, 1.0)  # edge weight as a fraction of the peak weight
    width = trial.suggest_float(f"{prefix}_width", 1.0, float(last))
    return Kernel(peak=peak, max_weight=weight, edge_weight=edge * weight, width=width)


def suggest(trial: Any, space: SearchSpace, num_layers: int) -> EditSpec:
    """Sample one :class:`EditSpec` from ``space`` through an Optuna trial (conditional parameters)."""
    method = _choice(trial, "method", space.methods)
    slerp_t = trial.suggest_float("slerp_t", *space.slerp_t_range) if method == "slerp" else 1.0
    position = _choice(trial, "position", space.positions)
    scope = _choice(trial, "scope", ("global", "per_layer") if space.per_layer else ("global",))
    index = None
    if scope == "global":
        lo, hi = space.direction_range
        index = trial.suggest_float("direction_index", lo * num_layers, hi * num_layers)
    k = trial.suggest_int("k", 1, space.max_k) if space.max_k > 1 else 1
    attn = _kernel(trial, "attn", space, num_layers)
    mlp = (
        _kernel(trial, "mlp", space, num_layers)
        if _choice(trial, "mlp", (True, False) if space.mlp_optional else (True,))
        else None
    )
    embedding = 1.0 if _choice(trial, "embedding", (False, True) if space.embedding else (False,)) else 0.0
    norm = _choice(trial, "norm_preserving", space.norm_preserving)
    return EditSpec(method, slerp_t, position, index, k, attn, mlp, embedding, bool(norm))


def full_params(
    space: SearchSpace, num_layers: int, layer: int, method: str, position: int | str, scale: float = 1.0
) -> dict[str, Any]:
    """Optuna parameters of the classic edit (direction of ``layer`` at ``scale`` on every writer and the
    embeddings), clamped into ``space``: the warm start enqueued before the sampler takes over."""
    last = max(num_layers - 1, 1)
    lo, hi = space.direction_range
    params: dict[str, Any] = {}
    if len(space.methods) > 1:
        params["method"] = method if method in space.methods else space.methods[0]
    if params.get("method", space.methods[0]) == "slerp":
        params["slerp_t"] = space.slerp_t_range[1]
    if len(space.positions) > 1:
        params["position"] = position if position in space.positions else space.positions[-1]
    if space.per_layer:
        params["scope"] = "global"
    params["direction_index"] = min(max(float(layer), lo * num_layers), hi * num_layers)
    if space.max_k > 1:
        params["k"] = 1
    weight = min(max(scale, space.weight_range[0]), space.weight_range[1])
    peak = min(max(0.5 * last, space.peak_range[0] * last), space.peak_range[1] * last)
    for prefix in ("attn", "mlp"):
        params.update({f"{prefix}_peak": peak, f"{prefix}_weight": weight, f"{prefix}_edge": 1.0})
        params[f"{prefix}_width"] = float(last)
    if space.mlp_optional:
        params["mlp"] = True
    if space.embedding:
        params["embedding"] = True
    if len(space.norm_preserving) > 1:
        params["norm_preserving"] = False
    return params


@dataclass(frozen=True)
class SearchSettings:
    """How :func:`abliterate.select.search.search` searches: the space, the budget (finished trials wanted, a
    resumed journal counting its own, and/or a wall-clock ``timeout`` in seconds that bounds the front check too),
    the sampler seed and random startup trials, the journal (with ``resume`` and the ``identity`` it must match),
    how many front trials to check by generation, and the policy's KL budget (``allow_over_budget``: keep a pick
    over it instead of refusing) or a ``trial`` chosen by hand. These defaults are the CLI's too (the ``[search]``
    config table takes them from here)."""

    space: SearchSpace | None = None  # None: SearchSpace()
    trials: int | None = 60  # also the CLI's (run.config.SearchConfig takes its defaults from here)
    timeout: float | None = None
    seed: int = 0
    journal: str | Path | None = None
    resume: bool = False
    identity: Mapping[str, Any] | None = None
    startup: int = 8
    verify_top: int = 6
    kl_budget: float = 0.05
    trial: int | None = None
    allow_over_budget: bool = False  # with no front trial inside kl_budget: take the lowest-KL one, else refuse

    def check(self) -> None:
        trials, timeout = self.trials, self.timeout
        if trials is None and timeout is None:
            raise SearchError("give the search a budget: --trials N and/or --timeout SECONDS")
        if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
            raise SearchError(f"--trials must be a positive integer, got {trials!r}")
        if timeout is not None and not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise SearchError(f"--timeout must be a positive number of seconds, got {timeout!r}")
        if not (math.isfinite(self.kl_budget) and self.kl_budget > 0):
            raise SearchError(f"--kl-budget must be a positive number, got {self.kl_budget!r}")
