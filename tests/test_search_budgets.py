"""Honest budgets (issue 23, Required 7): --timeout bounds the front check too (a fake clock, so nothing is
timed), an edit the spec rejects is a failed trial and not an abort, config refuses ranges the edit refuses,
the library's defaults are the CLI's, and a pick over --kl-budget is refused unless --allow-over-budget.
The journal's identity (Required 6) is in test_search_identity.py."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from test_run_search import CHEAP, SMALL
from test_search import BASE, L, numbers, objective
from tiny import pretend_refusal
from typer.testing import CliRunner

from abliterate.cli import app
from abliterate.errors import AbliterateError
from abliterate.run import choosing
from abliterate.run.config import ConfigError, SearchConfig, load
from abliterate.select.search import SearchError, SearchSettings, SearchSpace, Verify, search
from abliterate.select.search_study import CHECK_SHARE, MAX_FAILED_IN_A_ROW


class FakeClock:
    """Seconds that pass only when a fake objective or check says so."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def timed(clock: FakeClock, trial_s: float, check_s: float, calls: list):
    def slow_objective(spec):
        clock.t += trial_s
        return objective(spec)

    def slow_measure(spec):
        calls.append((clock.t, spec))
        clock.t += check_s
        return numbers(0) if spec.edits_anything else numbers(8)

    return slow_objective, Verify(slow_measure, "timed")


def study_of(journal):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="abliterate", storage=JournalStorage(JournalFileBackend(str(journal))))


def test_timeout_bounds_the_trials_and_the_front_check_together():
    clock, calls = FakeClock(), []
    slow_objective, slow_verify = timed(clock, trial_s=5.0, check_s=10.0, calls=calls)
    res = search(
        slow_objective,
        num_layers=L,
        trials=None,
        timeout=100,
        verify=slow_verify,
        verify_top=6,
        base=BASE,
        kl_budget=10,
        clock=clock,
    )
    # trials stop at 75 s (the check's quarter is kept): 15 trials of 5 s; then the unedited model (75 -> 85) and
    # one front trial (85 -> 95) are judged; a third check (expected 10 s) would end past 100 s: not started
    assert (1 - CHECK_SHARE) * 100 == 75 and len(res.trials) == 15
    assert [t for t, _ in calls] == [1075.0, 1085.0] and not calls[0][1].edits_anything
    assert res.seconds == 95.0 <= 100
    judged = [t for t in res.trials if t.refused is not None]
    assert len(judged) == 1 and res.base_refused == 8
    assert "the front check stopped at the --timeout of 100 s with 1 trial(s) judged by generation" in res.note


def test_without_a_check_the_trials_take_the_whole_timeout_and_none_ends_past_it():
    clock, calls = FakeClock(), []
    slow_objective, slow_verify = timed(clock, trial_s=7.0, check_s=1.0, calls=calls)
    res = search(slow_objective, num_layers=L, trials=None, timeout=100, base=BASE, kl_budget=10, clock=clock)
    assert len(res.trials) == 14 and res.seconds == 98.0  # a 15th would end at 105 s
    assert "front check stopped" not in res.note
    # a check that fits is not cut: every one of verify_top front trials is judged and the note says nothing
    clock2, calls2 = FakeClock(), []
    slow_objective, slow_verify = timed(clock2, trial_s=1.0, check_s=1.0, calls=calls2)
    res = search(
        slow_objective,
        num_layers=L,
        trials=10,
        timeout=1000,
        verify=slow_verify,
        verify_top=2,
        base=BASE,
        kl_budget=10,
        clock=clock2,
    )
    assert len(calls2) == 3 and "front check stopped" not in res.note


def test_an_edit_the_spec_rejects_is_a_failed_trial_not_an_abort(tmp_path):
    journal = tmp_path / "j.log"
    # k up to 40 on a 12-layer model: EditSpec.validate rejects k > 13, so many sampled edits are invalid
    res = search(
        objective, num_layers=L, trials=12, journal=journal, base=BASE, kl_budget=10, space=SearchSpace(max_k=40)
    )
    assert len(res.trials) == 12 and all(t.edit().k <= L + 1 for t in res.trials)
    failed = study_of(journal).get_trials(states=(TrialState.FAIL,))
    assert failed and all("edit spec field 'k'" in t.user_attrs["error"] for t in failed)

    def picky(spec):  # an objective refusing some edits (AbliterateError) fails those trials only
        if spec.norm_preserving:
            raise AbliterateError("no norm-preserving edit here")
        return objective(spec)

    res = search(picky, num_layers=L, trials=8, base=BASE, kl_budget=10, seed=1)
    assert len(res.trials) == 8 and not any(t.edit().norm_preserving for t in res.trials)


def test_trials_failing_in_a_row_stop_the_search_with_the_reason():
    def refuses(spec):
        raise AbliterateError("this model cannot take weight edits")

    with pytest.raises(SearchError, match=rf"{MAX_FAILED_IN_A_ROW} search trials in a row failed .*weight edits"):
        search(refuses, num_layers=L, trials=3, base=BASE, kl_budget=10)
    with pytest.raises(SearchError, match="in a row failed .*scores not finite"):
        search(lambda s: {"refusal": float("nan"), "kl": 0.0}, num_layers=L, trials=3, base=BASE, kl_budget=10)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("peak_range", [0.2, 1.2], r"search.peak_range must be two numbers 0 <= low <= high <= 1 \(a fraction"),
        ("direction_range", [0.3, 1.1], r"search.direction_range must be two numbers 0 <= low <= high <= 1"),
        ("weight_range", [0.4, float("inf")], r"search.weight_range must be two numbers 0 <= low <= high \(finite"),
        ("peak_range", [0.6, 0.2], r"search.peak_range must be two numbers"),
    ],
)
def test_config_rejects_ranges_the_edit_rejects(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load(None, {f"search.{key}": value}, env={})
    with pytest.raises(SearchError, match=f"search {key} is"):
        SearchSpace(**{key: tuple(value)}).check()


def test_config_range_errors_through_the_cli_write_nothing(model_dir, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app, ["run", str(model_dir), "--out", str(out), *SMALL], env={"ABLITERATE_SEARCH_PEAK_RANGE": "0.2,1.2"}
    )
    assert res.exit_code == 2 and res.output.count("error:") == 1, res.output
    assert "search.peak_range" in res.output and "<= 1" in res.output
    assert not out.exists() and not choosing.journal_path(out).exists()


def test_one_source_of_defaults_for_the_library_and_the_cli():
    settings, space, config = SearchSettings(), SearchSpace(), SearchConfig()
    assert choosing.DEFAULT_TRIALS == settings.trials == 60
    assert (config.verify_top, config.kl_budget, config.startup, config.seed) == (
        settings.verify_top,
        settings.kl_budget,
        settings.startup,
        settings.seed,
    )
    assert settings.verify_top == 6 and config.allow_over_budget is settings.allow_over_budget is False
    assert config.methods == list(space.methods) and config.max_k == space.max_k
    for key in ("direction_range", "peak_range", "weight_range"):
        assert config.__getattribute__(key) == list(getattr(space, key))
    res = search(objective, num_layers=L, base=BASE, kl_budget=10)  # the library's default budget: 60 trials
    assert len(res.trials) == 60


def over_budget(spec):
    scores = objective(spec)
    return {**scores, "kl": scores["kl"] + 1.0}  # every trial's KL above 1


def test_a_pick_over_the_kl_budget_is_refused_unless_allowed_or_chosen():
    with pytest.raises(
        SearchError,
        match=r"no front trial that lowers refusals is within every budget "
        r"\(the closest: trial \d+, first-token KL [\d.]+ > 0.5\)",
    ):
        search(over_budget, num_layers=L, trials=8, base=BASE, kl_budget=0.5)
    allowed = search(over_budget, num_layers=L, trials=8, base=BASE, kl_budget=0.5, allow_over_budget=True)
    assert allowed.chosen.kl > 0.5 and "is within every budget" in allowed.note and "> 0.5" in allowed.note
    assert allowed.chosen.kl == min(t.kl for t in allowed.trials if t.number in allowed.front)
    by_hand = search(over_budget, num_layers=L, trials=8, base=BASE, kl_budget=0.5, trial=allowed.front[0])
    assert by_hand.chosen.number == allowed.front[0]
    picked = search(over_budget, num_layers=L, trials=8, base=BASE, kl_budget=0.5, pick=lambda f, d, n: f[0].number)
    assert picked.chosen.number == allowed.front[0]
    with pytest.raises(SearchError, match="--allow-over-budget"):  # Enter at the prompt keeps the policy's pick
        search(over_budget, num_layers=L, trials=8, base=BASE, kl_budget=0.5, pick=lambda f, d, n: None)


def test_over_budget_refuses_through_the_cli_and_allow_over_budget_writes_it(model_dir, tmp_path):
    out = tmp_path / "out"
    args = ["run", str(model_dir), "--out", str(out), "--trials", "6", "--kl-budget", "1e-12", *SMALL]
    with pretend_refusal():
        res = CliRunner().invoke(app, args, env=CHEAP)
        assert res.exit_code == 2 and res.output.count("error:") == 1, res.output
        assert "no front trial that lowers refusals is within every budget" in res.output and "> 1e-12" in res.output
        assert "--allow-over-budget" in res.output
        assert not out.exists() and choosing.journal_path(out).is_file(), "nothing written; the journal kept"
        again = CliRunner().invoke(app, ["--json", *args, "--resume", "--allow-over-budget"], env=CHEAP)
        assert again.exit_code == 0, again.output
        search_metrics = json.loads((out / "metrics.json").read_text())["search"]
        assert search_metrics["resumed"] == 6 and "is within every budget" in search_metrics["note"]
        chosen = next(t for t in search_metrics["trials"] if t["number"] == search_metrics["chosen"])
        assert chosen["kl"] > 1e-12
        # the config key (here from the environment) does the same
        out2 = tmp_path / "out2"
        env = {**CHEAP, "ABLITERATE_SEARCH_ALLOW_OVER_BUDGET": "true"}
        res = CliRunner().invoke(
            app, ["run", str(model_dir), "--out", str(out2), "--trials", "6", "--kl-budget", "1e-12", *SMALL], env=env
        )
    assert res.exit_code == 0, res.output
    config = json.loads((out2 / "abliterate_config.json").read_text())["config"]
    assert config["search"]["allow_over_budget"] is True
