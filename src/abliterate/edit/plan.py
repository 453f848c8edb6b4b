"""Reversible edits: what to project out of which residual writer, applied to a model and reverted exactly.

An :class:`EditPlan` lists, per residual writer, an orthonormal basis (already adjusted for post-norms) and
a scale. :func:`build_plan` makes one from an :class:`~abliterate.edit.spec.EditSpec` and the directions of a
capture (:class:`Directions`); a :class:`~abliterate.edit.direction_edit.DirectionEdit` (what ``ablate``,
``orthogonalize`` and ``stream_orthogonalize`` take: one direction, layers, per-layer scales) plans itself.
:func:`apply_plan` is the one way any plan reaches a model: to the weights (the blocked float32 kernel writes
each edited writer into a fresh tensor that is swapped in; the originals are kept untouched, so ``revert`` swaps
them back and the model is bit-identical to before; ``permanent=True`` edits in place and keeps nothing to undo,
as ``orthogonalize`` does) or as runtime hooks (for offloaded or quantized models, and ``ablate``); both give the
same logits.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from abliterate.arch.anatomy import Writer
from abliterate.arch.projection import writer_basis
from abliterate.arch.streams import residual_hooks
from abliterate.edit.hook_edit import hook_edit
from abliterate.edit.spec import EditSpec
from abliterate.errors import AbliterateError, DirectionError
from abliterate.lm.model import LoadedModel
from abliterate.measure.capture import Activations
from abliterate.measure.directions import DirectionSet, as_basis, compute, unit
from abliterate.ops.hooks import HookSet
from abliterate.ops.kernel import project_out, project_tensor, tied_embeddings, work_buffer
from abliterate.ops.placement import is_offloaded

MODES = ("auto", "weights", "hooks")
SPAN_TOL = 1e-3  # a neighbour whose unit direction lies this close to the span already taken adds nothing


@dataclass
class WriterEdit:
    """Remove ``scale`` times the component along ``basis`` (``[k, hidden]``, orthonormal, adjusted for the
    writer's post-norm) from everything ``writer`` writes."""

    writer: Writer
    basis: torch.Tensor
    scale: float


@dataclass
class ResidualEdit:
    """On a model loaded ``residual_only``: project ``basis`` out of the residual stream itself, ``scales``
    (``{layer: scale}``) at the chosen layers and ``embedding_scale`` at layer 0's input (runtime only)."""

    basis: torch.Tensor
    scales: dict[int, float]
    embedding_scale: float


@dataclass
class EditPlan:
    edits: list[WriterEdit]
    norm_preserving: bool = False
    spec: EditSpec | None = None
    residual: ResidualEdit | None = None


def assemble(
    lm: LoadedModel,
    embedding: float,
    scale_of: Callable[[int, Writer], float],
    basis_of: Callable[[int | None], torch.Tensor],
    norm_preserving: bool = False,
    spec: EditSpec | None = None,
) -> EditPlan:
    """The plan editing the embeddings at ``embedding`` and the writers of each layer ``i`` at
    ``scale_of(i, writer)`` (0: left alone), each removing ``basis_of(i)`` (``None``: the embeddings) adjusted for
    its post-norm."""
    edits: list[WriterEdit] = []
    if embedding:
        b = basis_of(None)
        edits += [WriterEdit(w, writer_basis(w, b, lm.hidden_size), embedding) for w in lm.anatomy.embeddings]
    for i, writers in enumerate(lm.anatomy.writers):
        for w in writers:
            s = scale_of(i, w)
            if s:
                edits.append(WriterEdit(w, writer_basis(w, basis_of(i), lm.hidden_size), s))
    return EditPlan(edits, norm_preserving, spec)


class Directions:
    """Unit directions and the bases specs ask for, computed once from a capture (or from saved direction
    sets) and cached: a search builds many plans from one capture."""

    def __init__(self, acts: Activations | None, sets: Sequence[DirectionSet] = ()) -> None:
        if acts is None and not sets:
            raise AbliterateError("Directions needs a capture (Activations) or at least one DirectionSet")
        self.acts = acts
        self._sets = {(s.method, s.meta.get("t") if s.method == "slerp" else None): s for s in sets}
        self._units: dict[tuple, torch.Tensor] = {}
        self._bases: dict[tuple, torch.Tensor] = {}
        ref = acts.harmful_mean if acts is not None else sets[0].vectors
        self.num_points, self.hidden = ref.shape[0], ref.shape[-1]
        self.positions = list(acts.positions if acts is not None else sets[0].positions)

    @classmethod
    def from_sets(cls, *sets: DirectionSet) -> Directions:
        """Directions from saved :class:`DirectionSet` files: only their methods (and slerp ``t``) are usable."""
        return cls(None, sets)

    def _unit(self, spec: EditSpec, point: int) -> torch.Tensor:
        t = spec.slerp_t if spec.method == "slerp" else None
        key = (spec.method, t, spec.position, point)
        if key not in self._units:
            if (spec.method, t) not in self._sets:
                if self.acts is None:
                    have = ", ".join(f"{m}" + (f"(t={x})" if x is not None else "") for m, x in self._sets)
                    raise DirectionError(f"no {spec.method} directions here (only {have}); build Directions(acts)")
                self._sets[spec.method, t] = compute(self.acts, spec.method, **({} if t is None else {"t": t}))
            self._units[key] = self._sets[spec.method, t][point, spec.position].vector
        return self._units[key]

    def basis(self, spec: EditSpec, layer: int | None) -> torch.Tensor:
        """``[k, hidden]`` orthonormal float32 basis for the writers of ``layer`` (``None``: the embeddings)."""
        own = 1 if layer is None else layer + 1  # the embeddings share layer 0's: point 0 is the raw embedding
        center = float(own if spec.direction_index is None else spec.direction_index)
        key = (spec.method, spec.slerp_t if spec.method == "slerp" else None, spec.position, center, spec.k)
        if key in self._bases:
            return self._bases[key]
        spec.validate(self.num_points - 1, self.positions)
        if not 0 <= center <= self.num_points - 1:
            raise AbliterateError(
                f"layer {layer} is out of range: these directions cover layers 0..{self.num_points - 2}"
            )
        lo = math.floor(center)
        frac = center - lo
        first = self._unit(spec, lo)
        if frac:
            first = unit((1 - frac) * first + frac * self._unit(spec, lo + 1))
        vectors, q = [first], unit(first.double())[None]
        for p in sorted(range(self.num_points), key=lambda p: (abs(p - center), p)):
            if len(vectors) == spec.k:
                break
            v = self._unit(spec, p).double()
            rest = v - (v @ q.T) @ q
            if rest.norm() > SPAN_TOL:  # skip what the directions taken so far already span
                q = torch.cat([q, unit(rest)[None]])
                vectors.append(self._unit(spec, p))
        if len(vectors) < spec.k:
            raise DirectionError(f"only {len(vectors)} independent directions exist here, not k={spec.k}")
        self._bases[key] = as_basis(torch.stack(vectors), self.hidden)
        return self._bases[key]


def build_plan(lm: LoadedModel, spec: EditSpec, source: Directions) -> EditPlan:
    """The plan of ``spec`` for ``lm``: per layer, attention-side writers (and writers of other kinds) at the
    ``attn`` kernel's scale, MLP writers at the ``mlp`` kernel's, plus the embeddings at ``spec.embedding``."""
    lm.anatomy.require_weights()
    if source.num_points != lm.num_layers + 1 or source.hidden != lm.hidden_size:
        raise AbliterateError(
            f"the directions have {source.num_points} residual points of size {source.hidden}, but this model has "
            f"{lm.num_layers + 1} of size {lm.hidden_size}; capture from this model"
        )
    spec.validate(lm.num_layers, source.positions)
    zero = [0.0] * lm.num_layers
    attn = spec.attn.weights(lm.num_layers) if spec.attn is not None else zero
    mlp = spec.mlp.weights(lm.num_layers) if spec.mlp is not None else zero
    return assemble(
        lm,
        spec.embedding,
        lambda i, w: mlp[i] if w.kind == "mlp" else attn[i],
        lambda layer: source.basis(spec, layer),
        spec.norm_preserving,
        spec,
    )


class Plannable(Protocol):
    """An edit that plans itself for a model (:class:`DirectionEdit`)."""

    def plan(self, lm: LoadedModel) -> EditPlan: ...


def plan_of(lm: LoadedModel, edit: EditSpec | Plannable | EditPlan, source: Directions | None = None) -> EditPlan:
    """The plan of any edit: a plan as it is, an :class:`EditSpec` built from ``source``, else ``edit.plan(lm)``."""
    if isinstance(edit, EditPlan):
        return edit
    if isinstance(edit, EditSpec):
        if source is None:
            raise AbliterateError("an EditSpec needs the directions to build its plan: pass Directions(acts)")
        return build_plan(lm, edit, source)
    return edit.plan(lm)


class AppliedEdit:
    """An applied plan. ``revert()`` (or leaving the ``with`` block) restores the model exactly; it is idempotent.
    ``edited``: the parameters a weight edit changed; ``untied``: whether it untied the input/output embeddings."""

    def __init__(self, mode: str, plan: EditPlan) -> None:
        self.mode, self.plan = mode, plan
        self.hooks = HookSet()
        self._undo: list[Callable[[], None]] = []
        self.edited: list[str] = []
        self.untied = False

    @property
    def active(self) -> bool:
        return bool(self._undo) or len(self.hooks) > 0

    def on_revert(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` on :meth:`revert` (undos run last first)."""
        self._undo.append(undo)

    def revert(self) -> None:
        self.hooks.close()
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> AppliedEdit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.revert()


def untie_embeddings(model: nn.Module, handle: AppliedEdit | None = None) -> bool:
    """Give the LM head its own copy of tied embeddings, so editing the input side leaves logits
    alone; the saved model then keeps a separate ``lm_head``. Returns whether anything was untied.

    With ``handle`` (a reversible edit, which writes the embedding into a fresh tensor) the head gets its own
    Parameter over the original tensor, no copy, and ``handle.revert()`` ties them again."""
    if not tied_embeddings(model):
        return False
    out = model.get_output_embeddings()
    head = out.weight
    configs = list({id(c): c for c in (model.config, model.config.get_text_config())}.values())
    before = [c.tie_word_embeddings for c in configs]
    data = head.detach() if handle is not None else head.detach().clone()
    out.weight = nn.Parameter(data, requires_grad=False if handle is None else head.requires_grad)
    for c in configs:
        c.tie_word_embeddings = False
    if handle is not None:

        def undo() -> None:
            for c, v in zip(configs, before, strict=True):
                c.tie_word_embeddings = v
            out.weight = head

        handle.on_revert(undo)
    return True


Pool = dict[tuple, list[torch.Tensor]]
_POOLS: weakref.WeakKeyDictionary[nn.Module, Pool] = weakref.WeakKeyDictionary()


def release_buffers(lm: LoadedModel) -> None:
    """Free the scratch tensors that reverted weight edits keep for the next edit of ``lm``."""
    _POOLS.pop(lm.model, None)


def _layout(t: torch.Tensor) -> tuple:
    return (t.shape, t.stride(), t.dtype, t.device)


def _swap(
    handle: AppliedEdit | None,
    pool: Pool,
    module: nn.Module,
    name: str,
    fill: Callable[[torch.Tensor, torch.Tensor | None], None],
) -> None:
    """Compute ``module.<name>``'s edited values into a scratch tensor and put it in place of the original,
    which stays untouched for the undo; the undo returns the scratch tensor to ``pool``. Without ``handle``
    (a permanent edit) the values are edited in place and nothing is kept."""
    param = getattr(module, name)
    original = param.data
    if handle is None:
        fill(original, None)
        return
    free = pool.get(_layout(original))
    new = (
        free.pop()
        if free
        else torch.empty_strided(original.shape, original.stride(), dtype=original.dtype, device=original.device)
    )
    fill(original, new)
    param.data = new

    def undo() -> None:
        param.data = original
        pool.setdefault(_layout(new), []).append(new)

    handle.on_revert(undo)


def edited_names(w: Writer) -> list[str]:
    """The names an edit of ``w`` reports (:class:`abliterate.edit.weights.EditReport`): its weight, and its bias."""
    names = [f"{w.name}.{w.param}" if w.param == "weight" else w.name]
    if w.bias is not None:
        names.append(f"{w.name}.{w.bias}" if w.param == "weight" else f"{w.name}_bias")
    return names


@torch.no_grad()
def _apply_weights(lm: LoadedModel, plan: EditPlan, handle: AppliedEdit, permanent: bool) -> None:
    if plan.residual is not None:  # a runtime projection of the residual stream: no weights to edit
        lm.anatomy.require_weights()
    for e in plan.edits:
        if not e.writer.weight.dtype.is_floating_point or is_offloaded(e.writer.module):
            raise AbliterateError(
                f"{e.writer.name} is quantized or offloaded, so it cannot be edited in place; use mode='hooks'"
            )
    undo = None if permanent else handle
    if any(e.writer.layer is None for e in plan.edits):
        handle.untied = untie_embeddings(lm.model, undo)
    pool = _POOLS.setdefault(lm.model, {})
    buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
    for e in plan.edits:
        w = e.writer
        weight = w.weight
        key = (weight.device, weight.dtype)
        if key not in buffers and weight.dim() > 1:
            buffers[key] = work_buffer(weight)
        work = buffers.get(key)

        def edit(src: torch.Tensor, dst: torch.Tensor | None, w: Writer = w, e: WriterEdit = e, work=work) -> None:
            project_tensor(src, w.out_axis, e.basis, e.scale, plan.norm_preserving, work=work, out=dst)

        def edit_bias(src: torch.Tensor, dst: torch.Tensor | None, e: WriterEdit = e) -> None:
            (src if dst is None else dst).copy_(project_out(src, e.basis, e.scale))

        _swap(undo, pool, w.module, w.param, edit)
        if w.bias is not None:
            _swap(undo, pool, w.module, w.bias, edit_bias)
        handle.edited += edited_names(w)


def _apply_hooks(lm: LoadedModel, plan: EditPlan, handle: AppliedEdit) -> None:
    for e in plan.edits:
        hook_edit(handle.hooks, e.writer, e.basis, e.scale, plan.norm_preserving)
    r = plan.residual
    if r is not None:
        residual_hooks(handle.hooks, lm.anatomy.layers, r.basis, lm.hidden_size, r.scales, r.embedding_scale)


def apply_plan(lm: LoadedModel, plan: EditPlan, mode: str = "auto", *, permanent: bool = False) -> AppliedEdit:
    """Apply ``plan`` to ``lm``: ``"weights"`` edits the weights (in memory, not quantized), ``"hooks"`` adds
    runtime hooks, ``"auto"`` picks weights unless the model is offloaded or quantized (or the plan is a
    runtime projection of the residual stream). Returns the handle whose ``revert()`` restores the model
    exactly; a failure part-way reverts what was done and re-raises. ``permanent`` (weights only): edit the
    weights in place and keep nothing to revert (no copies, no scratch tensors), as ``orthogonalize`` does."""
    if mode not in MODES:
        raise AbliterateError(f"unknown edit mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "auto":
        mode = "hooks" if lm.offloaded or lm.quantized or plan.residual is not None else "weights"
    if permanent and mode != "weights":
        raise AbliterateError("a permanent edit changes the weights; use mode='weights' (hooks are always reverted)")
    handle = AppliedEdit(mode, plan)
    try:
        if mode == "weights":
            _apply_weights(lm, plan, handle, permanent)
        else:
            _apply_hooks(lm, plan, handle)
    except BaseException:
        handle.revert()
        raise
    return handle


@contextlib.contextmanager
def applied(
    lm: LoadedModel,
    spec_or_plan: EditSpec | Plannable | EditPlan,
    source: Directions | None = None,
    mode: str = "auto",
) -> Iterator[AppliedEdit]:
    """``with applied(lm, spec, Directions(acts)):`` runs the block with the edit applied, then reverts it
    (``spec`` may also be a :class:`DirectionEdit` or a plan, with no ``source``)."""
    handle = apply_plan(lm, plan_of(lm, spec_or_plan, source), mode)
    try:
        yield handle
    finally:
        handle.revert()
