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

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from abliterate.edit.spec import EditSpec
from abliterate.select.front import (
    Pick,
    SearchProgress,
    SearchResult,
    TrialRecord,
    Verify,
    check_front,
    choose,
    pareto_front,
    pick_trial,
    result_budgets,
)
from abliterate.select.search_space import SearchError, SearchSettings, SearchSpace, full_params, suggest

Objective = Callable[[EditSpec], Mapping[str, float]]
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


def identity_of(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _record(t: Any) -> TrialRecord:
    return TrialRecord(
        number=t.number,
        spec=t.user_attrs["spec"],
        refusal=float(t.values[0]),
        kl=float(t.values[1]),
        scores=dict(t.user_attrs.get("scores", {})),
        seconds=float(t.user_attrs.get("seconds", 0.0)),
    )


def _open_study(journal: Path | None, identity: Mapping[str, Any], seed: int, resume: bool, startup: int) -> Any:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    with warnings.catch_warnings():  # multivariate/group TPE (conditional parameters) is "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, group=True)
    if journal is None:
        return optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    if journal.exists() and not resume:
        raise SearchError(
            f"a search journal already exists at {journal}; pass --resume to continue it, or remove it to start over"
        )
    if resume and not journal.exists():
        raise SearchError(f"--resume: no search journal at {journal}; run once without --resume to start one")
    storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.create_study(
        study_name="abliterate",
        storage=storage,
        directions=["minimize", "minimize"],
        sampler=sampler,
        load_if_exists=True,
    )
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", dict(identity))
    else:
        diff = [k for k in sorted(set(stored) | set(identity)) if stored.get(k) != identity.get(k)]
        if diff:
            k = diff[0]
            raise SearchError(
                f"the journal at {journal} is from another search: its {k} is {stored.get(k)!r}, this run's is "
                f"{identity.get(k)!r}; use the same model, prompts and search space, or another --out"
            )
    return study


def _fail_stale(study: Any) -> None:
    """Trials left RUNNING by a process killed mid-trial can never finish: mark them failed."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)


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
    **overrides: Any,
) -> SearchResult:
    """Run (or resume) the search and choose a trial; see the module docstring.

    ``settings`` (default :class:`SearchSettings`), with any of its fields given as keywords (``overrides``,
    e.g. ``trials=20, seed=3``) replacing its own. ``trials`` is the total number of finished trials wanted (a
    resumed journal counts its own), ``timeout`` a wall-clock limit in seconds for this call; at least one must
    be given. ``warm_start``: Optuna parameter dicts (:func:`full_params`) tried first in a new study.
    ``verify`` (a :class:`Verify`) checks the unedited model and the ``verify_top`` most promising front trials.
    ``base``: the unedited model's scores. ``pick(front, default, note)``: asked for a trial number once the
    default policy has chosen (not when ``trial`` is given); None keeps the default, a number must be on the
    front.
    """
    import optuna

    s = replace(settings or SearchSettings(), **overrides)
    s.check()
    space = s.space or SearchSpace()
    space.check()
    start = time.perf_counter()
    path = Path(s.journal) if s.journal is not None else None
    ident = {**dict(s.identity or {}), "space": identity_of(space.to_dict()), "num_layers": num_layers}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the library never prints
    try:
        study = _open_study(path, ident, s.seed, s.resume, s.startup)
        _fail_stale(study)
        resumed = len(_finished(study))
        if not study.trials:
            for params in warm_start:
                study.enqueue_trial(dict(params), skip_if_exists=True)
        _run_trials(study, objective, space, num_layers, s, start, resumed, progress)
        records = [_record(t) for t in _finished(study)]
        front = pareto_front(records)
        for r in front:
            r.on_front = True
        base_refusal = float((base or {}).get("refusal", math.inf))
        base_check = check_front(study, records, front, verify, s, base_refusal, progress)
        chosen, note = pick_trial(records, front, base_refusal, s, base_check, verify, pick)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return SearchResult(
        trials=records,
        front=[r.number for r in front],
        chosen=chosen,
        note=note,
        base=dict(base or {}),
        kl_budget=s.kl_budget,
        seconds=time.perf_counter() - start,
        journal=None if path is None else str(path),
        resumed=resumed,
        space=space.to_dict(),
        **result_budgets(verify, base_check),
    )


def _finished(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _run_trials(
    study: Any,
    objective: Objective,
    space: SearchSpace,
    num_layers: int,
    s: SearchSettings,
    start: float,
    done: int,
    progress: SearchProgress | None,
) -> None:
    """Ask, apply and score trials until ``s.trials`` are finished or ``s.timeout`` has passed since ``start``;
    a trial whose scores are not finite fails, one interrupted is told failed before the error goes on."""
    from optuna.trial import TrialState

    total = s.trials if s.trials is not None else done + 10**9
    while done < total and (s.timeout is None or time.perf_counter() - start < s.timeout):
        if progress:
            progress("search", done, total if s.trials is not None else done + 1)
        t = study.ask()
        try:
            spec = suggest(t, space, num_layers)
            t0 = time.perf_counter()
            scores = dict(objective(spec))
            seconds = time.perf_counter() - t0
            t.set_user_attr("spec", spec.to_dict())
            t.set_user_attr("scores", scores)
            t.set_user_attr("seconds", seconds)
        except BaseException:
            study.tell(t, state=TrialState.FAIL)
            raise
        values = [float(scores["refusal"]), float(scores["kl"])]
        if all(math.isfinite(v) for v in values):
            study.tell(t, values)
            done += 1
        else:
            study.tell(t, state=TrialState.FAIL)
    if progress:
        progress("search", done, done if s.trials is None else total)
