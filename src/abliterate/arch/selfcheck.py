"""The anatomy loading uses: name patterns first (:func:`abliterate.arch.find_anatomy`), then a probe that checks them
(:mod:`abliterate.arch.verify`), then, for layers the patterns do not explain, writers found by probing
(:mod:`abliterate.arch.discovery`), checked again. Whatever still is not explained is refused in one line."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from abliterate.arch.anatomy import Anatomy, Writer, find_anatomy
from abliterate.arch.discovery import discover_writers, find_candidates
from abliterate.arch.verify import (
    LEAK_TOLERANCE,
    ZERO_TOLERANCE,
    LayerCheck,
    Verification,
    probe_ids,
    residual_leak,
    run_probe,
    verify_anatomy,
)
from abliterate.errors import ArchitectureError
from abliterate.ops.hooks import HookSet
from abliterate.ops.placement import execution_device, is_offloaded


def _names(writers: Sequence[Writer], prefix: str) -> str:
    return ", ".join(w.name.removeprefix(prefix + ".") for w in writers) or "none"


def _layer_error(model: nn.Module, anatomy: Anatomy, check: LayerCheck, candidates: Sequence[str]) -> ArchitectureError:
    cls, i = type(model).__name__, check.layer
    prefix = f"{anatomy.layers_path}.{i}"
    found = _names(anatomy.writers[i], prefix)
    if check.post_norm is not None:
        return ArchitectureError(
            f"{cls} normalizes the residual stream after each layer adds to it (layer {i}'s output is its "
            f"{check.post_norm}'s output: a post-LN residual), so no weight edit removes a direction exactly and "
            "abliterate cannot edit its weights"
        )
    if check.unexplained > ZERO_TOLERANCE:
        return ArchitectureError(
            f"layer {i} of {cls}: {min(check.unexplained, 1.0):.1%} of its residual update is not written by the "
            f"writers found ({found}); modules there with a hidden-size output: {', '.join(candidates) or 'none'}; "
            "pass writer_patterns=[...] naming the writers (or verify=False to skip this check)"
        )
    return ArchitectureError(
        f"layer {i} of {cls}: after ablating a random direction from its writers ({found}) {min(check.leak, 1.0):.1%} "
        "of it is still in the layer's residual update, so something between those writers and the residual "
        "(an unknown post-norm or gate) changes it; abliterate cannot edit this layer exactly"
    )


def _outside_modules(model: nn.Module, anatomy: Anatomy, ids: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """Modules outside the layers that run before layer 0 and output the hidden size (embedding-side writers)."""
    inside = {id(m) for m in anatomy.layers.modules()}
    hidden = anatomy.hidden_size
    ran: list[tuple[str, nn.Module]] = []
    started = [False]

    def edit(hooks: HookSet) -> None:
        hooks.watch_input(anatomy.layers[0], lambda _x: started.__setitem__(0, True))
        for name, m in model.named_modules():
            if name and id(m) not in inside and not isinstance(m, nn.ModuleList):

                def seen(x: torch.Tensor, name: str = name, m: nn.Module = m) -> None:
                    if not started[0] and x.shape[-1:] == (hidden,):
                        ran.append((name, m))

                hooks.watch_output(m, seen)

    run_probe(model, list(anatomy.layers), ids, edit)
    return ran


def _fix_embeddings(model: nn.Module, anatomy: Anatomy, ids: torch.Tensor) -> str | None:
    """Add embedding tables the patterns missed; return a description of what else touches the embeddings."""
    ran = _outside_modules(model, anatomy, ids)
    known = {id(w.module) for w in anatomy.embeddings}
    for name, m in ran:
        if isinstance(m, nn.Embedding) and id(m) not in known:
            anatomy.embeddings.append(Writer(name, m, "weight", 1, None, None, kind="embedding"))
            anatomy.discovered.append(name)
    others = [n for n, m in ran if not isinstance(m, (nn.Embedding, nn.Dropout)) and next(m.children(), None) is None]
    return ", ".join(others) if others else None


def _embedding_transform(model: nn.Module, anatomy: Anatomy, ids: torch.Tensor) -> str | None:
    """Name what lies between the token embedding's output ``e`` and layer 0's input ``x`` when it is one of the
    transforms no weight edit can follow, from two probes with the same positions and other tokens:
    ``x = c e + p(position)`` (a position term that is no embedding table, or a constant) or ``x = s * e + b`` with
    a different scale ``s`` per channel."""
    layers = list(anatomy.layers)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    for probe in (ids, ids.flip(-1)):
        got: dict[str, torch.Tensor] = {}

        def edit(hooks: HookSet, got: dict[str, torch.Tensor] = got) -> None:
            hooks.watch_output(anatomy.embeddings[0].module, lambda e: got.setdefault("e", e.detach().double()))
            hooks.watch_input(layers[0], lambda x: got.setdefault("x", x.detach().double()))

        run_probe(model, layers, probe, edit)
        if set(got) != {"e", "x"} or got["e"].shape != got["x"].shape:
            return None
        seen.append((got["e"], got["x"]))
    (e1, x1), (e2, x2) = seen
    de, dx = (e1 - e2).flatten(0, -2), (x1 - x2).flatten(0, -2)
    if float(de.norm()) == 0 or float(dx.norm()) == 0:
        return None
    c = float((dx * de).sum() / (de * de).sum())
    position = x1 - c * e1
    if float((dx - c * de).norm()) < 1e-5 * float(dx.norm()) and float(position.norm()) > 1e-3 * float(x1.norm()):
        rows = position.flatten(0, -2)
        if float((rows - rows.mean(0)).norm()) < 1e-5 * float(rows.norm()):
            return "it adds the same vector at every position (a bias outside any embedding table)"
        return (
            "it adds a term that depends only on the position and is not one of the model's embedding tables "
            "(e.g. sinusoidal positions computed in the forward pass)"
        )
    scale = (dx * de).sum(0) / (de * de).sum(0).clamp_min(1e-30)
    fits = float((dx - scale * de).norm()) < 1e-5 * float(dx.norm())
    if fits and float(scale.std()) > 1e-3 * float(scale.abs().mean()):
        return "it scales each channel of the embeddings by a different factor (a per-channel scale, not a weight row)"
    return None


def _transformed_rows(model: nn.Module, anatomy: Anatomy, ids: torch.Tensor) -> str | None:
    """The token embedding, when what its runtime edit acts on (its output, or the input of the norm inside it) is
    not (a scalar times) rows of its weight for the ids it is given: then editing it at runtime and editing its rows
    differ."""
    seen: list[tuple[Writer, torch.Tensor, torch.Tensor]] = []
    looked_up: list[torch.Tensor] = []

    def edit(hooks: HookSet) -> None:
        for w in anatomy.embeddings[:1]:  # an offloaded table's weight is not in memory: not checked
            if isinstance(w.module, nn.Embedding) and not is_offloaded(w.module) and w.weight.device.type != "meta":

                def grab(m: nn.Module, args: tuple, out: object, w: Writer = w) -> None:
                    if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                        seen.append((w, args[0].detach(), out.detach().float()))

                def lookup(m: nn.Module, args: tuple, w: Writer = w) -> None:
                    looked_up.append(args[0].detach())

                def rows_in(m: nn.Module, args: tuple, w: Writer = w) -> None:  # the norm inside sees the rows
                    if looked_up and args and isinstance(args[0], torch.Tensor):
                        seen.append((w, looked_up.pop(), args[0].detach().float()))

                if w.hook_input:
                    hooks.add(w.module.register_forward_pre_hook(lookup))
                    hooks.add(w.hook_module.register_forward_pre_hook(rows_in))
                else:
                    hooks.add(w.module.register_forward_hook(grab))

    run_probe(model, list(anatomy.layers), ids, edit)
    for w, idx, out in seen:
        if idx.dtype.is_floating_point or idx.numel() == 0:
            continue
        rows = w.weight.detach().float()[idx.long().clamp(0, w.weight.shape[0] - 1)]
        if rows.shape != out.shape:
            return f"{w.name} returns {tuple(out.shape)}, not rows of its {tuple(w.weight.shape)} weight"
        c = float((out * rows).sum() / (rows * rows).sum().clamp_min(1e-30))
        left = float((out - c * rows).norm()) / max(float(out.norm()), 1e-30)
        if left > 1e-4:
            kind = type(w.module).__name__
            return f"{w.name} ({kind}) transforms its rows ({left:.1%} of its output is not a scaled row)"
    return None


RESIDUAL_HINT = (
    "; to ablate it at run time instead, load it with residual_only=True (CLI: measure or chat --residual-stream), "
    "which projects the direction out of the residual stream itself at every layer"
)


def checked_anatomy(
    model: nn.Module,
    *,
    ids: torch.Tensor | None = None,
    layers_path: str | None = None,
    writer_patterns: Sequence[str] | None = None,
    residual_only: bool = False,
) -> Anatomy:
    """:func:`find_anatomy`, then a probe that checks every layer's update is explained by the writers found;
    layers that fail get their writers discovered (unless ``writer_patterns`` overrides them) and are checked
    again. Raises :class:`ArchitectureError` naming the layer when the writers cannot explain it.

    ``residual_only`` asks only that the layers carry one hidden-size residual stream: the anatomy is then for
    runtime ablation of that stream (hooks on every layer's input and output: the direction is then absent from
    the stream between layers, though a sublayer can still read what an earlier sublayer of its layer wrote),
    and records in ``weight_error`` why a weight edit would not be (None when it would)."""
    anatomy = find_anatomy(
        model, layers_path=layers_path, writer_patterns=writer_patterns, require_writers=False, search_layers=True
    )
    ids = (probe_ids(model) if ids is None else ids).to(execution_device(model, anatomy.embeddings[0].module))
    check = verify_anatomy(model, anatomy, ids)
    if check.width_error is not None:
        raise ArchitectureError(
            f"{type(model).__name__}: {check.width_error}; abliterate edits models whose layers add, one after "
            "another, to one residual stream"
        )
    if residual_only:
        if (problem := _residual_problem(model, anatomy, check, ids)) is not None:
            raise ArchitectureError(problem)
        anatomy.residual_only = True
        try:
            _check_writers(model, anatomy, check, ids, writer_patterns)
        except ArchitectureError as exc:
            anatomy.weight_error = str(exc)
        anatomy.verified = True
        return anatomy
    try:
        _check_writers(model, anatomy, check, ids, writer_patterns)
    except ArchitectureError as exc:  # name the runtime path only where it works
        hint = RESIDUAL_HINT if _residual_problem(model, anatomy, check, ids) is None else ""
        raise ArchitectureError(f"{exc}{hint}") from None
    return anatomy


def _residual_problem(model: nn.Module, anatomy: Anatomy, check: Verification, ids: torch.Tensor) -> str | None:
    """Why runtime ablation of the residual stream itself would not work for ``model``: layers that loop or add
    positions, hooks the forward rejects or that do not take effect (None: it works)."""
    cls = type(model).__name__
    if (why := check.not_single_pass or check.token_error) is not None:
        return (
            f"{cls}: {why}; runtime ablation of the residual stream needs layers that each read it once per forward "
            "pass, one position per token"
        )
    try:
        leak = residual_leak(model, anatomy, ids)
    except Exception as exc:  # the model's own code rejects hooked outputs: reported, not suppressed
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{cls}: runtime ablation of the residual stream breaks its forward pass ({type(exc).__name__}: {first})"
    weight = anatomy.embeddings[0].weight
    eps = torch.finfo(weight.dtype).eps if weight.is_floating_point() else 0.0
    if leak > LEAK_TOLERANCE + (8 * eps if eps > 1e-6 else 0.0):  # rounding a half-precision stream
        return (
            f"{cls}: after projecting a random direction out of every layer's input and output {min(leak, 1.0):.1%} "
            "of it is still in the residual stream; runtime ablation does not take effect here"
        )
    return None


def _check_writers(
    model: nn.Module, anatomy: Anatomy, check: Verification, ids: torch.Tensor, writer_patterns: Sequence[str] | None
) -> None:
    """Everything a weight edit needs beyond one residual stream; fixes what discovery can, raises the rest."""
    if check.writer_error is not None:
        raise ArchitectureError(check.writer_error)
    if check.gap is not None:
        raise ArchitectureError(
            f"{type(model).__name__}: {check.gap}; abliterate edits models whose layers add, one after "
            "another, to one residual stream"
        )
    if check.not_single_pass is not None:
        raise ArchitectureError(
            f"{type(model).__name__}: {check.not_single_pass}; abliterate captures and edits models whose layers "
            "each read the residual stream once per forward pass"
        )
    if (rows := _transformed_rows(model, anatomy, ids)) is not None:
        raise ArchitectureError(
            f"{type(model).__name__}: {rows}, so removing a direction from its output at runtime and from its weight "
            "differ; abliterate cannot edit this model exactly"
        )
    if check.embedding_leak > check.embedding_tolerance:
        other = _fix_embeddings(model, anatomy, ids)
        check = verify_anatomy(model, anatomy, ids)
        if check.embedding_leak > check.embedding_tolerance:
            kind = _embedding_transform(model, anatomy, ids)
            raise ArchitectureError(
                f"{type(model).__name__} transforms the embeddings before the first layer"
                f"{f' ({other})' if other else ''}{f': {kind}' if kind else ''}: after ablating a random direction "
                f"from the embeddings {min(check.embedding_leak, 1.0):.1%} of it still reaches layer 0, so "
                "abliterate cannot edit this model exactly"
            )
    if check.failed:
        first = check.failed[0]
        if first.post_norm is not None or writer_patterns:
            cands = find_candidates(model, list(anatomy.layers), [first.layer], ids, anatomy.hidden_size)
            raise _layer_error(model, anatomy, first, [c.rel for c in cands[first.layer] if not c.is_norm])
        fix = [c.layer for c in check.failed]
        found = discover_writers(model, list(anatomy.layers), anatomy.layers_path, fix, ids, anatomy.hidden_size)
        if found.unexplained:
            i = min(found.unexplained)
            bad = next(c for c in check.failed if c.layer == i)
            raise _layer_error(model, anatomy, bad, found.candidates[i])
        for i, writers in found.writers.items():
            old = {(w.name, id(w.post_norm)) for w in anatomy.writers[i]}
            anatomy.writers[i] = writers
            norms = {id(m): n for n, m in anatomy.layers[i].named_modules()}
            anatomy.discovered += [
                w.name + (f" (through {norms[id(w.post_norm)]})" if w.post_norm is not None else "")
                for w in writers
                if (w.name, id(w.post_norm)) not in old
            ]
        check = verify_anatomy(model, anatomy, ids)
        if check.failed:
            first = check.failed[0]
            raise _layer_error(model, anatomy, first, found.candidates.get(first.layer, []))
    silent = [i for i in check.not_run if not anatomy.writers[i]]
    if silent:
        raise ArchitectureError(
            f"layer {silent[0]} of {type(model).__name__} never ran on the probe and no pattern names its writers; "
            "pass writer_patterns=[...] naming them"
        )
    anatomy.verified = True
