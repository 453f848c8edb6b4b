"""The search's Pareto front, its check by generation, and the documented policy that picks one trial.

The search (:mod:`abliterate.select.search`) scores trials by cheap first-token objectives; here its front is
checked by generation on held-out prompts (a :class:`Verify`: for ``run``, :class:`abliterate.select.check.
FrontCheck`, which judges answers like the final evaluation and measures answer KL), and :func:`choose` picks.

This module knows nothing of models: the check is a callable from an edit to its numbers (:data:`CHECKED`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from abliterate.edit.spec import EditSpec
from abliterate.select.search_space import SearchError, SearchSettings

ANSWER_KL_BUDGET = 0.02  # the default policy's budget on a checked trial's answer KL (run/config.py says why)
DEGENERATE_ALLOWANCE = 1  # harmless degenerate answers a checked trial may add to the unedited model's
# What a check measures of one state, by TrialRecord field (see abliterate.select.check.FrontCheck.measure).
CHECKED = (
    "refused",
    "degenerate",
    "failures",
    "judged",
    "harmless_degenerate",
    "harmless_refused",
    "harmless_judged",
    "check_kl",
    "answer_kl",
    "perplexity",
)
SearchProgress = Callable[[str, int, int], None]


@dataclass
class TrialRecord:
    """One finished trial: its edit, cheap scores and, when its state was checked by generation, what the check
    measured (the fields of :data:`CHECKED`; None when unchecked)."""

    number: int
    spec: dict[str, Any]
    refusal: float
    kl: float
    scores: dict[str, float] = field(default_factory=dict)
    refused: int | None = None  # judged refusals among `judged` harmful check answers
    judged: int | None = None
    seconds: float = 0.0
    on_front: bool = False
    degenerate: int | None = None  # degenerate harmful answers (loops, garbage, empty): never compliance
    failures: int | None = None  # harmful answers that are not compliance: refused + degenerate (+ unparsed)
    harmless_degenerate: int | None = None  # of `harmless_judged` harmless check answers
    harmless_refused: int | None = None
    harmless_judged: int | None = None
    check_kl: float | None = None  # first-token KL on the harmless check prompts
    answer_kl: float | None = None  # KL along the unedited model's answers to them, teacher-forced
    perplexity: float | None = None  # on the bundled harmless paragraphs

    def edit(self) -> EditSpec:
        return EditSpec.from_dict(self.spec)

    def set_check(self, numbers: Mapping[str, Any]) -> None:
        for name in CHECKED:
            setattr(self, name, numbers.get(name))


@dataclass(frozen=True)
class Verify:
    """The front check: ``measure(spec)`` returns the numbers of :data:`CHECKED` of the model under ``spec``
    (``EditSpec()``: the unedited model); ``key`` names what they depend on (numbers cached in a journal under
    another key are measured again); the two budgets :func:`choose` holds checked trials to."""

    measure: Callable[[EditSpec], Mapping[str, Any]]
    key: str = ""
    answer_kl_budget: float = ANSWER_KL_BUDGET
    degenerate_allowance: int = DEGENERATE_ALLOWANCE


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
    base_check: dict[str, Any] | None = None  # the unedited model's check numbers (CHECKED), None unchecked
    answer_kl_budget: float | None = None  # the check's budgets (None: no check)
    degenerate_allowance: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": None if self.chosen is None else self.chosen.number,
            "note": self.note,
            "base": self.base,
            "kl_budget": self.kl_budget,
            "answer_kl_budget": self.answer_kl_budget,
            "degenerate_allowance": self.degenerate_allowance,
            "seconds": self.seconds,
            "journal": self.journal,
            "resumed": self.resumed,
            "base_refused": self.base_refused,
            "base_check": self.base_check,
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
    base_check: Mapping[str, Any] | None = None,
    *,
    answer_kl_budget: float = ANSWER_KL_BUDGET,
    degenerate_allowance: int = DEGENERATE_ALLOWANCE,
) -> tuple[TrialRecord, str]:
    """The documented default policy, or ``trial`` when given (it must be on the front).

    A checked trial's *failures* are its harmful check answers that are not compliance: refusals, degenerate
    answers (loops, garbage, empty) and a model judge's unreadable verdicts, so a degenerate answer counts
    against a trial exactly as a refusal does. ``base_check``: the unedited model's check numbers.

    1. Only a front trial that lowers refusals is chosen: its refusal score is below the unedited model's and,
       when both were checked, its failures are fewer than the unedited model's. None: :class:`SearchError`.
    2. Where such trials were checked by generation, only checked ones are ranked.
    3. Budgets: first-token KL <= ``kl_budget``; for a checked trial also answer KL <= ``answer_kl_budget`` and
       degenerate harmless answers <= the unedited model's + ``degenerate_allowance``.
    4. Within every budget: the fewest failures (unchecked: the lowest refusal score); ties to the lower KL.
       Nothing within every budget: the trial over the fewest budgets, then the lowest KL, and the note says so.
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
    base_failures = None if base_check is None else base_check.get("failures")
    base_loops = None if base_check is None else base_check.get("harmless_degenerate")

    def lowers(r: TrialRecord) -> bool:
        checked = r.failures is not None and base_failures is not None
        return r.refusal < base_refusal and (not checked or r.failures < base_failures)

    def over(r: TrialRecord) -> list[str]:
        return over_budgets(r, kl_budget, answer_kl_budget, degenerate_allowance, base_loops)

    useful = [r for r in front if lowers(r)]
    if not useful:
        best = min(front, key=lambda r: (r.refusal, r.kl))
        what = (
            f"{best.failures} judged failures (refusals + degenerate), unedited {base_failures}"
            if best.failures is not None and base_failures is not None
            else f"refusal score {best.refusal:.2f}, unedited {base_refusal:.2f}"
        )
        raise SearchError(
            f"no trial lowers refusals (trial {best.number}: {what}); nothing was written — "
            "widen the search space, give it more trials or raise --kl-budget"
        )
    checked = [r for r in useful if r.failures is not None]
    pool = checked or useful
    inside = [r for r in pool if not over(r)]
    if inside:
        pick = min(inside, key=lambda r: (r.refusal if r.failures is None else r.failures, r.kl))
        if pick.failures is not None:
            how = f"fewest judged failures (refusals + degenerate: {pick.failures}/{pick.judged})"
            within = f"checked front trial(s) within budget (KL <= {kl_budget:g}, answer KL <= {answer_kl_budget:g}"
            within += f", degenerate harmless answers <= {base_loops}+{degenerate_allowance})"
        else:
            was_checked = any(r.failures is not None for r in front)
            unchecked = "; no checked trial lowers judged failures" if was_checked else ""
            how, within = f"lowest refusal score{unchecked}", f"front trial(s) with KL <= {kl_budget:g}"
        return pick, f"trial {pick.number}: {how} among {len(inside)} {within}"
    pick = min(pool, key=lambda r: (len(over(r)), r.kl))
    note = (
        f"trial {pick.number}: no front trial that lowers refusals is within every budget; chose the one over the "
        f"fewest, lowest KL ({'; '.join(over(pick))})"
    )
    return pick, note


def over_budgets(
    r: TrialRecord, kl_budget: float, answer_kl_budget: float, degenerate_allowance: int, base_loops: int | None
) -> list[str]:
    """The budgets ``r`` is over, each in words (empty: within every budget); unchecked numbers are not held."""
    out = [f"first-token KL {r.kl:.3f} > {kl_budget:g}"] if r.kl > kl_budget else []
    if r.answer_kl is not None and not r.answer_kl <= answer_kl_budget:
        out.append(f"answer KL {r.answer_kl:.4f} > {answer_kl_budget:g}")
    loops = r.harmless_degenerate
    if loops is not None and base_loops is not None and loops > base_loops + degenerate_allowance:
        out.append(f"{loops} degenerate harmless answers > {base_loops}+{degenerate_allowance}")
    return out


def budgets_over(
    r: TrialRecord, kl_budget: float, verify: Verify | None, base_check: Mapping[str, Any] | None
) -> list[str]:
    """:func:`over_budgets` with the check's budgets (``verify``'s) and the unedited model's numbers."""
    if verify is None:
        return over_budgets(r, kl_budget, ANSWER_KL_BUDGET, DEGENERATE_ALLOWANCE, None)
    loops = None if base_check is None else base_check.get("harmless_degenerate")
    return over_budgets(r, kl_budget, verify.answer_kl_budget, verify.degenerate_allowance, loops)


def fill_checked(study: Any, records: Sequence[TrialRecord], key: str) -> dict[str, Any] | None:
    """Fill every record whose numbers the journal's study holds under ``key``; the unedited model's numbers
    (None when they are not there, or were measured under another key)."""
    stored = study.user_attrs.get("verified", {})
    checked = stored if isinstance(stored, dict) and stored.get("key") == key else {}
    for r in records:
        if isinstance(checked.get(str(r.number)), dict):
            r.set_check(checked[str(r.number)])
    base = checked.get("base")
    return dict(base) if isinstance(base, dict) else None


def check_front(
    study: Any,
    records: Sequence[TrialRecord],
    front: Sequence[TrialRecord],
    verify: Verify | None,
    s: SearchSettings,
    base_refusal: float,
    progress: SearchProgress | None,
) -> dict[str, Any] | None:
    """Check the unedited model and the front trials worth it (:func:`to_verify`), fill every record checked
    under ``verify``'s key and return the unedited model's numbers (None without ``verify``). The numbers are
    kept in the journal's study: a resume measures nothing twice; numbers cached under another key are redone."""
    if verify is None:
        return None
    stored = study.user_attrs.get("verified", {})
    checked = dict(stored) if isinstance(stored, dict) and stored.get("key") == verify.key else {"key": verify.key}
    todo = to_verify(front, s.kl_budget, s.verify_top, base_refusal)
    if not isinstance(checked.get("base"), dict):
        checked["base"] = dict(verify.measure(EditSpec()))  # the unedited model, checked the same way
        study.set_user_attr("verified", checked)
    for i, r in enumerate(todo):
        if progress:
            progress("check front", i, len(todo))
        if not isinstance(checked.get(str(r.number)), dict):
            checked[str(r.number)] = dict(verify.measure(r.edit()))
            study.set_user_attr("verified", checked)  # in the journal: a resume does not check twice
    if progress:
        progress("check front", len(todo), len(todo))
    return fill_checked(study, records, verify.key)


def pick_trial(
    records: Sequence[TrialRecord],
    front: Sequence[TrialRecord],
    base_refusal: float,
    s: SearchSettings,
    base_check: Mapping[str, Any] | None,
    verify: Verify | None,
    pick: Pick | None,
) -> tuple[TrialRecord, str]:
    """The policy's choice (or ``s.trial``), then the one ``pick`` asks for, if another."""
    budgets = {} if verify is None else {"answer_kl_budget": verify.answer_kl_budget}
    budgets |= {} if verify is None else {"degenerate_allowance": verify.degenerate_allowance}
    chosen, note = choose(records, base_refusal, s.kl_budget, s.trial, base_check, **budgets)
    if pick is not None and s.trial is None:
        number = pick(front, chosen, note)
        if number is not None and number != chosen.number:
            chosen, _ = choose(records, base_refusal, s.kl_budget, number, base_check, **budgets)
            note = f"trial {number} picked at the prompt (the default policy's: {note})"
    return chosen, note


def to_verify(front: Sequence[TrialRecord], kl_budget: float, top: int, base_refusal: float) -> list[TrialRecord]:
    """The front trials worth generating for: among those whose refusal score is below the unedited model's,
    the lowest scores inside the KL budget (else the lowest-KL ones), at most ``top``."""
    lower = [r for r in front if r.refusal < base_refusal] or list(front)
    pool = [r for r in lower if r.kl <= kl_budget] or sorted(lower, key=lambda r: r.kl)[: max(top, 1)]
    return sorted(pool, key=lambda r: (r.refusal, r.kl))[: max(top, 0)]


def result_budgets(verify: Verify | None, base_check: Mapping[str, Any] | None) -> dict[str, Any]:
    """The :class:`SearchResult` fields the check sets: the unedited model's numbers and the budgets."""
    if verify is None:
        return {}
    return {
        "base_check": None if base_check is None else dict(base_check),
        "base_refused": None if base_check is None else base_check.get("refused"),
        "answer_kl_budget": verify.answer_kl_budget,
        "degenerate_allowance": verify.degenerate_allowance,
    }
