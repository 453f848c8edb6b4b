"""The edit space as data: which direction is removed from which residual writers, and how strongly.

An :class:`EditSpec` is a plain, hashable, JSON-able value (no model access); ``plan.build_plan`` turns it
into per-writer bases and scales for one model and capture. Its fields:

``method`` (``"mean_diff"``) and ``slerp_t`` (1.0)
    How a direction is computed from the captured means at one residual point: ``mean_diff`` (harmful mean
    minus harmless mean), ``projected`` (the same with its component along the harmless mean removed) or
    ``slerp`` (``slerp(harmless, harmful, t) - harmless`` on the normalized means; ``slerp_t`` in (0, 1]).
``position`` (-1)
    Which captured token position the direction comes from (a negative offset from the prompt end, or
    ``"gen"``); it must be one of the capture's positions.
``direction_index`` (None)
    A float residual point in ``[0, num_layers]`` (point ``i`` enters layer ``i``): the unit directions of
    the two neighbouring points are interpolated linearly and renormalized (14.25 is 3/4 of point 14 plus
    1/4 of point 15), and that one direction is removed everywhere. ``None``: every writer removes the
    direction of the residual point it writes into (point ``i + 1`` for layer ``i``); the embeddings take
    layer 0's (point 0 is the raw embedding, the same for every prompt at the chat template's positions).
    Heretic searches ``[0.4 L, 0.9 L]`` or ``None``.
``k`` (1)
    ``k > 1`` removes a joint subspace: the direction plus the unit directions of the residual points
    nearest to its index (ties to the lower point), skipping any that the directions taken so far already
    span (the two points an interpolated direction comes from span it), until there are ``k``;
    orthonormalized in that order.
``attn`` and ``mlp`` (None)
    A :class:`Kernel` per component: the scale of the removal at each layer for attention output
    projections (``attn``; writers of other kinds, e.g. hybrid token mixers or custom patterns, follow it)
    and for MLP down projections (``mlp``: dense MLPs, every MoE expert and shared experts). ``None``
    leaves that component untouched. Scale 1 removes the component; below 1 removes part of it, above 1
    overshoots (flips part of it).
``embedding`` (0.0)
    Scale of the removal from the token (and learned position) embeddings; 0 leaves them alone.
``norm_preserving`` (False)
    Rescale each writer's edited output vector of every input unit (each embedding row) to its original
    norm, so the edit changes directions but not magnitudes (exact in the weights; its runtime twin scales
    each writer's inputs, which fused 3-D MoE experts do not allow).

``EditSpec()`` edits nothing; :meth:`EditSpec.full` is the classic abliteration (one direction, every
writer and the embeddings at scale 1), the edit ``abliterate run`` applies with the sweep's direction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from abliterate.errors import AbliterateError

METHODS = ("mean_diff", "projected", "slerp")


def _number(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise AbliterateError(f"edit spec field '{field}' must be a number, got {value!r}")
    return float(value)


def _at_least(value: object, field: str, low: float, *, finite: bool = True) -> float:
    x = _number(value, field)
    if x < low or (finite and math.isinf(x)):
        raise AbliterateError(f"edit spec field '{field}' is {value!r}; use a finite value >= {low}")
    return x


@dataclass(frozen=True)
class Kernel:
    """Scale of one component's edit over layers: a tent with a floor.

    ``max_weight`` at layer position ``peak`` (a float layer index), falling linearly to ``edge_weight`` at
    distance ``width`` and zero beyond it. ``width`` may be ``math.inf`` (``max_weight`` everywhere).
    """

    peak: float
    max_weight: float
    edge_weight: float
    width: float

    def weights(self, num_layers: int) -> list[float]:
        """The scale at each layer ``0 .. num_layers - 1``."""
        out = []
        for i in range(num_layers):
            d = abs(i - self.peak)
            if d > self.width:
                out.append(0.0)
            elif math.isinf(self.width) or self.width == 0:
                out.append(float(self.max_weight))
            else:
                out.append(self.max_weight + (self.edge_weight - self.max_weight) * d / self.width)
        return out

    def check(self, field: str, num_layers: int | None = None) -> None:
        peak = _number(self.peak, f"{field}.peak")
        if num_layers is not None and not 0 <= peak <= num_layers - 1:
            raise AbliterateError(
                f"edit spec field '{field}.peak' is {self.peak}; use a layer position in [0, {num_layers - 1}]"
            )
        _at_least(self.max_weight, f"{field}.max_weight", 0.0)
        _at_least(self.edge_weight, f"{field}.edge_weight", 0.0)
        _at_least(self.width, f"{field}.width", 0.0, finite=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(self.width, float) and math.isinf(self.width):
            d["width"] = "inf"  # JSON has no infinity
        return d

    @classmethod
    def from_dict(cls, d: object, field: str) -> Kernel:
        names = [f.name for f in fields(cls)]
        if not isinstance(d, Mapping) or set(d) != set(names):
            got = sorted(d) if isinstance(d, Mapping) else repr(d)
            raise AbliterateError(f"edit spec field '{field}' must be null or a table with {names}, got {got}")
        width = d["width"]
        kernel = cls(d["peak"], d["max_weight"], d["edge_weight"], math.inf if width == "inf" else width)
        kernel.check(field)
        return kernel


FLAT = Kernel(peak=0.0, max_weight=1.0, edge_weight=1.0, width=math.inf)


@dataclass(frozen=True)
class EditSpec:
    """One point of the edit space (see the module docstring for every field and its default)."""

    method: str = "mean_diff"
    slerp_t: float = 1.0
    position: int | str = -1
    direction_index: float | None = None
    k: int = 1
    attn: Kernel | None = None
    mlp: Kernel | None = None
    embedding: float = 0.0
    norm_preserving: bool = False

    @classmethod
    def full(
        cls,
        layer: int,
        method: str = "mean_diff",
        position: int | str = -1,
        *,
        slerp_t: float = 1.0,
        k: int = 1,
        norm_preserving: bool = False,
    ) -> EditSpec:
        """The classic edit: the direction of residual point ``layer`` removed from every writer of every layer
        and from the embeddings at scale 1 (``orthogonalize(lm, directions[layer, position])``)."""
        return cls(method, slerp_t, position, float(layer), k, FLAT, FLAT, 1.0, norm_preserving)

    def check(self) -> None:
        """Types and model-independent ranges; raises :class:`AbliterateError` naming the bad field."""
        if self.method not in METHODS:
            raise AbliterateError(f"edit spec field 'method' is {self.method!r}; use one of {', '.join(METHODS)}")
        t = _number(self.slerp_t, "slerp_t")
        if not 0.0 < t <= 1.0:
            raise AbliterateError(f"edit spec field 'slerp_t' is {self.slerp_t}; use a value in (0, 1]")
        if self.position != "gen" and (isinstance(self.position, bool) or not isinstance(self.position, int)):
            raise AbliterateError(f"edit spec field 'position' is {self.position!r}; use a negative integer or 'gen'")
        if self.direction_index is not None:
            _at_least(self.direction_index, "direction_index", 0.0)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise AbliterateError(f"edit spec field 'k' is {self.k!r}; use an integer >= 1")
        for name in ("attn", "mlp"):
            kernel = getattr(self, name)
            if kernel is not None and not isinstance(kernel, Kernel):
                raise AbliterateError(f"edit spec field '{name}' must be a Kernel or None, got {kernel!r}")
            if kernel is not None:
                kernel.check(name)
        _at_least(self.embedding, "embedding", 0.0)
        if not isinstance(self.norm_preserving, bool):
            raise AbliterateError(f"edit spec field 'norm_preserving' is {self.norm_preserving!r}; use true or false")

    def validate(self, num_layers: int, positions: Sequence[int | str]) -> None:
        """:meth:`check`, then the ranges that depend on the model (``num_layers``) and the capture
        (``positions``)."""
        self.check()
        if self.position not in positions:
            raise AbliterateError(
                f"edit spec field 'position' is {self.position!r}, which was not captured; use one of {list(positions)}"
            )
        if self.direction_index is not None and self.direction_index > num_layers:
            raise AbliterateError(
                f"edit spec field 'direction_index' is {self.direction_index}; this model has residual points "
                f"0..{num_layers}"
            )
        if self.k > num_layers + 1:
            raise AbliterateError(f"edit spec field 'k' is {self.k}; this model has {num_layers + 1} residual points")
        for name in ("attn", "mlp"):
            kernel = getattr(self, name)
            if kernel is not None:
                kernel.check(name, num_layers)

    @property
    def edits_anything(self) -> bool:
        return self.attn is not None or self.mlp is not None or self.embedding > 0

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["attn"] = None if self.attn is None else self.attn.to_dict()
        d["mlp"] = None if self.mlp is None else self.mlp.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: object) -> EditSpec:
        """The inverse of :meth:`to_dict`; missing fields take their defaults, unknown ones are an error."""
        if not isinstance(d, Mapping):
            raise AbliterateError(f"an edit spec must be a table of fields, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise AbliterateError(f"unknown edit spec field(s) {unknown}; known fields are {names}")
        values = dict(d)
        for name in ("attn", "mlp"):
            if values.get(name) is not None:
                values[name] = Kernel.from_dict(values[name], name)
        spec = cls(**values)
        spec.check()
        return spec

    def label(self) -> str:
        """A short human-readable summary, e.g. for tables and logs."""

        def kern(name: str, k: Kernel | None) -> str:
            if k is None:
                return f"{name} off"
            if math.isinf(k.width) and k.max_weight == k.edge_weight:
                return f"{name} {k.max_weight:g}"
            return f"{name} {k.max_weight:.2f}@{k.peak:.1f}→{k.edge_weight:.2f}±{k.width:.1f}"

        method = f"slerp(t={self.slerp_t:g})" if self.method == "slerp" else self.method
        where = "own layer" if self.direction_index is None else f"dir {self.direction_index:.2f}"
        parts = [method, f"pos {self.position}", where, *([f"k={self.k}"] if self.k > 1 else [])]
        parts += [kern("attn", self.attn), kern("mlp", self.mlp), f"emb {self.embedding:g}"]
        return ", ".join(parts + (["norm-preserving"] if self.norm_preserving else []))
