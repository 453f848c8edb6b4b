"""The search on its own: a synthetic objective (no model), so every property is exact and fast.

Determinism under a seed, the journal (resume, a real SIGKILL, a foreign journal), budgets, the warm start,
the Pareto front, the default policy, --trial, and "no trial lowers refusals"."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from abliterate.edit.spec import EditSpec
from abliterate.select.search import (
    SearchError,
    SearchSpace,
    TrialRecord,
    Verify,
    choose,
    full_params,
    pareto_front,
    search,
)

L = 12


def objective(spec: EditSpec) -> dict[str, float]:
    """Refusal falls with the total removal strength, KL rises with it, and faster away from layer 7."""
    strength = 0.0
    damage = 0.0
    for kernel in (spec.attn, spec.mlp):
        if kernel is None:
            continue
        w = kernel.weights(L)
        strength += sum(w)
        damage += sum(x * x * (1 + abs(i - 7) / 3) for i, x in enumerate(w))
    strength += 3 * spec.embedding
    damage += 2 * spec.embedding + (0.5 if spec.norm_preserving else 0.0)
    index = spec.direction_index if spec.direction_index is not None else 7.0
    refusal = 3.0 - strength / 4 + abs(index - 7) / 2
    return {"refusal": refusal, "kl": damage / 100, "refusal_rate": max(0.0, min(1.0, refusal / 6))}


BASE = {"refusal": 3.0, "kl": 0.0}


def params_of(result):
    return [(t.number, json.dumps(t.spec, sort_keys=True)) for t in result.trials]


def test_same_seed_same_trials_and_warm_start_first():
    warm = [full_params(SearchSpace(), L, 7, "mean_diff", -1)]
    a = search(objective, num_layers=L, trials=15, seed=3, warm_start=warm, base=BASE, kl_budget=10)
    b = search(objective, num_layers=L, trials=15, seed=3, warm_start=warm, base=BASE, kl_budget=10)
    assert params_of(a) == params_of(b) and len(a.trials) == 15
    first = a.trials[0].edit()
    assert first.direction_index == 7.0 and first.attn.weights(L) == [1.0] * L and first.embedding == 1.0
    assert first.mlp is not None and not first.norm_preserving
    c = search(objective, num_layers=L, trials=15, seed=4, warm_start=warm, base=BASE, kl_budget=10)
    assert params_of(c) != params_of(a)


def test_front_and_default_policy():
    res = search(objective, num_layers=L, trials=25, seed=0, base=BASE, kl_budget=0.5)
    front = [t for t in res.trials if t.number in res.front]
    assert front and all(t.on_front for t in front)
    for t in res.trials:  # nothing on the front is dominated
        for f in front:
            assert not (t.refusal <= f.refusal and t.kl <= f.kl and (t.refusal < f.refusal or t.kl < f.kl))
    inside = [t for t in front if t.kl <= 0.5]
    assert res.chosen.number == min(inside, key=lambda t: (t.refusal, t.kl)).number
    assert "lowest refusal score" in res.note
    data = res.to_dict()
    assert data["chosen"] == res.chosen.number and len(data["trials"]) == 25 and data["front"] == res.front


def rec(number, refusal, kl, refused=None, degenerate=0, **check):
    """A trial record; ``refused`` given: checked, with ``degenerate`` degenerate answers of 10."""
    if refused is not None:
        check |= {"judged": 10, "degenerate": degenerate, "failures": refused + degenerate}
    return TrialRecord(number, EditSpec().to_dict(), refusal, kl, refused=refused, **check)


def numbers(refused, degenerate=0, n=10, answer_kl=0.001, loops=0):
    """What a front check measures (abliterate.select.check.FrontCheck.measure), made up."""
    return {
        "refused": refused,
        "degenerate": degenerate,
        "failures": refused + degenerate,
        "judged": n,
        "harmless_degenerate": loops,
        "harmless_refused": 0,
        "harmless_judged": n,
        "check_kl": 0.01,
        "answer_kl": answer_kl,
        "perplexity": 12.0,
    }


def test_choose_prefers_judged_failures_then_lower_kl():
    records = [rec(0, -1.0, 0.02, refused=4), rec(1, -2.0, 0.04, refused=2), rec(2, -3.0, 0.09), rec(3, -1.5, 0.05)]
    pick, note = choose(records, base_refusal=1.0, kl_budget=0.05, base_check=numbers(8))
    assert pick.number == 1 and "fewest judged failures (refusals + degenerate: 2/10)" in note
    tie = [rec(0, -1.0, 0.02, refused=2), rec(1, -2.0, 0.04, refused=2)]
    assert choose(tie, 1.0, 0.05, base_check=numbers(8))[0].number == 0  # ties go to the lower KL
    pick, note = choose(records, base_refusal=1.0, kl_budget=0.01)
    assert pick.number == 0 and "no front trial that lowers refusals is within every budget" in note
    assert "first-token KL 0.020 > 0.01" in note
    assert choose(records, 1.0, 0.05, trial=2)[0].number == 2
    with pytest.raises(SearchError, match=r"trial 3 is not on the Pareto front; pick one of \[0, 1, 2\]"):
        choose(records, 1.0, 0.05, trial=3)
    with pytest.raises(SearchError, match="no trial lowers refusals"):
        choose([rec(0, 2.0, 0.01)], base_refusal=1.0, kl_budget=0.05)
    with pytest.raises(SearchError, match=r"3 judged failures \(refusals \+ degenerate\), unedited 3"):
        choose([rec(0, -2.0, 0.01, refused=3)], base_refusal=1.0, kl_budget=0.05, base_check=numbers(3))
    assert [r.number for r in pareto_front(records)] == [2, 1, 0]
    # inside the budget only a trial that does not refuse less when judged: the cheapest one that does is taken
    weak = [rec(0, -0.5, 0.01, refused=8), rec(1, -2.0, 0.2, refused=1), rec(2, -2.5, 0.4, refused=0)]
    pick, note = choose(weak, base_refusal=1.0, kl_budget=0.05, base_check=numbers(8))
    assert pick.number == 1 and "no front trial that lowers refusals is within every budget" in note


def test_verification_checks_the_front_once_and_is_kept_in_the_journal(tmp_path):
    calls = []

    def measure(spec):
        calls.append(spec)
        return numbers(0) if spec.edits_anything else numbers(7)

    journal = tmp_path / "j.log"
    kwargs = {"num_layers": L, "trials": 10, "journal": journal, "verify_top": 2, "base": BASE, "kl_budget": 1}
    res = search(objective, verify=Verify(measure, "k1"), **kwargs)
    assert res.base_refused == 7 and res.base_check == numbers(7) and len(calls) == 3  # unedited + 2 front trials
    judged = [t for t in res.trials if t.refused is not None]
    assert len(judged) == 2 and all(t.on_front for t in judged) and res.chosen in judged
    assert all(t.answer_kl == 0.001 and t.perplexity == 12.0 and t.harmless_judged == 10 for t in judged)
    saved = res.to_dict()
    assert saved["answer_kl_budget"] == 0.02 and saved["degenerate_allowance"] == 1
    assert {"answer_kl", "check_kl", "perplexity", "harmless_degenerate"} <= set(saved["trials"][0])
    calls.clear()
    again = search(objective, verify=Verify(measure, "k1"), resume=True, **kwargs)
    assert calls == [] and again.chosen.number == res.chosen.number and again.resumed == 10
    # numbers measured under another check (other prompts, judge or lengths) are measured again
    other = search(objective, verify=Verify(measure, "k2"), resume=True, **kwargs)
    assert len(calls) == 3 and other.chosen.number == res.chosen.number


def test_bad_budgets_and_journal_misuse(tmp_path):
    for kwargs, msg in [
        ({"trials": 0}, "--trials must be a positive integer, got 0"),
        ({"trials": -3}, "got -3"),
        ({"trials": None, "timeout": None}, "give the search a budget"),
        ({"trials": None, "timeout": float("nan")}, "--timeout must be a positive number"),
        ({"trials": 5, "timeout": -1}, "--timeout must be a positive number"),
        ({"trials": 5, "kl_budget": 0}, "--kl-budget must be a positive number"),
        ({"trials": 5, "space": SearchSpace(methods=("pca",))}, "search methods"),
    ]:
        with pytest.raises(SearchError, match=msg.replace("(", r"\(")):
            search(objective, num_layers=L, base=BASE, **kwargs)
    journal = tmp_path / "j.log"
    with pytest.raises(SearchError, match="--resume: no search journal"):
        search(objective, num_layers=L, trials=2, journal=journal, resume=True, base=BASE)
    search(objective, num_layers=L, trials=2, journal=journal, base=BASE, identity={"model": "a"}, kl_budget=9)
    with pytest.raises(SearchError, match="already exists"):
        search(objective, num_layers=L, trials=2, journal=journal, base=BASE, identity={"model": "a"})
    with pytest.raises(SearchError, match="its model is 'a', this run's is 'b'"):
        search(objective, num_layers=L, trials=3, journal=journal, resume=True, base=BASE, identity={"model": "b"})
    with pytest.raises(SearchError, match="its space is"):
        search(
            objective,
            num_layers=L,
            trials=3,
            journal=journal,
            resume=True,
            base=BASE,
            identity={"model": "a"},
            space=SearchSpace(max_k=3),
        )


def test_timeout_budget_stops_the_search():
    def slow(spec):
        time.sleep(0.05)
        return objective(spec)

    res = search(slow, num_layers=L, trials=None, timeout=0.5, base=BASE, kl_budget=9)
    assert 1 <= len(res.trials) < 40


def test_search_no_trial_lowers_refusals():
    with pytest.raises(SearchError, match="no trial lowers refusals"):
        search(lambda s: {"refusal": 5.0 + (s.embedding or 0), "kl": 0.01}, num_layers=L, trials=4, base=BASE)


CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_search import objective, L, BASE
    from abliterate.select.search import search
    def slow(spec):
        time.sleep(0.3)
        return objective(spec)
    search(slow, num_layers=L, trials=100, journal={journal!r}, resume={resume}, base=BASE, seed=1, kl_budget=9)
    """
)


def finished(journal: Path) -> int:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="abliterate", storage=JournalStorage(JournalFileBackend(str(journal))))
    return len(study.get_trials(states=(TrialState.COMPLETE,)))


def test_sigkill_loses_no_finished_trial_and_resume_completes(tmp_path):
    journal = tmp_path / "search.log"
    code = CHILD.format(tests=str(Path(__file__).parent), journal=str(journal), resume=False)
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": "0"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not journal.exists() or finished(journal) < 4):
            time.sleep(0.2)
        before = finished(journal)
        assert before >= 4
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    kept = finished(journal)
    assert kept >= before, "no finished trial is lost"
    res = search(objective, num_layers=L, trials=kept + 3, journal=journal, resume=True, base=BASE, seed=1, kl_budget=9)
    assert res.resumed == kept and len(res.trials) == kept + 3
    numbers = [t.number for t in res.trials]
    assert numbers == sorted(numbers) and math.isfinite(res.chosen.refusal)
