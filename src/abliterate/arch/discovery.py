"""Automatic writer discovery: find, by hooks on a probe forward, the modules whose outputs make up each layer's
residual update, for architectures that no name pattern in :mod:`abliterate.arch.anatomy` describes.

Candidates are a layer's modules that hold a weight with a hidden-size axis (linear, Conv1D, embedding, fused
expert containers) or are norms, and whose output has the hidden size. With all of them zeroed a layer's update
must vanish (else the layer cannot be explained). Then, in the order the candidates finish, each is dropped from
the zeroed set if the update still vanishes without it: what remains are the last modules on every path into the
residual. A norm that remains is a post-norm; its writer is the candidate whose output is the norm's input.
Numbered siblings (experts ``3`` and ``7`` ran, ``0..63`` exist) are generalised to all of them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from abliterate.arch.anatomy import Writer, make_writer
from abliterate.arch.verify import ZERO_TOLERANCE, ProbeHooks, run_probe, unexplained
from abliterate.ops.hooks import HookSet

Edit = Callable[[HookSet], None]


@dataclass
class Candidate:
    rel: str
    module: nn.Module
    order: int
    is_norm: bool


def _is_norm(module: nn.Module) -> bool:
    """A normalization: named like one, no submodules, only vector parameters (not a block that holds norms)."""
    return (
        "norm" in type(module).__name__.lower()
        and next(module.children(), None) is None
        and all(p.dim() <= 1 for p in module.parameters(recurse=False))
    )


def _has_hidden_weight(module: nn.Module, hidden: int) -> bool:
    return any(p.dim() >= 2 and hidden in p.shape[-2:] for p in module.parameters(recurse=False)) or (
        hasattr(module, "out_features") and getattr(module, "out_features", None) == hidden
    )


class _Tracker:
    """Which layer is running (layers may call shared modules: zero them only for the layers that ask)."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.layers = layers
        self.stack: list[int] = []

    def install(self, hooks: HookSet) -> None:
        for i, layer in enumerate(self.layers):
            hooks.watch_input(layer, lambda _x, i=i: self.stack.append(i))
            hooks.watch_output(layer, lambda _x: self.stack.pop() if self.stack else None)

    @property
    def current(self) -> int | None:
        return self.stack[-1] if self.stack else None


def _zero_sets(tracker: _Tracker, zero: dict[int, list[nn.Module]]) -> Edit:
    by_module: dict[int, tuple[nn.Module, set[int]]] = {}
    for layer, modules in zero.items():
        for m in modules:
            by_module.setdefault(id(m), (m, set()))[1].add(layer)

    def edit(hooks: HookSet) -> None:
        tracker.install(hooks)
        for module, layers in by_module.values():
            hooks.on_output(module, lambda x, layers=layers: torch.zeros_like(x) if tracker.current in layers else x)

    return edit


def find_candidates(
    model: nn.Module, layers: Sequence[nn.Module], fix: Sequence[int], ids: torch.Tensor, hidden: int
) -> dict[int, list[Candidate]]:
    """Per layer to fix: the candidates that ran with a hidden-size output, blocks first, then in finishing order."""
    tracker = _Tracker(layers)
    order: dict[int, dict[str, int]] = {i: {} for i in fix}
    counter = [0]
    pool = {
        i: [(n, m) for n, m in layers[i].named_modules() if n and (_is_norm(m) or _has_hidden_weight(m, hidden))]
        for i in fix
    }

    def edit(hooks: ProbeHooks) -> None:
        tracker.install(hooks)
        for i, mods in pool.items():
            for rel, module in mods:

                def record(_mod: nn.Module, _args: tuple, output: object, i: int = i, rel: str = rel) -> None:
                    if tracker.current != i:
                        return
                    out = output if isinstance(output, torch.Tensor) else None
                    if out is None and isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
                        out = output[0]
                    usable = out is not None and out.dim() >= 1 and out.shape[-1] == hidden and out.is_floating_point()
                    if usable and rel not in order[i]:
                        order[i][rel] = counter[0]
                    counter[0] += 1

                hooks.add(module.register_forward_hook(record))

    run_probe(model, layers, ids, edit)
    found: dict[int, list[Candidate]] = {}
    for i in fix:
        mods = dict(pool[i])
        cands = [Candidate(rel, mods[rel], at, _is_norm(mods[rel])) for rel, at in order[i].items()]
        # try to drop a block before the modules inside it (keep the innermost writer), then by finishing order
        inner = {c.rel for c in cands if any(o.rel.startswith(c.rel + ".") for o in cands)}
        found[i] = sorted(cands, key=lambda c: (c.rel not in inner, c.order))
    return found


@dataclass
class Discovery:
    """Per fixed layer: the writers found, or why not (``unexplained``: the update left with every candidate
    zeroed; ``candidates``: names of modules with a hidden-size output)."""

    writers: dict[int, list[Writer]]
    unexplained: dict[int, float]
    candidates: dict[int, list[str]]


@dataclass
class _Problem:
    """Find the fewest candidates whose zeroing makes the layer's update (or ``norm``'s input) vanish."""

    layer: int
    order: list[Candidate]
    keep: list[Candidate]
    norm: Candidate | None = None


class _Search:
    def __init__(self, model: nn.Module, layers: Sequence[nn.Module], ids: torch.Tensor) -> None:
        self.model, self.layers, self.ids = model, layers, ids
        self.tracker = _Tracker(layers)
        self.base = run_probe(model, layers, ids)
        self.base_norms: dict[int, torch.Tensor] = {}

    def _run(self, problems: Sequence[_Problem], zero: dict[int, list[nn.Module]]) -> dict[int, float]:
        """Left-over per problem (by position) with ``zero`` zeroed (at most one problem per layer)."""
        norm_in: dict[int, torch.Tensor] = {}
        zero_edit = _zero_sets(self.tracker, zero)

        def edit(hooks: HookSet) -> None:
            zero_edit(hooks)
            for k, p in enumerate(problems):
                if p.norm is not None:

                    def grab(x: torch.Tensor, k: int = k, i: int = p.layer) -> None:
                        if self.tracker.current == i and k not in norm_in:
                            norm_in[k] = x.detach().float().clone()

                    hooks.watch_input(p.norm.module, grab)

        calls = run_probe(self.model, self.layers, self.ids, edit)
        out: dict[int, float] = {}
        for k, p in enumerate(problems):
            if p.norm is None:
                pairs = zip(self.base[p.layer], calls[p.layer], strict=False)
                out[k] = max((unexplained(b, z) for b, z in pairs), default=float("inf"))
            else:
                got, ref = norm_in.get(k), self.base_norms.get(k)
                out[k] = float("inf") if got is None or ref is None else float(got.norm() / ref.norm().clamp_min(1e-30))
        return out

    def minimize(self, problems: list[_Problem]) -> dict[int, float]:
        """Greedy, all problems at once: drop candidates in finishing order while the target still vanishes.
        Returns the left-over with every candidate zeroed, per problem."""
        if any(p.norm is not None for p in problems):
            self.base_norms = self._norm_inputs(problems)
        full = self._run(problems, self._zero(problems))
        live = [k for k, p in enumerate(problems) if full[k] <= ZERO_TOLERANCE]
        for step in range(max((len(problems[k].order) for k in live), default=0)):
            trial: dict[int, list[Candidate]] = {}
            for k in live:
                p = problems[k]
                if step < len(p.order) and p.order[step] in p.keep:
                    trial[k] = [c for c in p.keep if c is not p.order[step]]
            if not trial:
                continue
            sets = {k: trial.get(k, problems[k].keep) for k in live}
            result = self._run(
                [problems[k] for k in live], self._zero([problems[k] for k in live], [sets[k] for k in live])
            )
            for j, k in enumerate(live):
                if k in trial and result[j] <= ZERO_TOLERANCE:
                    problems[k].keep = trial[k]
        return full

    @staticmethod
    def _zero(
        problems: Sequence[_Problem], sets: Sequence[list[Candidate]] | None = None
    ) -> dict[int, list[nn.Module]]:
        chosen = sets if sets is not None else [p.keep for p in problems]
        return {p.layer: [c.module for c in keep] for p, keep in zip(problems, chosen, strict=True)}

    def _norm_inputs(self, problems: Sequence[_Problem]) -> dict[int, torch.Tensor]:
        got: dict[int, torch.Tensor] = {}

        def edit(hooks: HookSet) -> None:
            self.tracker.install(hooks)
            for k, p in enumerate(problems):
                assert p.norm is not None

                def grab(x: torch.Tensor, k: int = k, i: int = p.layer) -> None:
                    if self.tracker.current == i and k not in got:
                        got[k] = x.detach().float().clone()

                hooks.watch_input(p.norm.module, grab)

        run_probe(self.model, self.layers, self.ids, edit)
        return got


def discover_writers(
    model: nn.Module, layers: Sequence[nn.Module], layers_path: str, fix: Sequence[int], ids: torch.Tensor, hidden: int
) -> Discovery:
    """Find the writers of layers ``fix`` (see the module docstring)."""
    cands = find_candidates(model, layers, fix, ids, hidden)
    search = _Search(model, layers, ids)
    problems = [_Problem(i, list(cands[i]), list(cands[i])) for i in fix]
    full = search.minimize(problems)
    bad = {p.layer: full[k] for k, p in enumerate(problems) if full[k] > ZERO_TOLERANCE}
    # each norm left is a post-norm: find the candidates feeding it, one norm per layer per pass
    feeds: dict[tuple[int, str], list[Candidate]] = {}
    pending = {p.layer: [c for c in p.keep if c.is_norm] for p in problems if p.layer not in bad}
    while any(pending.values()):
        batch = []
        for i, norms in pending.items():
            if norms:
                n = norms.pop(0)
                before = [c for c in cands[i] if not c.is_norm and c.order < n.order]
                batch.append(_Problem(i, before, list(before), n))
        left = search.minimize(batch)
        for k, p in enumerate(batch):
            assert p.norm is not None
            if left[k] > ZERO_TOLERANCE or not p.keep:
                bad[p.layer] = 1.0
            feeds[(p.layer, p.norm.rel)] = p.keep
    writers: dict[int, list[Writer]] = {}
    for p in problems:
        if p.layer in bad:
            continue
        pairs = [(c.rel, None) for c in p.keep if not c.is_norm]
        pairs += [(f.rel, n.module) for n in p.keep if n.is_norm for f in feeds[(p.layer, n.rel)]]
        found = _writers_for(layers[p.layer], p.layer, f"{layers_path}.{p.layer}", pairs, hidden)
        if found is None:
            bad[p.layer] = 1.0
        else:
            writers[p.layer] = found
    names = {i: [c.rel for c in cands[i] if not c.is_norm] for i in fix}
    return Discovery(writers, bad, names)


def _writers_for(
    layer: nn.Module, index: int, prefix: str, pairs: list[tuple[str, nn.Module | None]], hidden: int
) -> list[Writer] | None:
    """Writers for (module name, post-norm) pairs, numbered siblings included; ``None`` if one is not a writer."""
    modules = dict(layer.named_modules())
    writers: list[Writer] = []
    done: set[str] = set()
    for rel, post in pairs:
        for name in _siblings(rel, modules):
            if name in done:
                continue
            w = make_writer(layer, modules[name], name, index, prefix, hidden, post)
            if w is None:
                return None
            writers.append(w)
            done.add(name)
    return writers


def _siblings(rel: str, modules: dict[str, nn.Module]) -> list[str]:
    """``rel`` and the modules that differ from it only in numbered path parts (experts that did not run)."""
    if not re.search(r"\.\d+(\.|$)", rel):
        return [rel]
    pattern = re.compile(re.sub(r"\\\.\d+(?=\\\.|$)", r"\\.\\d+", re.escape(rel)))
    like = type(modules[rel])
    return [n for n, m in modules.items() if pattern.fullmatch(n) and type(m) is like]
