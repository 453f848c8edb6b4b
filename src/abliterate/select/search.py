"""Search the edit space for the best refusal / damage trade-off: multi-objective Optuna (TPE), seeded.

Each trial samples an :class:`~abliterate.edit.spec.EditSpec` from the searched ranges (:class:`SearchSpace`),
applies it to the model in place, scores the model's current state with cheap first-token objectives
(refusal score on harmful validation prompts, KL on harmless ones: both minimized), and reverts it: a trial
never reloads the model. The study starts from the sweep's best candidates (enqueued) instead of dozens of
random trials. Every finished trial is appended to an Optuna journal on disk, so a search killed outright
resumes with no finished trial lost.

Then, multi-fidelity: the Pareto front's most promising trials are checked by generation (greedy answers
to the harmful validation prompts, judged), and a documented policy picks one (:func:`choose`): the fewest
judged refusals among trials whose KL is within ``kl_budget``, ties to lower KL.

This module knows nothing of models: the caller passes ``objective(spec) -> dict`` (with at least
``"refusal"`` and ``"kl"``) and optionally ``verify(spec) -> (refused, n)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from abliterate.edit.spec import EditSpec
from abliterate.select.search_space import SearchError, SearchSettings, SearchSpace, full_params, suggest
from abliterate.select.search_study import (
    Budget,
    Objective,
    OutOfTime,
    SearchProgress,
    fail_stale,
    finished,
    identity_of,
    open_study,
    run_trials,
)

Verify = Callable[[EditSpec], tuple[int, int]]
__all__ = [
    "SearchError",
    "SearchResult",
    "SearchSettings",
    "SearchSpace",
    "TrialRecord",
    "choose",
    "full_params",
    "pareto_front",
    "search",
    "suggest",
]


@dataclass
class TrialRecord:
    """One finished trial: its edit, cheap scores and (when checked) judged refusals on generated answers."""

    number: int
    spec: dict[str, Any]
    refusal: float
    kl: float
    scores: dict[str, float] = field(default_factory=dict)
    refused: int | None = None  # judged refusals among `judged` generated answers (multi-fidelity check)
    judged: int | None = None
    seconds: float = 0.0
    on_front: bool = False

    def edit(self) -> EditSpec:
        return EditSpec.from_dict(self.spec)


@dataclass
class SearchResult:
    trials: list[TrialRecord]
    front: list[int]  # trial numbers on the Pareto front of (refusal, kl)
    chosen: TrialRecord | None
    note: str
    base: dict[str, float]
    kl_budget: float
    seconds: float
    journal: str | None
    resumed: int = 0  # finished trials found in the journal when the search started
    base_refused: int | None = None  # the unedited model's judged refusals (same prompts as the checks)
    space: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": None if self.chosen is None else self.chosen.number,
            "note": self.note,
            "base": self.base,
            "kl_budget": self.kl_budget,
            "seconds": self.seconds,
            "journal": self.journal,
            "resumed": self.resumed,
            "base_refused": self.base_refused,
            "front": self.front,
            "space": self.space,
            "trials": [asdict(t) for t in self.trials],
        }


Pick = Callable[[Sequence[TrialRecord], TrialRecord, str], "int | None"]  # (front, default pick, note) -> number


def pareto_front(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Trials no other trial beats on both refusal and KL (and strictly on one), by refusal."""
    front = [
        r
        for r in records
        if not any(o.refusal <= r.refusal and o.kl <= r.kl and (o.refusal < r.refusal or o.kl < r.kl) for o in records)
    ]
    return sorted(front, key=lambda r: (r.refusal, r.kl, r.number))


def choose(
    records: Sequence[TrialRecord],
    base_refusal: float,
    kl_budget: float,
    trial: int | None = None,
    base_refused: int | None = None,
) -> tuple[TrialRecord, str]:
    """The documented default policy, or ``trial`` when given (it must be on the front).

    Among front trials with KL <= ``kl_budget``: the fewest judged refusals where trials were checked by
    generation (unchecked trials are ranked after checked ones), else the lowest refusal score; ties go to
    the lower KL. With no front trial inside the budget, the lowest-KL front trial, and the note says so.
    A choice that does not lower refusals below the unedited model's (its refusal score, and its judged
    refusals ``base_refused`` where both were judged) is refused (:class:`SearchError`).
    """
    front = pareto_front(records)
    if not front:
        raise SearchError("the search finished no trial; give it more --trials or a longer --timeout")
    if trial is not None:
        pick = next((r for r in front if r.number == trial), None)
        if pick is None:
            raise SearchError(
                f"trial {trial} is not on the Pareto front; pick one of {sorted(r.number for r in front)}"
            )
        return pick, f"trial {trial} chosen by --trial"

    def lowers(r: TrialRecord) -> bool:
        judged = r.refused is not None and base_refused is not None
        return r.refusal < base_refusal and (not judged or r.refused < base_refused)

    useful = [r for r in front if lowers(r)]
    if not useful:
        best = min(front, key=lambda r: (r.refusal, r.kl))
        what = (
            f"{best.refused} judged refusals, unedited {base_refused}"
            if best.refused is not None and base_refused is not None
            else f"refusal score {best.refusal:.2f}, unedited {base_refusal:.2f}"
        )
        raise SearchError(
            f"no trial lowers refusals (trial {best.number}: {what}); nothing was written — "
            "widen the search space, give it more trials or raise --kl-budget"
        )
    inside = [r for r in useful if r.kl <= kl_budget]
    if inside:
        pick = min(inside, key=lambda r: (r.refused is None, r.refusal if r.refused is None else r.refused, r.kl))
        how = "fewest judged refusals" if pick.refused is not None else "lowest refusal score"
        note = f"trial {pick.number}: {how} among {len(inside)} front trial(s) with KL <= {kl_budget:g}"
    else:
        pick = min(useful, key=lambda r: r.kl)
        note = (
            f"trial {pick.number}: no front trial that lowers refusals has KL <= {kl_budget:g}; chose the lowest "
            f"KL ({pick.kl:.3f}) among those that do"
        )
    return pick, note


def _record(t: Any) -> TrialRecord:
    return TrialRecord(
        number=t.number,
        spec=t.user_attrs["spec"],
        refusal=float(t.values[0]),
        kl=float(t.values[1]),
        scores=dict(t.user_attrs.get("scores", {})),
        seconds=float(t.user_attrs.get("seconds", 0.0)),
    )


def search(
    objective: Objective,
    *,
    num_layers: int,
    settings: SearchSettings | None = None,
    warm_start: Sequence[Mapping[str, Any]] = (),
    verify: Verify | None = None,
    base: Mapping[str, float] | None = None,
    progress: SearchProgress | None = None,
    pick: Pick | None = None,
    clock: Callable[[], float] = time.perf_counter,
    **overrides: Any,
) -> SearchResult:
    """Run (or resume) the search and choose a trial; see the module docstring.

    ``settings`` (default :class:`SearchSettings`), with any of its fields given as keywords (``overrides``,
    e.g. ``trials=20, seed=3``) replacing its own. ``trials`` is the total number of finished trials wanted (a
    resumed journal counts its own), ``timeout`` a wall-clock limit in seconds for this call, front check
    included (with a check to come, the trials stop at ``1 - CHECK_SHARE`` of it; the check stops when it runs
    out, and the note says so); at least one must be given. ``warm_start``: Optuna parameter dicts
    (:func:`full_params`) tried first in a new study. ``verify(spec) -> (refused, n)`` judges generated answers
    for the ``verify_top`` most promising front trials. ``base``: the unedited model's scores.
    ``pick(front, default, note)``: asked for a trial number once the default policy has chosen (not when
    ``trial`` is given); None keeps the default, a number must be on the front. ``clock``: seconds, for the
    budget (tests pass a fake one). A sampled edit the spec rejects is a failed trial, not an error. With no
    front trial inside ``kl_budget`` the search refuses (:class:`SearchError`) unless ``allow_over_budget``,
    ``trial`` or ``pick`` chose it.
    """
    import optuna

    s = replace(settings or SearchSettings(), **overrides)
    s.check()
    space = s.space or SearchSpace()
    space.check()
    budget = Budget.of(clock, s.timeout, checking=verify is not None and s.verify_top > 0)
    path = Path(s.journal) if s.journal is not None else None
    ident = {**dict(s.identity or {}), "space": identity_of(space.to_dict()), "num_layers": num_layers}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the library never prints
    try:
        study = open_study(path, ident, s.seed, s.resume, s.startup)
        fail_stale(study)
        resumed = len(finished(study))
        if not study.trials:
            for params in warm_start:
                study.enqueue_trial(dict(params), skip_if_exists=True)
        run_trials(study, objective, space, num_layers, s, budget, resumed, progress)
        records = [_record(t) for t in finished(study)]
        front = pareto_front(records)
        for r in front:
            r.on_front = True
        base_refusal = float((base or {}).get("refusal", math.inf))
        checked, cut = _check_in_time(study, front, budget.bounded(verify), s, base_refusal, progress)
        for r in records:
            if str(r.number) in checked:
                r.refused, r.judged = checked[str(r.number)]
        base_refused = checked["base"][0] if "base" in checked else None
        asked: list[int | None] = []
        chosen, note = _pick(records, front, base_refusal, s, base_refused, _asking(pick, asked))
        _refuse_over_budget(chosen, s, chose_by_hand=s.trial is not None or any(n is not None for n in asked))
        if cut:
            note += f"; {cut}"
    finally:
        optuna.logging.set_verbosity(verbosity)
    return SearchResult(
        trials=records,
        front=[r.number for r in front],
        chosen=chosen,
        note=note,
        base=dict(base or {}),
        kl_budget=s.kl_budget,
        seconds=budget.elapsed(),
        journal=None if path is None else str(path),
        resumed=resumed,
        space=space.to_dict(),
        base_refused=base_refused,
    )


def _check_in_time(
    study: Any,
    front: Sequence[TrialRecord],
    verify: Verify | None,
    s: SearchSettings,
    base_refusal: float,
    progress: SearchProgress | None,
) -> tuple[dict[str, Any], str]:
    """:func:`_check_front` with ``verify`` bounded by the budget (:meth:`Budget.bounded`): its verdicts, and
    what a cut short check leaves out (empty when nothing was)."""
    try:
        return _check_front(study, front, verify, s, base_refusal, progress), ""
    except OutOfTime:  # what was judged in time is in the study: _check_front keeps each verdict as it comes
        checked = dict(study.user_attrs.get("verified", {}))
    judged = sum(1 for k in checked if k != "base")
    return checked, (
        f"the front check stopped at the --timeout of {s.timeout:g} s with {judged} trial(s) judged by generation "
        "(the others ranked by their scores): give a longer --timeout or fewer --trials"
    )


def _asking(pick: Pick | None, asked: list[int | None]) -> Pick | None:
    """``pick``, noting each answer in ``asked`` (a number there is a trial chosen by hand)."""
    if pick is None:
        return None

    def noted(front: Sequence[TrialRecord], default: TrialRecord, note: str) -> int | None:
        asked.append(pick(front, default, note))
        return asked[-1]

    return noted


def _refuse_over_budget(chosen: TrialRecord, s: SearchSettings, *, chose_by_hand: bool) -> None:
    """The policy's pick over the KL budget is refused unless ``allow_over_budget`` (or a trial chosen by hand)."""
    if chosen.kl > s.kl_budget and not (s.allow_over_budget or chose_by_hand):
        raise SearchError(
            f"no front trial that lowers refusals has KL <= {s.kl_budget:g} (the lowest: trial {chosen.number}, KL "
            f"{chosen.kl:.4g}); nothing was written — raise --kl-budget, or pass --allow-over-budget to keep it "
            "(add --resume to reuse the finished trials)"
        )


def _check_front(
    study: Any,
    front: Sequence[TrialRecord],
    verify: Verify | None,
    s: SearchSettings,
    base_refusal: float,
    progress: SearchProgress | None,
) -> dict[str, list[int]]:
    """Judged refusals by trial number (and ``"base"``: the unedited model), kept in the journal's study."""
    checked = dict(study.user_attrs.get("verified", {}))
    if verify is None:
        return checked
    todo = _to_verify(front, s.kl_budget, s.verify_top, base_refusal)
    if "base" not in checked:
        checked["base"] = list(verify(EditSpec()))  # the unedited model, judged the same way
    for i, r in enumerate(todo):
        if progress:
            progress("check front", i, len(todo))
        if str(r.number) not in checked:
            checked[str(r.number)] = list(verify(r.edit()))
            study.set_user_attr("verified", checked)  # in the journal: a resume does not judge twice
    if progress:
        progress("check front", len(todo), len(todo))
    return checked


def _pick(
    records: Sequence[TrialRecord],
    front: Sequence[TrialRecord],
    base_refusal: float,
    s: SearchSettings,
    base_refused: int | None,
    pick: Pick | None,
) -> tuple[TrialRecord, str]:
    """The policy's choice (or ``s.trial``), then the one ``pick`` asks for, if another."""
    chosen, note = choose(records, base_refusal, s.kl_budget, s.trial, base_refused)
    if pick is not None and s.trial is None:
        number = pick(front, chosen, note)
        if number is not None and number != chosen.number:
            chosen, _ = choose(records, base_refusal, s.kl_budget, number, base_refused)
            note = f"trial {number} picked at the prompt (the default policy's: {note})"
    return chosen, note


def _to_verify(front: Sequence[TrialRecord], kl_budget: float, top: int, base_refusal: float) -> list[TrialRecord]:
    """The front trials worth generating for: among those whose refusal score is below the unedited model's,
    the lowest scores inside the KL budget (else the lowest-KL ones), at most ``top``."""
    lower = [r for r in front if r.refusal < base_refusal] or list(front)
    pool = [r for r in lower if r.kl <= kl_budget] or sorted(lower, key=lambda r: r.kl)[: max(top, 1)]
    return sorted(pool, key=lambda r: (r.refusal, r.kl))[: max(top, 0)]
