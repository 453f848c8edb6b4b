"""Refusal directions from captured activations, and their safetensors + JSON storage.

* ``mean_diff``: harmful mean minus harmless mean.
* ``slerp``: ``slerp(harmless_n, harmful_n, t) - harmless_n`` on the normalized means; at ``t=1``
  it is the difference of the normalized means.
* ``projected``: the mean difference with its component along the harmless mean removed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from abliterate.errors import DirectionError, LayerError
from abliterate.measure.capture import Activations, Position

EPS = 1e-12
FORMAT = "abliterate.directions/1"


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(EPS)


@dataclass(frozen=True)
class Direction:
    """One unit direction (or an orthonormal ``[k, hidden]`` basis) with where it came from."""

    vector: torch.Tensor
    layer: int | None = None
    position: Position | None = None
    method: str = "custom"

    @property
    def k(self) -> int:
        return 1 if self.vector.dim() == 1 else self.vector.shape[0]


def as_basis(direction: Direction | torch.Tensor, hidden: int) -> torch.Tensor:
    """Validate a direction and return an orthonormal float32 basis of shape ``[k, hidden]``."""
    vec = direction.vector if isinstance(direction, Direction) else direction
    if not isinstance(vec, torch.Tensor):
        raise DirectionError(f"a direction must be a torch.Tensor, got {type(vec).__name__}")
    vec = vec.detach().to("cpu", torch.float64)
    if vec.dim() == 1:
        vec = vec[None]
    if vec.dim() != 2 or vec.shape[-1] != hidden:
        raise DirectionError(
            f"direction has shape {tuple(vec.shape)} but this model's hidden size is {hidden}; "
            "use a direction computed from this model"
        )
    if not torch.isfinite(vec).all():
        raise DirectionError("direction contains NaN or Inf; recompute it")
    if (vec.norm(dim=-1) < 1e-8).any():
        raise DirectionError("direction has zero norm; the two prompt sets gave identical means at that layer")
    q, r = torch.linalg.qr(vec.T)
    if (r.diagonal().abs() < 1e-6 * vec.norm(dim=-1).max()).any():
        raise DirectionError(f"the {vec.shape[0]} directions are linearly dependent; drop the redundant ones")
    q = q * torch.sign(r.diagonal())  # keep each basis vector pointing like the input (induction needs the sign)
    return q.T.contiguous().float()


@dataclass
class DirectionSet:
    """Raw (unnormalized) direction vectors for every residual point and captured position.

    ``vectors`` has shape ``[points, positions, hidden]`` where point ``i`` is the residual entering
    layer ``i`` (the last point is the output of the final layer). Indexing returns a unit
    :class:`Direction`: ``ds[14]`` (single position) or ``ds[14, -1]``.
    """

    vectors: torch.Tensor
    positions: list[Position]
    method: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_points(self) -> int:
        return self.vectors.shape[0]

    def __getitem__(self, key: int | tuple[int, Position]) -> Direction:
        layer, position = key if isinstance(key, tuple) else (key, None)
        if position is None:
            if len(self.positions) != 1:
                raise DirectionError(
                    f"several positions were captured ({self.positions}); index as ds[layer, position]"
                )
            position = self.positions[0]
        if position not in self.positions:
            raise DirectionError(f"position {position!r} not in this direction set ({self.positions})")
        if not -self.num_points <= layer < self.num_points:
            raise LayerError(f"layer {layer} is out of range: directions exist for 0..{self.num_points - 1}")
        layer %= self.num_points
        vec = self.vectors[layer, self.positions.index(position)]
        return Direction(unit(vec.float()), layer, position, self.method)

    def norms(self) -> torch.Tensor:
        """Norm of each raw direction, ``[points, positions]``."""
        return self.vectors.norm(dim=-1)

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` (tensor + metadata in the header) and a readable ``<path>.json``."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(f"{path.name}.safetensors")  # not with_suffix: keep dots ("llama-3.1")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "method": self.method, "positions": self.positions, **self.meta}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(
            {"directions": self.vectors.float().contiguous()}, str(tmp), metadata={"abliterate": json.dumps(meta)}
        )
        tmp.replace(path)
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> DirectionSet:
        path = Path(path)
        if not path.is_file():
            raise DirectionError(f"no direction file at {path}; pass the .safetensors written by DirectionSet.save")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {}).get("abliterate", "{}"))
                vectors = fh.get_tensor("directions")
        except Exception as exc:  # safetensors raises its own error types on bad headers
            raise DirectionError(f"{path} is not an abliterate direction file ({exc})") from exc
        if meta.get("format") != FORMAT:
            raise DirectionError(f"{path} is not an abliterate direction file (format {meta.get('format')!r})")
        positions = meta.pop("positions")
        method = meta.pop("method")
        meta.pop("format")
        return cls(vectors, positions, method, meta)


def _meta(acts: Activations, **extra: Any) -> dict[str, Any]:
    return {
        "model": acts.model,
        "prompt_hash": acts.prompt_hash,
        "n_harmful": acts.n_harmful,
        "n_harmless": acts.n_harmless,
        **extra,
    }


def mean_diff(acts: Activations) -> DirectionSet:
    """Difference of means, harmful minus harmless (Arditi et al. 2024).

    Args:
        acts: the activations of a :func:`~abliterate.measure.capture.capture`.

    Returns:
        A :class:`DirectionSet` with one (unnormalized) direction per point and position; ``ds[layer]`` or
        ``ds[layer, position]`` is a unit :class:`Direction`.

    Example:
        >>> from abliterate import directions
        >>> r = directions.mean_diff(acts)
        >>> r[14].vector.shape
    """
    return DirectionSet(
        (acts.harmful_mean - acts.harmless_mean).float(), list(acts.positions), "mean_diff", _meta(acts)
    )


def slerp(acts: Activations, t: float = 1.0) -> DirectionSet:
    """``slerp(harmless_n, harmful_n, t) - harmless_n``, normalized per point and position.

    Args:
        acts: the activations of a :func:`~abliterate.measure.capture.capture`.
        t: how far along the great circle from the harmless mean to the harmful mean, in (0, 1].

    Returns:
        A :class:`DirectionSet` of unit directions, one per point and position.

    Example:
        >>> from abliterate import directions
        >>> r = directions.slerp(acts, t=1.0)
    """
    if not 0.0 < t <= 1.0:
        raise DirectionError(f"slerp t must be in (0, 1], got {t}")
    a, b = unit(acts.harmless_mean), unit(acts.harmful_mean)
    cos = (a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    safe = sin.abs() > 1e-9
    wa = torch.where(safe, torch.sin((1 - t) * omega) / sin.where(safe, torch.ones_like(sin)), 1 - t)
    wb = torch.where(safe, torch.sin(t * omega) / sin.where(safe, torch.ones_like(sin)), torch.full_like(sin, t))
    point = wa * a + wb * b
    return DirectionSet(unit(point - a).float(), list(acts.positions), "slerp", _meta(acts, t=t))


def projected(acts: Activations) -> DirectionSet:
    """Mean difference with its component along the (normalized) harmless mean removed.

    Args:
        acts: the activations of a :func:`~abliterate.measure.capture.capture`.

    Returns:
        A :class:`DirectionSet` with one direction per point and position, orthogonal to the harmless mean.

    Example:
        >>> from abliterate import directions
        >>> r = directions.projected(acts)
    """
    r = acts.harmful_mean - acts.harmless_mean
    h = unit(acts.harmless_mean)
    r = r - (r * h).sum(-1, keepdim=True) * h
    return DirectionSet(r.float(), list(acts.positions), "projected", _meta(acts))


METHODS = {"mean_diff": mean_diff, "slerp": slerp, "projected": projected}


def compute(acts: Activations, method: str = "mean_diff", **kwargs: Any) -> DirectionSet:
    """Compute a direction set by method name (``mean_diff``, ``slerp``, ``projected``)."""
    if method not in METHODS:
        raise DirectionError(f"unknown direction method '{method}'; use one of {', '.join(METHODS)}")
    return METHODS[method](acts, **kwargs)


def combine(directions: Sequence[Direction | torch.Tensor], hidden: int) -> Direction:
    """Orthonormalize several directions into one ``[k, hidden]`` subspace to ablate jointly."""
    vecs = [d.vector if isinstance(d, Direction) else d for d in directions]
    if not vecs:
        raise DirectionError("no directions to combine")
    if not all(isinstance(v, torch.Tensor) for v in vecs):
        raise DirectionError("directions to combine must be Direction objects or torch.Tensors")
    stacked = torch.cat([v.reshape(-1, v.shape[-1]) for v in vecs])
    return Direction(as_basis(stacked, hidden), None, None, "subspace")
