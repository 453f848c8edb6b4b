"""Automatic, explainable choice of the direction to ablate (after Arditi et al. 2024).

Every candidate (layer x captured position x method) is scored without generation on validation
prompts that did not build the direction:

* bypass: mean refusal score on harmful prompts with the candidate ablated everywhere (lower is
  better);
* induce: mean refusal score on harmless prompts with the candidate added at its own layer
  (must rise more than ``min_induce`` above the unedited model's score on the same prompts, to
  show the direction really carries refusal);
* KL: mean KL(base || ablated) of the first response token on harmless prompts.

Candidates in the last ``skip_last`` fraction of layers, that lower the harmful refusal score by
less than ``min_bypass_drop``, that raise the harmless one by less than ``min_induce``, or with KL
above ``kl_threshold`` are filtered out; the best bypass among the rest wins. If no candidate is under
the KL threshold, the threshold is doubled (up to ``max_kl``) until one is, and the note says so.
The whole table is kept.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from abliterate.edit.interventions import ablate, add
from abliterate.errors import PromptError
from abliterate.lm.model import LoadedModel
from abliterate.measure import directions as dirs
from abliterate.measure.capture import Activations, Position, check_prompts
from abliterate.measure.directions import Direction, DirectionSet
from abliterate.select.scorer import Scorer

MIN_VALIDATION = 8
NO_REFUSAL_LOGODDS = -2.0  # mean refusal log-odds below this: the model does not refuse (p < ~0.12)
SweepProgress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Method:
    """A direction method by name, with its arguments (e.g. ``Method("slerp", {"t": 0.5})``)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in sorted(self.kwargs.items()))
        return f"{self.name}({args})" if args else self.name


@dataclass
class CandidateScore:
    layer: int
    position: Position
    method: str
    bypass: float
    induce: float
    kl: float
    passed: bool = False
    reason: str = ""


@dataclass
class Selection:
    """The outcome of a sweep: every candidate's scores, the winner (or why there is none)."""

    candidates: list[CandidateScore]
    chosen: CandidateScore | None
    base_bypass: float
    base_induce: float
    baseline_refuses: bool
    note: str
    settings: dict[str, Any]
    seconds: float
    direction_sets: dict[str, DirectionSet] = field(default_factory=dict, repr=False)

    def direction(self, candidate: CandidateScore | None = None) -> Direction:
        """The unit direction of ``candidate`` (default: the chosen one)."""
        cand = candidate or self.chosen
        if cand is None:
            raise PromptError(f"no candidate was selected: {self.note}")
        return self.direction_sets[cand.method][cand.layer, cand.position]

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": asdict(self.chosen) if self.chosen else None,
            "base_bypass": self.base_bypass,
            "base_induce": self.base_induce,
            "baseline_refuses": self.baseline_refuses,
            "note": self.note,
            "settings": self.settings,
            "seconds": self.seconds,
            "candidates": [asdict(c) for c in self.candidates],
        }


def check_validation(acts: Activations, harmful_val: Sequence[str], harmless_val: Sequence[str]) -> None:
    """Refuse validation sets that are too small; warn (with a count) on overlap with the training prompts."""
    for name, prompts in (("harmful validation", harmful_val), ("harmless validation", harmless_val)):
        check_prompts(prompts, name, minimum=MIN_VALIDATION)
    overlap = len(set(harmful_val) & set(acts.harmful_prompts)) + len(set(harmless_val) & set(acts.harmless_prompts))
    if overlap:
        warnings.warn(
            f"{overlap} validation prompt(s) also built the direction; scores will be optimistic — "
            "use disjoint sets (e.g. the bundled 'val' split)",
            stacklevel=3,
        )


def validation_scorer(
    lm: LoadedModel,
    acts: Activations,
    harmful_val: list[str],
    harmless_val: list[str],
    batch_size: int,
    scorer: Scorer | None,
) -> Scorer:
    """``scorer`` if it holds these validation prompts and the capture's system prompt, else a new one."""
    system = acts.meta.get("system")
    if scorer is None:
        return Scorer(lm, harmful_val, harmless_val, system=system, batch_size=batch_size)
    if scorer.lm is not lm:
        raise PromptError("the scorer was built for another model; build it with this model")
    if scorer.harmful != harmful_val or scorer.harmless != harmless_val or scorer.system != system:
        raise PromptError(
            "the scorer holds other validation prompts or another system prompt than this call; "
            "build it with the same harmful/harmless validation prompts and the capture's system prompt"
        )
    return scorer


@dataclass(frozen=True)
class SweepSettings:
    """What the sweep scores and how it filters (the defaults are :func:`select`'s)."""

    methods: Sequence[Method] = (Method("mean_diff"),)
    layers: Sequence[int] | None = None  # None: every layer
    skip_last: float = 0.2  # the last fraction of layers, not scored (unless score_skipped) and never chosen
    kl_threshold: float = 0.1
    min_induce: float = 0.5
    min_bypass_drop: float = 1.0
    max_kl: float = 1.0  # the KL threshold is doubled up to this while no candidate passes
    score_skipped: bool = False
    batch_size: int = 16
    prefer: str = "bypass"  # or "induce": the passing candidate that raises the harmless score the most

    def check(self) -> None:
        if self.prefer not in ("bypass", "induce"):
            raise PromptError(f"prefer must be bypass or induce, got {self.prefer!r}")
        if not 0 < self.kl_threshold <= self.max_kl:
            raise PromptError(f"need 0 < kl_threshold <= max_kl, got {self.kl_threshold} and {self.max_kl}")


def select(
    lm: LoadedModel,
    acts: Activations,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    settings: SweepSettings | None = None,
    *,
    progress: SweepProgress | None = None,
    scorer: Scorer | None = None,
    **overrides: Any,
) -> Selection:
    """Score every candidate direction and pick the best bypass that passes the filters.

    ``settings`` (default :class:`SweepSettings`), with any of its fields given as keywords (``overrides``,
    e.g. ``kl_threshold=0.2``) replacing its own. Layers in the last ``skip_last`` fraction are not scored at
    all unless ``score_skipped``. ``scorer`` reuses a :class:`Scorer` built on the same validation prompts (and
    the unedited model), so its base pass is not repeated; by default one is built here. ``prefer="induce"``
    picks the passing candidate that raises the score on harmless prompts the most (for inducing), not the best
    bypass.
    """
    s = replace(settings or SweepSettings(), **overrides)
    s.check()
    start = time.perf_counter()
    harmful_val, harmless_val = list(harmful_val), list(harmless_val)
    check_validation(acts, harmful_val, harmless_val)
    scorer = validation_scorer(lm, acts, harmful_val, harmless_val, s.batch_size, scorer)
    base_bypass, base_induce = scorer.base.refusal, scorer.base.harmless_refusal
    sets = {m.label: dirs.compute(acts, m.name, **m.kwargs) for m in s.methods}
    max_layer = int(lm.num_layers * (1.0 - s.skip_last))
    chosen_layers = list(range(lm.num_layers)) if s.layers is None else [lm.anatomy.check_layer(i) for i in s.layers]
    if not s.score_skipped:
        chosen_layers = [i for i in chosen_layers if i < max_layer]
    grid = [(label, layer, pos) for label in sets for layer in chosen_layers for pos in acts.positions]
    table = score_grid(lm, acts, sets, grid, scorer, progress)
    passed, limit = apply_filters(table, s, max_layer, base_bypass, base_induce)
    best = (lambda c: c.bypass) if s.prefer == "bypass" else (lambda c: -c.induce)
    chosen = min(passed, key=best) if passed else None
    settings_used = {
        "methods": [m.label for m in s.methods],
        "layers": chosen_layers,
        "positions": list(acts.positions),
        "skip_last": s.skip_last,
        "kl_threshold": s.kl_threshold,
        "min_induce": s.min_induce,
        "min_bypass_drop": s.min_bypass_drop,
        **({"prefer": s.prefer} if s.prefer != "bypass" else {}),
        "kl_limit_used": limit,
        "n_harmful_val": len(harmful_val),
        "n_harmless_val": len(harmless_val),
        # bypass and KL were scored with the direction projected out of the residual stream itself
        **({"ablation": "residual_stream"} if lm.anatomy.residual_only else {}),
    }
    return Selection(
        candidates=table,
        chosen=chosen,
        base_bypass=base_bypass,
        base_induce=base_induce,
        baseline_refuses=base_bypass > NO_REFUSAL_LOGODDS,
        note=sweep_note(chosen, s, limit, base_bypass),
        settings=settings_used,
        seconds=time.perf_counter() - start,
        direction_sets=sets,
    )


def score_grid(
    lm: LoadedModel,
    acts: Activations,
    sets: dict[str, DirectionSet],
    grid: Sequence[tuple[str, int, Position]],
    scorer: Scorer,
    progress: SweepProgress | None,
) -> list[CandidateScore]:
    """Every candidate's bypass and KL (its direction ablated everywhere) and induce (added at its layer)."""
    table: list[CandidateScore] = []
    for i, (label, layer, pos) in enumerate(grid):
        if progress:
            progress(i, len(grid), f"{label} layer {layer} pos {pos}")
        if float(sets[label].norms()[layer, acts.position_index(pos)]) < 1e-6:
            nan = float("nan")
            table.append(CandidateScore(layer, pos, label, nan, nan, nan, False, "zero-norm direction (equal means)"))
            continue
        direction = sets[label][layer, pos]
        with ablate(lm, direction):
            ablated = scorer.score()
        p = acts.position_index(pos)
        coeff = float((acts.harmful_mean[layer, p] - acts.harmless_mean[layer, p]).float() @ direction.vector)
        with add(lm, direction, coeff, layers=[layer]):
            induced = scorer.induce()
        table.append(CandidateScore(layer, pos, label, bypass=ablated.refusal, induce=induced, kl=ablated.kl))
    if progress:
        progress(len(grid), len(grid), "done")
    return table


def apply_filters(
    table: list[CandidateScore], s: SweepSettings, max_layer: int, base_bypass: float, base_induce: float
) -> tuple[list[CandidateScore], float]:
    """Mark each candidate passed or why not; the KL limit doubles (up to ``max_kl``) until one passes.
    Returns the passing candidates and the KL limit used."""
    limit = s.kl_threshold
    while True:
        for c in table:
            if c.reason.startswith("zero-norm"):
                continue
            reasons = []
            if c.layer >= max_layer:
                reasons.append(f"in the last {s.skip_last:.0%} of layers")
            if c.kl > limit:
                reasons.append(f"KL {c.kl:.3f} > {limit:g}")
            if c.induce - base_induce <= s.min_induce:
                reasons.append(
                    f"induce {c.induce:.2f} raises refusal by <= {s.min_induce:g} (unedited {base_induce:.2f})"
                )
            if base_bypass - c.bypass <= s.min_bypass_drop:
                reasons.append(
                    f"bypass {c.bypass:.2f} lowers refusal by <= {s.min_bypass_drop:g} (unedited {base_bypass:.2f})"
                )
            c.passed, c.reason = not reasons, "; ".join(reasons)
        passed = [c for c in table if c.passed]
        if passed or limit >= s.max_kl:
            return passed, limit
        limit = min(limit * 2, s.max_kl)


def sweep_note(chosen: CandidateScore | None, s: SweepSettings, limit: float, base_bypass: float) -> str:
    """One line: the winner and its scores, or why there is none."""
    if not base_bypass > NO_REFUSAL_LOGODDS:  # a NaN score does not refuse either
        return (
            f"the model does not refuse these harmful prompts at baseline (mean refusal log-odds "
            f"{base_bypass:.2f}); there is no refusal to remove"
        )
    if chosen is None:
        return (
            f"no candidate passed the filters (KL <= {limit:g}, refusal score lowered by > {s.min_bypass_drop:g} "
            f"and raised by > {s.min_induce:g}); loosen them (kl_threshold, min_bypass_drop, min_induce, skip_last)"
        )
    note = (
        f"chose {chosen.method} at layer {chosen.layer}, position {chosen.position}: refusal score "
        f"{base_bypass:.2f} -> {chosen.bypass:.2f}, KL {chosen.kl:.3f}"
    )
    if limit != s.kl_threshold:
        note += f" (no candidate had KL <= {s.kl_threshold:g}; the limit was relaxed to {limit:g})"
    return note
