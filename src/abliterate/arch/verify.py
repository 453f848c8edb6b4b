"""Self-verified anatomy: a probe of a few tokens checks that the writers found explain every layer's update.

Next to a plain run, two runs with hooks decide it for every decoder layer at once:

* **zeroed**: what the weight edit edits is zeroed (a linear module's output by a hook; a fused-experts
  container's weight and bias swapped for zeros while its layer runs, so anything it adds besides them shows).
  The layer's output must then be its input (or a scalar multiple of it); whatever is left is written by
  something that was not found.
* **ablated**: a random ``k``-dimensional subspace ``U`` projected out of every writer's output exactly as
  :func:`abliterate.ablate` does (through post-norms). The layer's update must then have no component in ``U``;
  whatever is left comes from a transform between a writer and the residual (an unknown post-norm, a gate).

The plain run also checks that every layer takes what the previous one returned (one residual stream, nothing
written between layers) and the ablated run that the embeddings reach layer 0 without the subspace. A layer whose
output is a normalization of the sum (post-LN residual) is recognised and reported as such.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from abliterate.arch.anatomy import Anatomy, Writer
from abliterate.arch.projection import hook_writer, writer_basis, writer_fn
from abliterate.arch.streams import (
    Calls,
    as_streams,
    gap_error,
    residual_hooks,
    single_pass_error,
    token_error,
    width_error,
)
from abliterate.errors import ArchitectureError, DirectionError
from abliterate.ops.hooks import HookSet, first_tensor
from abliterate.ops.placement import execution_device, is_offloaded

PROBE_TOKENS = 8
PROBE_RANK = 8
ZERO_TOLERANCE = 1e-3
LEAK_TOLERANCE = 1e-3


@dataclass(frozen=True)
class LayerCheck:
    """One decoder layer on the probe: ``unexplained`` is the fraction of its update left with every writer
    zeroed, ``leak`` the fraction of a random subspace's component left in its update after ablating it."""

    layer: int
    unexplained: float
    leak: float
    leak_tolerance: float
    post_norm: str | None = None  # the layer's output is this norm's output (post-LN residual)

    @property
    def ok(self) -> bool:
        return self.unexplained <= ZERO_TOLERANCE and self.leak <= self.leak_tolerance


@dataclass
class Verification:
    """What the probe found: one :class:`LayerCheck` per layer that ran, the embeddings' leak into layer 0's
    input, and the layers the probe never ran (left unchecked)."""

    layers: list[LayerCheck] = field(default_factory=list)
    embedding_leak: float = 0.0
    embedding_tolerance: float = LEAK_TOLERANCE
    not_run: list[int] = field(default_factory=list)
    # the layers do not carry one hidden-size stream (nothing else was checked)
    width_error: str | None = None
    # something changes the residual between one layer's output and the next layer's input
    gap: str | None = None
    # a layer that runs more than once in one forward (a loop)
    not_single_pass: str | None = None
    # the layers' token axis is not the input's (extra positions: a prefix or more streams along the tokens)
    token_error: str | None = None
    # a writer whose edit cannot be built (what follows it is neither a norm nor a per-channel filter)
    writer_error: str | None = None

    @property
    def failed(self) -> list[LayerCheck]:
        return [c for c in self.layers if not c.ok]

    @property
    def ok(self) -> bool:
        return (
            self.width_error is None
            and self.gap is None
            and self.not_single_pass is None
            and self.writer_error is None
            and not self.failed
            and self.embedding_leak <= self.embedding_tolerance
        )


class ProbeHooks(HookSet):
    """Hooks for one probe run; :meth:`zero_weights` swaps a module's parameters for zeros during each of its calls
    (one module's zeros exist at a time) and always puts the originals back, on exceptions too."""

    def __init__(self) -> None:
        super().__init__()
        self._swapped: list[tuple[nn.Module, str, nn.Parameter]] = []

    def add(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def zero_weights(self, scope: nn.Module, params: Sequence[tuple[nn.Module, str]]) -> None:
        """While ``scope`` runs, each ``(module, name)`` parameter is a tensor of zeros."""

        def swap_in(_scope: nn.Module, _args: Any) -> None:
            for mod, name in params:
                old = mod._parameters[name]
                assert old is not None
                self._swapped.append((mod, name, old))
                mod._parameters[name] = nn.Parameter(torch.zeros_like(old), requires_grad=False)

        def swap_out(_scope: nn.Module, _args: Any, _out: Any) -> None:
            self._restore()

        self.add(scope.register_forward_pre_hook(swap_in))
        self.add(scope.register_forward_hook(swap_out))

    def _restore(self) -> None:
        while self._swapped:
            mod, name, old = self._swapped.pop()
            mod._parameters[name] = old

    def close(self) -> None:
        self._restore()
        super().close()


def probe_ids(model: nn.Module, tokens: int = PROBE_TOKENS) -> torch.Tensor:
    """Token ids spread over the vocabulary (skipping the lowest ids, where special tokens usually sit)."""
    weight = getattr(model.get_input_embeddings(), "weight", None)
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    vocab = int(weight.shape[0]) if isinstance(weight, torch.Tensor) else int(getattr(text, "vocab_size", 256))
    start = min(vocab - 1, max(3, vocab // 16))
    step = max(1, (vocab - start) // (tokens + 1))
    return (start + step * torch.arange(tokens)).clamp_max(vocab - 1)[None]


def random_basis(hidden: int, rank: int = PROBE_RANK, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(hidden, min(rank, hidden), generator=gen, dtype=torch.float64))
    return q.T.contiguous().float()


def _hidden_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hidden = kwargs.get("hidden_states")
    return hidden if isinstance(hidden, torch.Tensor) else None


def run_probe(
    model: nn.Module,
    layers: Sequence[nn.Module],
    ids: torch.Tensor,
    edit: Callable[[ProbeHooks], None] | None = None,
    order: list[int] | None = None,
) -> Calls:
    """One forward pass on ``ids`` with ``edit``'s hooks in place; every layer's (input, output) per call
    (and, into ``order``, the layer index of every call as it finishes)."""
    calls: Calls = [[] for _ in layers]
    order = [] if order is None else order
    pending: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    with ProbeHooks() as hooks:
        if edit is not None:
            edit(hooks)
        handles = []
        for i, layer in enumerate(layers):

            def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], i: int = i) -> None:
                hidden = _hidden_arg(args, kwargs)
                pending[i].append(hidden.detach().float().clone() if hidden is not None else torch.empty(0))

            def post(_m: nn.Module, _args: Any, output: Any, i: int = i) -> None:
                inp = pending[i].pop() if pending[i] else torch.empty(0)
                calls[i].append((inp, first_tensor(output).detach().float().clone()))
                order.append(i)

            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.register_forward_hook(post))
        try:
            with torch.no_grad():
                forward(model, ids)
        finally:
            for h in handles:
                h.remove()
    return calls


def forward(model: nn.Module, ids: torch.Tensor) -> Any:
    """``model(input_ids=ids, use_cache=False)``, or without ``use_cache``, or with ``ids`` positional, whichever
    the forward's signature takes."""
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return model(ids)
    if "use_cache" in params:
        return model(input_ids=ids, use_cache=False)
    return model(input_ids=ids)


def _zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


def _exactly_linear(module: nn.Module) -> bool:
    """Modules whose output is ``W x + b`` by construction: zeroing the output is zeroing the weights."""
    return isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ == "Conv1D"


def zero_writers(writers: Sequence[Writer], layers: Sequence[nn.Module]) -> Callable[[ProbeHooks], None]:
    """Zero what the weight edit edits. A linear/embedding module's output is zeroed by a hook; any other writer
    (a fused-experts container) gets its weight and bias swapped for zeros while its layer runs (one layer's
    zeros at a time), so that whatever it adds besides its weight's output (identity experts, a scale, a
    constant) is still seen, wherever its parent reads the weight."""
    hooked: dict[int, nn.Module] = {}
    swapped: dict[int, list[tuple[nn.Module, str]]] = {}
    for w in writers:
        if w.layer is None:
            continue
        if _exactly_linear(w.module) or is_offloaded(w.module):
            hooked[id(w.module)] = w.module
        else:
            swapped.setdefault(w.layer, []).extend((w.module, n) for n in (w.param, w.bias) if n)

    def edit(hooks: ProbeHooks) -> None:
        for module in hooked.values():
            hooks.on_output(module, _zero)
        for layer, params in swapped.items():
            hooks.zero_weights(layers[layer], params)

    return edit


def ablate_writers(writers: Sequence[Writer], basis: torch.Tensor, hidden: int) -> Callable[[HookSet], None]:
    """The same hooks as :func:`abliterate.ablate`: each writer loses its (post-norm-scaled) basis."""

    def edit(hooks: HookSet) -> None:
        for w in writers:
            hook_writer(hooks, w, writer_fn(w, writer_basis(w, basis, hidden), 1.0))

    return edit


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    d = float(den.norm())
    return float(num.norm()) / d if d > 0 else (0.0 if float(num.norm()) == 0 else math.inf)


def unexplained(base: tuple[torch.Tensor, torch.Tensor], zeroed: tuple[torch.Tensor, torch.Tensor]) -> float:
    """What is left of the update with every writer zeroed, allowing a scaled residual (``c * input``)."""
    b_in, b_out = base
    z_in, z_out = zeroed
    if b_in.shape != b_out.shape or z_in.shape != z_out.shape:
        return math.inf
    scale = float((z_out * z_in).sum() / (z_in * z_in).sum().clamp_min(1e-30))
    return _ratio(z_out - scale * z_in, b_out - b_in)


def _leak(ablated: tuple[torch.Tensor, torch.Tensor], basis: torch.Tensor) -> float:
    inp, out = ablated
    if inp.shape != out.shape:
        return math.inf
    update = as_streams(out - inp, basis.shape[1])
    expected = float(update.norm()) * math.sqrt(basis.shape[0] / basis.shape[1])
    return float((update @ basis.T.to(update.device)).norm()) / expected if expected > 0 else 0.0


def _leak_tolerance(call: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> float:
    """Rounding the residual sum in a half dtype leaves ~eps * |output| in every direction."""
    inp, out = call
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.bfloat16).eps
    if eps < 1e-6 or inp.shape != out.shape:
        return LEAK_TOLERANCE
    return LEAK_TOLERANCE + 8 * eps * _ratio(out, out - inp)


def norm_outputs(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in layer.named_modules() if n and "norm" in type(m).__name__.lower()]


def _multiple_of(out: torch.Tensor, x: torch.Tensor) -> bool:
    """``out == c * x`` for some scalar ``c`` (up to float32 rounding)."""
    if x.shape != out.shape:
        return False
    c = float((out * x).sum() / (x * x).sum().clamp_min(1e-30))
    return _ratio(out - c * x, out) < 1e-5


def _post_ln(
    model: nn.Module, layers: Sequence[nn.Module], ids: torch.Tensor, writers: Sequence[Writer], failing: list[int]
) -> dict[int, str]:
    """Failing layers whose output, with every writer zeroed, is (a multiple of) the output of one of their own
    norms: the norm acts on the residual stream itself (post-LN, or a normalized residual branch)."""
    seen: dict[int, list[tuple[str, torch.Tensor]]] = {i: [] for i in failing}
    zero = zero_writers(writers, layers)

    def edit(hooks: HookSet) -> None:
        zero(hooks)
        for i in failing:
            for name, norm in norm_outputs(layers[i]):
                hooks.watch_output(norm, lambda x, i=i, name=name: seen[i].append((name, x.detach().float().clone())))

    calls = run_probe(model, layers, ids, edit)
    found: dict[int, str] = {}
    for i in failing:
        for _inp, out in calls[i][:1]:
            for name, x in seen[i]:
                if _multiple_of(out, x):
                    found[i] = name
    return found


def verify_anatomy(model: nn.Module, anatomy: Anatomy, ids: torch.Tensor | None = None) -> Verification:
    """Check ``anatomy`` on one short probe (three forward passes over a few tokens); raises nothing."""
    if ids is None:
        ids = probe_ids(model)
    ids = ids.to(execution_device(model, anatomy.embeddings[0].module))
    layers = list(anatomy.layers)
    writers = anatomy.all_writers()
    basis = random_basis(anatomy.hidden_size)
    order: list[int] = []
    base = run_probe(model, layers, ids, order=order)
    result = Verification()
    if not order:
        result.width_error = f"the probe never ran a layer of {anatomy.layers_path}"
    else:
        result.width_error = width_error(base, anatomy.hidden_size, tuple(ids.shape))
    if result.width_error is not None:
        return result
    result.gap = gap_error(base, order)
    result.not_single_pass = single_pass_error(base)
    result.token_error = token_error(base, anatomy.hidden_size, tuple(ids.shape))
    zeroed = run_probe(model, layers, ids, zero_writers(writers, layers))
    try:
        ablated = run_probe(
            model, layers, ids, ablate_writers([*anatomy.embeddings, *writers], basis, anatomy.hidden_size)
        )
    except (ArchitectureError, DirectionError) as exc:  # a writer whose basis cannot be built: no weight edit
        result.writer_error = str(exc)
        return result
    dtype = anatomy.embeddings[0].weight.dtype
    for i in range(len(layers)):
        if not base[i] or len(zeroed[i]) != len(base[i]) or len(ablated[i]) != len(base[i]):
            result.not_run.append(i)
            continue
        left = max(unexplained(b, z) for b, z in zip(base[i], zeroed[i], strict=True))
        leak = max(_leak(a, basis) for a in ablated[i])
        tolerance = max(_leak_tolerance(b, dtype) for b in base[i])
        result.layers.append(LayerCheck(i, left, leak, tolerance))
    if ablated and ablated[0]:
        first = as_streams(ablated[0][0][0], anatomy.hidden_size)
        expected = float(first.norm()) * math.sqrt(basis.shape[0] / basis.shape[1])
        result.embedding_leak = float((first @ basis.T).norm()) / expected if expected > 0 else 0.0
        eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
        result.embedding_tolerance = LEAK_TOLERANCE + (8 * eps if eps > 1e-6 else 0.0)
    zero_failed = [c.layer for c in result.layers if c.unexplained > ZERO_TOLERANCE]
    if zero_failed:
        post = _post_ln(model, layers, ids, writers, zero_failed)
        result.layers = [
            LayerCheck(c.layer, c.unexplained, c.leak, c.leak_tolerance, post.get(c.layer)) for c in result.layers
        ]
    return result


def residual_leak(model: nn.Module, anatomy: Anatomy, ids: torch.Tensor) -> float:
    """With a random subspace projected out of the residual stream at every layer's input and output (the hooks of
    runtime residual-stream ablation), the largest fraction of it left in any layer's input or output."""
    basis = random_basis(anatomy.hidden_size)
    layers = list(anatomy.layers)
    scales = dict.fromkeys(range(len(layers)), 1.0)
    calls = run_probe(model, layers, ids, lambda h: residual_hooks(h, layers, basis, anatomy.hidden_size, scales, 1.0))
    worst = 0.0
    for per_layer in calls:
        for inp, out in per_layer:
            for x in (inp, out):
                view = as_streams(x, anatomy.hidden_size)
                expected = float(view.norm()) * math.sqrt(basis.shape[0] / basis.shape[1])
                worst = max(worst, float((view @ basis.T).norm()) / expected if expected > 0 else 0.0)
    return worst
