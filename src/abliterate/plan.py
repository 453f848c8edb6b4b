"""Reversible edits: what to project out of which residual writer, applied to a model and reverted exactly.

An :class:`EditPlan` lists, per residual writer, an orthonormal basis (already adjusted for post-norms) and
a scale. :func:`build_plan` makes one from an :class:`~abliterate.space.EditSpec` and the directions of a
capture (:class:`Directions`); :func:`edit_plan` from one direction and per-layer scales (what
``ablate``/``orthogonalize``/``stream_orthogonalize`` take). :func:`apply_plan` applies a plan either to
the weights (the blocked float32 kernel writes each edited writer into a fresh tensor that is swapped in;
the originals are kept untouched, so ``revert`` swaps them back and the model is bit-identical to before) or
as runtime hooks (for offloaded or quantized models); both give the same logits.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .anatomy import Writer
from .capture import Activations
from .directions import Direction, DirectionSet, as_basis, compute, unit
from .errors import AbliterateError, DirectionError
from .hooks import HookSet
from .kernel import project_tensor, tied_embeddings, work_buffer
from .model import LoadedModel
from .placement import flat_hooks, is_offloaded
from .projection import (
    Scale,
    ablate_fn,
    embedding_scale_of,
    hook_writer,
    layer_scales,
    project_out,
    writer_basis,
    writer_fn,
)
from .space import EditSpec

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
class EditPlan:
    edits: list[WriterEdit]
    norm_preserving: bool = False
    spec: EditSpec | None = None


def edit_plan(
    lm: LoadedModel,
    direction: Direction | torch.Tensor,
    layers: Sequence[int] | None,
    scale: Scale,
    embeddings: bool | None,
    embedding_scale: float | None,
) -> EditPlan:
    """One direction (or subspace) removed from the writers of ``layers`` (default all) at ``scale`` (a number
    or ``{layer: scale}``), and from the embeddings when ``embeddings`` (default: when all layers are edited)."""
    lm.anatomy.require_weights()
    basis = as_basis(direction, lm.hidden_size)
    scales = layer_scales(lm.anatomy, None if layers is None else list(layers), scale)
    emb_scale = embedding_scale_of(layers, scale, embeddings, embedding_scale)
    pairs: list[tuple[Writer, float]] = []
    if emb_scale:
        pairs += [(w, emb_scale) for w in lm.anatomy.embeddings]
    for layer, s in sorted(scales.items()):
        pairs += [(w, s) for w in lm.anatomy.writers[layer]]
    return EditPlan([WriterEdit(w, writer_basis(w, basis, lm.hidden_size), s) for w, s in pairs])


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
    edits: list[WriterEdit] = []
    if spec.embedding:
        b = source.basis(spec, None)
        edits += [WriterEdit(w, writer_basis(w, b, lm.hidden_size), spec.embedding) for w in lm.anatomy.embeddings]
    zero = [0.0] * lm.num_layers
    attn = spec.attn.weights(lm.num_layers) if spec.attn is not None else zero
    mlp = spec.mlp.weights(lm.num_layers) if spec.mlp is not None else zero
    for i, writers in enumerate(lm.anatomy.writers):
        for w in writers:
            s = mlp[i] if w.kind == "mlp" else attn[i]
            if s:
                edits.append(WriterEdit(w, writer_basis(w, source.basis(spec, i), lm.hidden_size), s))
    return EditPlan(edits, spec.norm_preserving, spec)


def _norm_kept_fn(basis: torch.Tensor, scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Runtime twin of a norm-preserving embedding edit: project, then give each output row its old norm."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        work = x.to(torch.promote_types(x.dtype, torch.float32))
        u = basis.to(work.device, work.dtype)
        new = work - scale * (work @ u.T) @ u
        return (new * (work.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp_min(1e-12))).to(x.dtype)

    return fn


def _gain_fn(gain: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        work = x.to(torch.promote_types(x.dtype, torch.float32))
        return (work * gain.to(work.device, work.dtype)).to(x.dtype)

    return fn


def _stored_weight(w: Writer) -> torch.Tensor:
    """A writer's float weight, read from accelerate's weights map when the module is offloaded."""
    weight = w.weight
    if not weight.dtype.is_floating_point:
        raise AbliterateError(
            f"{w.name} is quantized, so a norm-preserving edit of it has no runtime twin; "
            "use norm_preserving=False, or edit the unquantized model"
        )
    if weight.device.type != "meta":
        return weight
    for hook in flat_hooks(w.module):
        weights_map = getattr(hook, "weights_map", None)
        if weights_map is not None and w.param in weights_map:
            return weights_map[w.param]
    raise AbliterateError(f"cannot read the offloaded weight of {w.name}; use norm_preserving=False")


@torch.no_grad()
def _input_gain(w: Writer, basis: torch.Tensor, scale: float) -> torch.Tensor:
    """Per input unit, old norm / edited norm of its output vector: what a norm-preserving edit multiplies by."""
    weight = _stored_weight(w)
    x = weight.to(torch.promote_types(weight.dtype, torch.float32))
    x = x if w.out_axis == 1 else x.T  # [input units, hidden]
    u = basis.to(x.device, x.dtype)
    new = x - scale * (x @ u.T) @ u
    return x.norm(dim=1) / new.norm(dim=1).clamp_min(1e-12)


class AppliedEdit:
    """An applied plan. ``revert()`` (or leaving the ``with`` block) restores the model exactly; it is idempotent."""

    def __init__(self, mode: str, plan: EditPlan) -> None:
        self.mode, self.plan = mode, plan
        self.hooks = HookSet()
        self._undo: list[Callable[[], None]] = []

    @property
    def active(self) -> bool:
        return bool(self._undo) or len(self.hooks) > 0

    def revert(self) -> None:
        self.hooks.close()
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> AppliedEdit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.revert()


def _untie(model: nn.Module, handle: AppliedEdit) -> None:
    """Make the LM head keep the original embedding while the input side is edited; undone on revert."""
    configs = list({id(c): c for c in (model.config, model.config.get_text_config())}.values())
    before = [c.tie_word_embeddings for c in configs]

    def undo() -> None:
        for c, v in zip(configs, before, strict=True):
            c.tie_word_embeddings = v

    handle._undo.append(undo)
    for c in configs:
        c.tie_word_embeddings = False


Pool = dict[tuple, list[torch.Tensor]]
_POOLS: weakref.WeakKeyDictionary[nn.Module, Pool] = weakref.WeakKeyDictionary()


def release_buffers(lm: LoadedModel) -> None:
    """Free the scratch tensors that reverted weight edits keep for the next edit of ``lm``."""
    _POOLS.pop(lm.model, None)


def _layout(t: torch.Tensor) -> tuple:
    return (t.shape, t.stride(), t.dtype, t.device)


def _swap(
    handle: AppliedEdit,
    pool: Pool,
    module: nn.Module,
    name: str,
    fill: Callable[[torch.Tensor, torch.Tensor], None],
    own: bool,
) -> None:
    """Compute ``module.<name>``'s edited values into a scratch tensor and put it in place of the original,
    which stays untouched for the undo; the undo returns the scratch tensor to ``pool``. ``own``: give the
    module a new Parameter (the original is shared with the LM head)."""
    param = getattr(module, name)
    original = param.data
    free = pool.get(_layout(original))
    new = (
        free.pop()
        if free
        else torch.empty_strided(original.shape, original.stride(), dtype=original.dtype, device=original.device)
    )
    fill(original, new)
    if own:
        setattr(module, name, nn.Parameter(new, requires_grad=param.requires_grad))
    else:
        param.data = new

    def undo() -> None:
        if own:
            setattr(module, name, param)
        else:
            param.data = original
        pool.setdefault(_layout(new), []).append(new)

    handle._undo.append(undo)


@torch.no_grad()
def _apply_weights(lm: LoadedModel, plan: EditPlan, handle: AppliedEdit) -> None:
    for e in plan.edits:
        if not e.writer.weight.dtype.is_floating_point or is_offloaded(e.writer.module):
            raise AbliterateError(
                f"{e.writer.name} is quantized or offloaded, so it cannot be edited in place; use mode='hooks'"
            )
    shared = tied_embeddings(lm.model) and any(e.writer.layer is None for e in plan.edits)
    head = lm.model.get_output_embeddings().weight if shared else None
    if shared:
        _untie(lm.model, handle)
    pool = _POOLS.setdefault(lm.model, {})
    buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
    for e in plan.edits:
        w = e.writer
        weight = w.weight
        key = (weight.device, weight.dtype)
        if key not in buffers and weight.dim() > 1:
            buffers[key] = work_buffer(weight)
        work = buffers.get(key)

        def edit(src: torch.Tensor, dst: torch.Tensor, w: Writer = w, e: WriterEdit = e, work=work) -> None:
            project_tensor(src, w.out_axis, e.basis, e.scale, plan.norm_preserving, work=work, out=dst)

        _swap(handle, pool, w.module, w.param, edit, own=weight is head)
        if w.bias is not None:
            _swap(
                handle,
                pool,
                w.module,
                w.bias,
                lambda src, dst, e=e: dst.copy_(project_out(src, e.basis, e.scale)),
                False,
            )


def _apply_hooks(plan: EditPlan, handle: AppliedEdit) -> None:
    for e in plan.edits:
        module = e.writer.hook_module
        if not plan.norm_preserving or e.writer.is_bias:
            hook_writer(handle.hooks, e.writer, writer_fn(e.writer, e.basis, e.scale))
        elif e.writer.layer is None:
            hook_writer(handle.hooks, e.writer, _norm_kept_fn(e.basis, e.scale))
        elif e.writer.weight.dim() == 3:
            raise AbliterateError(
                f"a norm-preserving edit of the fused experts {e.writer.name} has no runtime twin (its gains act "
                "inside the experts module); edit the weights (a model in memory) or use norm_preserving=False"
            )
        else:
            handle.hooks.on_input(module, _gain_fn(_input_gain(e.writer, e.basis, e.scale)))
            handle.hooks.on_output(module, ablate_fn(e.basis, e.scale))


def apply_plan(lm: LoadedModel, plan: EditPlan, mode: str = "auto") -> AppliedEdit:
    """Apply ``plan`` to ``lm``: ``"weights"`` edits the weights (in memory, not quantized), ``"hooks"`` adds
    runtime hooks, ``"auto"`` picks weights unless the model is offloaded or quantized. Returns the handle
    whose ``revert()`` restores the model exactly; a failure part-way reverts what was done and re-raises."""
    if mode not in MODES:
        raise AbliterateError(f"unknown edit mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "auto":
        mode = "hooks" if lm.offloaded or lm.quantized else "weights"
    handle = AppliedEdit(mode, plan)
    try:
        if mode == "weights":
            _apply_weights(lm, plan, handle)
        else:
            _apply_hooks(plan, handle)
    except BaseException:
        handle.revert()
        raise
    return handle


@contextlib.contextmanager
def applied(
    lm: LoadedModel, spec_or_plan: EditSpec | EditPlan, source: Directions | None = None, mode: str = "auto"
) -> Iterator[AppliedEdit]:
    """``with applied(lm, spec, Directions(acts)):`` runs the block with the edit applied, then reverts it."""
    if isinstance(spec_or_plan, EditSpec):
        if source is None:
            raise AbliterateError("an EditSpec needs the directions to build its plan: pass Directions(acts)")
        spec_or_plan = build_plan(lm, spec_or_plan, source)
    handle = apply_plan(lm, spec_or_plan, mode)
    try:
        yield handle
    finally:
        handle.revert()
