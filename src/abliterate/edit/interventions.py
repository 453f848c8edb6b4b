"""Runtime, reversible interventions as context managers (they work inside ``generate`` with a KV cache).

* :func:`ablate` removes a direction (or a subspace) from every write into the residual stream.
* :func:`induce` sets the residual's component along a direction to a fixed value at layer inputs:
  ``a' = a - (a.r)r + c r`` (``c`` defaults to the harmful prompts' mean projection per layer).
* :func:`add` adds ``coefficient * r`` to layer inputs (activation addition).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch

from abliterate.arch.projection import Scale
from abliterate.arch.streams import per_stream
from abliterate.edit.direction_edit import DirectionEdit
from abliterate.edit.plan import apply_plan
from abliterate.errors import AbliterateError, DirectionError
from abliterate.lm.model import LoadedModel
from abliterate.measure.capture import Activations
from abliterate.measure.directions import Direction, as_basis
from abliterate.ops.hooks import HookSet
from abliterate.ops.kernel import project_out

Coefficient = float | Mapping[int, float] | Activations


@contextlib.contextmanager
def ablate(
    lm: LoadedModel,
    direction: Direction | torch.Tensor,
    *,
    layers: Sequence[int] | None = None,
    scale: Scale = 1.0,
    embeddings: bool | None = None,
    embedding_scale: float | None = None,
) -> Iterator[HookSet]:
    """Remove ``direction`` (a unit vector or a ``[k, hidden]`` set, orthonormalized) from the
    outputs of the embeddings and of every residual writer of ``layers`` (default: all).

    ``scale`` (a number or ``{layer: scale}``) removes only that fraction of the component.
    ``embeddings`` defaults to True when all layers are ablated. Equivalent to
    :func:`abliterate.orthogonalize` with the same arguments, but reversible.

    On a model loaded with ``residual_only=True`` the direction is projected out of the residual stream itself
    instead: at the input and the output of each chosen layer (and at layer 0's input for the embeddings), each
    time scaling the component by ``1 - scale``. The plan of the
    :class:`~abliterate.edit.direction_edit.DirectionEdit`, applied as hooks (:func:`abliterate.edit.plan.apply_plan`).

    Args:
        lm: the loaded model.
        direction: a :class:`Direction`, a ``[hidden]`` vector or a ``[k, hidden]`` subspace.
        layers: the layers whose writers are edited (default: all).
        scale: the fraction of the component removed, one number or ``{layer: scale}``.
        embeddings: edit the embeddings too (default: when all layers are edited).
        embedding_scale: the fraction removed from the embeddings (default: ``scale``, or layer 0's).

    Returns:
        A context manager; inside it the model runs edited (``generate`` included), on exit or on an exception the
        hooks are removed. It yields the :class:`~abliterate.ops.hooks.HookSet`.

    Example:
        >>> from abliterate import ablate
        >>> with ablate(lm, r[14]):
        ...     lm.generate(["How do I pick a lock?"])
    """
    edit = DirectionEdit(direction, layers, scale, embeddings, embedding_scale)
    handle = apply_plan(lm, edit.plan(lm, residual=True), mode="hooks")
    try:
        yield handle.hooks
    finally:
        handle.revert()


def _coefficients(
    lm: LoadedModel, coefficient: Coefficient, basis: torch.Tensor, layers: list[int], position: object
) -> dict[int, float]:
    if isinstance(coefficient, Activations):
        if basis.shape[0] != 1:
            raise DirectionError("induction with captured activations needs a single direction, not a subspace")
        pos = coefficient.position_index(position if position is not None else coefficient.positions[-1])
        proj = coefficient.harmful_mean[:, pos, :].float() @ basis[0]
        return {i: float(proj[i]) for i in layers}
    if isinstance(coefficient, Mapping):
        missing = [i for i in layers if i not in coefficient]
        if missing:
            raise AbliterateError(f"no induction coefficient for layer(s) {missing}; give one per chosen layer")
        return {i: float(coefficient[i]) for i in layers}
    return dict.fromkeys(layers, float(coefficient))


def _target_layers(lm: LoadedModel, direction: Direction | torch.Tensor, layers: Sequence[int] | None) -> list[int]:
    """Explicit layers, else the direction's own layer (if it is a layer input), else all layers."""
    if layers is not None:
        return [lm.anatomy.check_layer(i) for i in layers]
    own = direction.layer if isinstance(direction, Direction) else None
    return [own] if own is not None and own < lm.num_layers else list(range(lm.num_layers))


@contextlib.contextmanager
def induce(
    lm: LoadedModel,
    direction: Direction | torch.Tensor,
    coefficient: Coefficient,
    *,
    layers: Sequence[int] | None = None,
) -> Iterator[HookSet]:
    """At the input of each chosen layer set the component along ``direction`` to ``coefficient``:
    ``a' = a - (a.r)r + c r``. Pass the :class:`Activations` of a capture to use the harmful mean's
    projection at each layer (the same position the direction came from), or a number, or
    ``{layer: c}``. Default layers: the direction's own layer if it has one, else all.

    Args:
        lm: the loaded model.
        direction: a single :class:`Direction` or ``[hidden]`` vector.
        coefficient: the component to pin: a number, ``{layer: c}``, or the :class:`Activations` of a capture.
        layers: the layers at whose inputs it is pinned.

    Returns:
        A context manager that runs the model with the component pinned and removes its hooks on exit; it yields
        the :class:`~abliterate.ops.hooks.HookSet`.

    Example:
        >>> from abliterate import induce
        >>> with induce(lm, r[14], acts):  # refusal on harmless prompts
        ...     lm.generate(["How do I bake bread?"])
    """
    basis = as_basis(direction, lm.hidden_size)
    if basis.shape[0] != 1:
        raise DirectionError("induce takes a single direction; ablate a subspace instead")
    chosen = _target_layers(lm, direction, layers)
    position = direction.position if isinstance(direction, Direction) else None
    coeffs = _coefficients(lm, coefficient, basis, chosen, position)
    with HookSet() as hooks:
        for i in chosen:
            c = coeffs[i]

            def fn(x: torch.Tensor, c: float = c) -> torch.Tensor:
                u = basis[0].to(x.device, torch.promote_types(x.dtype, torch.float32))
                return (project_out(x, u[None]).to(u.dtype) + c * u).to(x.dtype)

            hooks.on_input(lm.anatomy.layers[i], per_stream(fn, lm.hidden_size))
        yield hooks


@contextlib.contextmanager
def add(
    lm: LoadedModel,
    direction: Direction | torch.Tensor,
    coefficient: float = 1.0,
    *,
    layers: Sequence[int] | None = None,
) -> Iterator[HookSet]:
    """Activation addition: add ``coefficient * r`` (unit ``r``) to the input of the chosen layers.

    Args:
        lm: the loaded model.
        direction: a single :class:`Direction` or ``[hidden]`` vector (normalized).
        coefficient: how much of it to add.
        layers: the layers at whose inputs it is added (default: the direction's own layer, else all).

    Returns:
        A context manager that runs the model steered and removes its hooks on exit; it yields the
        :class:`~abliterate.ops.hooks.HookSet`.

    Example:
        >>> from abliterate import add
        >>> with add(lm, r[14], -4.0, layers=[14]):
        ...     lm.generate(["How do I pick a lock?"])
    """
    basis = as_basis(direction, lm.hidden_size)
    if basis.shape[0] != 1:
        raise DirectionError("add takes a single direction")
    chosen = _target_layers(lm, direction, layers)
    with HookSet() as hooks:
        for i in chosen:

            def fn(x: torch.Tensor) -> torch.Tensor:
                return (x.float() + coefficient * basis[0].to(x.device)).to(x.dtype)

            hooks.on_input(lm.anatomy.layers[i], per_stream(fn, lm.hidden_size))
        yield hooks
