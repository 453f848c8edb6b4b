"""The Optuna study under :func:`abliterate.select.search.search`: its journal and the identity a resume must
match, the trial loop (a sampled edit the spec rejects is a failed trial, not an error) and the wall-clock
budget that bounds the trials and the front check together. Public Optuna API only; no model."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abliterate.edit.spec import EditSpec
from abliterate.errors import AbliterateError
from abliterate.select.search_space import SearchError, SearchSettings, SearchSpace, suggest

Objective = Callable[[EditSpec], Mapping[str, float]]
Check = Callable[[EditSpec], Any]  # a front check (search.Verify), whatever its verdict's form
SearchProgress = Callable[[str, int, int], None]
CHECK_SHARE = 0.25  # of a --timeout kept for the front check: the trials stop at the rest (the check may use more)
MAX_FAILED_IN_A_ROW = 10  # failed trials (invalid edits, non-finite scores) in a row that stop the search


def identity_of(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_study(journal: Path | None, identity: Mapping[str, Any], seed: int, resume: bool, startup: int) -> Any:
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
    names = [x.study_name for x in optuna.get_all_study_summaries(storage)]
    if "abliterate" in names:  # loading writes nothing: a resume refused below leaves the journal as it was
        study = optuna.load_study(study_name="abliterate", storage=storage, sampler=sampler)
    else:  # a new journal (or one killed before its study was written)
        study = optuna.create_study(
            study_name="abliterate", storage=storage, directions=["minimize", "minimize"], sampler=sampler
        )
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", dict(identity))
    else:
        keys = [*identity, *(k for k in stored if k not in identity)]  # the caller's order: most telling first
        diff = [k for k in keys if stored.get(k) != identity.get(k)]
        if diff:
            k = diff[0]
            raise SearchError(
                f"the journal at {journal} is from another search: its {k} is {stored.get(k)!r}, this run's is "
                f"{identity.get(k)!r}; resume with the settings it was written with, or remove it to start over"
            )
    return study


def fail_stale(study: Any) -> None:
    """Trials left RUNNING by a process killed mid-trial can never finish: mark them failed."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)


class OutOfTime(Exception):
    """The --timeout ran out before the next front check could end (raised through ``_check_front``)."""


@dataclass
class Budget:
    """The search's wall clock: when it started, when trials stop starting and when everything stops."""

    now: Callable[[], float]
    start: float
    end: float | None  # start + timeout
    trials_end: float | None

    @classmethod
    def of(cls, now: Callable[[], float], timeout: float | None, *, checking: bool) -> Budget:
        start = now()
        if timeout is None:
            return cls(now, start, None, None)
        return cls(now, start, start + timeout, start + timeout * ((1 - CHECK_SHARE) if checking else 1.0))

    def elapsed(self) -> float:
        return self.now() - self.start

    def allows(self, end: float | None, spent: Sequence[float]) -> bool:
        """Whether one more step (expected to take as long as the mean of ``spent``) ends by ``end``."""
        expected, now = (sum(spent) / len(spent) if spent else 0.0), self.now()
        return end is None or (now < end and now + expected <= end)

    def bounded(self, verify: Check | None) -> Check | None:
        """``verify`` that raises :class:`OutOfTime` instead of starting a check expected to end past the end."""
        if verify is None or self.end is None:
            return verify
        spent: list[float] = []

        def bounded_verify(spec: EditSpec) -> Any:
            if not self.allows(self.end, spent):
                raise OutOfTime
            t0 = self.now()
            out = verify(spec)
            spent.append(self.now() - t0)
            return out

        return bounded_verify


def finished(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def run_trials(
    study: Any,
    objective: Objective,
    space: SearchSpace,
    num_layers: int,
    s: SearchSettings,
    budget: Budget,
    done: int,
    progress: SearchProgress | None,
) -> None:
    """Ask, apply and score trials until ``s.trials`` are finished or the trials' share of the timeout is spent
    (a trial starts only when one of this call's mean length still ends in time). A trial whose edit the spec
    rejects, whose objective raises an :class:`AbliterateError` or whose scores are not finite fails (its
    ``error`` attribute says why) and the search goes on, unless ``MAX_FAILED_IN_A_ROW`` fail in a row; one
    interrupted is told failed before the error goes on."""
    from optuna.trial import TrialState

    total = s.trials if s.trials is not None else done + 10**9
    spent: list[float] = []
    failed = 0
    while done < total and budget.allows(budget.trials_end, spent):
        if progress:
            progress("search", done, total if s.trials is not None else done + 1)
        t = study.ask()
        t0 = budget.now()
        try:
            outcome = attempt(t, objective, space, num_layers, budget.now)
        except BaseException:
            study.tell(t, state=TrialState.FAIL)
            raise
        spent.append(budget.now() - t0)
        if isinstance(outcome, str):
            t.set_user_attr("error", outcome)
            study.tell(t, state=TrialState.FAIL)
            failed += 1
            if failed >= MAX_FAILED_IN_A_ROW:
                raise SearchError(
                    f"{failed} search trials in a row failed (the last: {outcome}); nothing was written — "
                    "narrow the [search] ranges to edits this model accepts"
                )
        else:
            study.tell(t, outcome)
            done, failed = done + 1, 0
    if progress:
        progress("search", done, done if s.trials is None else total)


def attempt(
    t: Any, objective: Objective, space: SearchSpace, num_layers: int, now: Callable[[], float]
) -> list[float] | str:
    """One trial's two objective values, or why it failed (an edit the spec rejects, non-finite scores)."""
    try:
        spec = suggest(t, space, num_layers)
        spec.validate(num_layers, space.positions)
    except AbliterateError as exc:
        return f"the sampled edit is invalid: {exc}"
    t.set_user_attr("spec", spec.to_dict())
    t0 = now()
    try:
        scores = dict(objective(spec))
    except AbliterateError as exc:
        return f"the objective refused the edit: {exc}"
    t.set_user_attr("scores", scores)
    t.set_user_attr("seconds", now() - t0)
    values = [float(scores["refusal"]), float(scores["kl"])]
    return values if all(math.isfinite(v) for v in values) else f"scores not finite: {values}"
