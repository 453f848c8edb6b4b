"""Search the edit space for the best refusal / damage trade-off: multi-objective Optuna (TPE), seeded.

Each trial samples an :class:`~abliterate.edit.spec.EditSpec` from the searched ranges (:class:`SearchSpace`),
applies it to the model in place, scores the model's current state with cheap first-token objectives
(refusal score on harmful validation prompts, KL on harmless ones: both minimized), and reverts it: a trial
never reloads the model. The study starts from the sweep's best candidates (enqueued) instead of dozens of
random trials. Every finished trial is appended to an Optuna journal on disk, so a search killed outright
resumes with no finished trial lost.

Then, multi-fidelity: the Pareto front's most promising trials are checked by generation on held-out prompts
(answers judged like the final evaluation's, degenerate ones counted as failures; answer KL and degenerate
harmless answers measured), and a documented policy picks one (:func:`abliterate.select.front.choose`): the fewest
judged failures (refusals + degenerate) among checked trials within the KL, answer-KL and degenerate budgets,
ties to lower KL. The front, the check and the policy live in :mod:`abliterate.select.front`.

This module knows nothing of models: the caller passes ``objective(spec) -> dict`` (with at least
``"refusal"`` and ``"kl"``) and optionally a :class:`~abliterate.select.front.Verify` (the check).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from abliterate.select.front import (
    Pick,
    SearchResult,
    TrialRecord,
    Verify,
    budgets_over,
    check_front,
    choose,
    fill_checked,
    pareto_front,
    pick_trial,
    result_budgets,
)
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

__all__ = [
    "Pick",
    "SearchError",
    "SearchResult",
    "SearchSettings",
    "SearchSpace",
    "TrialRecord",
    "Verify",
    "choose",
    "full_params",
    "pareto_front",
    "search",
    "suggest",
]


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
    (:func:`full_params`) tried first in a new study. ``verify`` (a :class:`Verify`) checks the unedited model and
    the ``verify_top`` most promising front trials. ``base``: the unedited model's scores.
    ``pick(front, default, note)``: asked for a trial number once the default policy has chosen (not when
    ``trial`` is given); None keeps the default, a number must be on the front. ``clock``: seconds, for the
    budget (tests pass a fake one). A sampled edit the spec rejects is a failed trial, not an error. With no
    front trial within every budget (first-token KL, and for a checked trial answer KL and degenerate harmless
    answers) the search refuses (:class:`SearchError`) unless ``allow_over_budget``, ``trial`` or ``pick`` chose it.
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
        bounded = None if verify is None else replace(verify, measure=budget.bounded(verify.measure))
        base_check, cut = _check_in_time(study, records, front, bounded, s, base_refusal, progress)
        asked: list[int | None] = []
        chosen, note = pick_trial(records, front, base_refusal, s, base_check, verify, _asking(pick, asked))
        by_hand = s.trial is not None or any(n is not None for n in asked)
        _refuse_over_budget(chosen, s, verify, base_check, chose_by_hand=by_hand)
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
        **result_budgets(verify, base_check),
    )


def _check_in_time(
    study: Any,
    records: Sequence[TrialRecord],
    front: Sequence[TrialRecord],
    verify: Verify | None,
    s: SearchSettings,
    base_refusal: float,
    progress: SearchProgress | None,
) -> tuple[dict[str, Any] | None, str]:
    """:func:`check_front` with ``verify`` bounded by the budget (:meth:`Budget.bounded`): the unedited model's
    numbers, and what a cut short check leaves out (empty when nothing was)."""
    try:
        return check_front(study, records, front, verify, s, base_refusal, progress), ""
    except OutOfTime:  # what was checked in time is in the study: check_front keeps each state's numbers as they come
        assert verify is not None
        base_check = fill_checked(study, records, verify.key)
    judged = sum(r.failures is not None for r in records)
    return base_check, (
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


def _refuse_over_budget(
    chosen: TrialRecord,
    s: SearchSettings,
    verify: Verify | None,
    base_check: Mapping[str, Any] | None,
    *,
    chose_by_hand: bool,
) -> None:
    """The policy's pick over a budget is refused unless ``allow_over_budget`` (or a trial chosen by hand)."""
    if s.allow_over_budget or chose_by_hand:
        return
    over = budgets_over(chosen, s.kl_budget, verify, base_check)
    if over:
        raise SearchError(
            f"no front trial that lowers refusals is within every budget (the closest: trial {chosen.number}, "
            f"{'; '.join(over)}); nothing was written — raise the budget (--kl-budget, search.answer_kl_budget, "
            "search.degenerate_allowance), or pass --allow-over-budget to keep it (add --resume to reuse the "
            "finished trials)"
        )
