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

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from abliterate.edit.spec import EditSpec
from abliterate.select.search_space import SearchError, SearchSettings, SearchSpace, full_params, suggest

Objective = Callable[[EditSpec], Mapping[str, float]]
Verify = Callable[[EditSpec], tuple[int, int]]
SearchProgress = Callable[[str, int, int], None]
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
    ``verify(spec) -> (refused, n)`` judges generated answers for the ``verify_top`` most promising front trials.
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
        checked = _check_front(study, front, verify, s, base_refusal, progress)
        for r in records:
            if str(r.number) in checked:
                r.refused, r.judged = checked[str(r.number)]
        base_refused = checked["base"][0] if "base" in checked else None
        chosen, note = _pick(records, front, base_refusal, s, base_refused, pick)
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
        base_refused=base_refused,
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
