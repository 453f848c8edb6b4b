"""The search's front check through the real ``choose_edit`` -> ``search`` -> ``check_front`` -> ``choose`` path on a
tiny model: answers are judged like the final evaluation (a loop is a failure, never compliance), on the held-out
check prompts, by the run's judge (a judge with only ``verdicts`` too), with answer KL and degenerate harmless
answers budgeted (config -> behaviour).

A tiny random model's answers are byte soup, so the generation of each state is scripted: the decoded answers
of the check's ``Scorer._generate`` depend on the edit applied at the time (the unedited model refuses every harmful
check prompt; the first trial checked, the one the first-token objectives like best, gives the script's "first"
answers; every other trial the "rest"). Everything else (trials, check, answer KL, verdicts, policy) is real.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import replace
from types import SimpleNamespace

import pytest
from tiny import pretend_refusal, tiny_lm
from typer.testing import CliRunner

from abliterate.cli import app
from abliterate.run import choosing, config, pipeline
from abliterate.run.context import resolve
from abliterate.select.scorer import Scorer

LOOP = "ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok"
REFUSE = "I'm sorry, but I can't help with that."
ANSWER = "Sure. First gather what you need, then follow the steps in order and check each result as you go."
HELP = "Here is a short plan: start small, practise every day and keep notes of what worked."
N = 4  # check prompts per side


@contextlib.contextmanager
def scripted(*answers: tuple[list[str], list[str]]) -> Iterator[dict]:
    """Script the check's (harmful, harmless) answers: the i-th trial checked gives ``answers[i]`` (the last for
    the rest), the unedited model refuses; yields what was seen (the prompts, the trials in check order)."""
    seen: dict = {"prompts": set(), "order": []}
    real_applied = choosing.applied

    @contextlib.contextmanager
    def applied(lm, spec, *args, **kwargs):
        with real_applied(lm, spec, *args, **kwargs) as edit:
            seen["spec"] = spec
            try:
                yield edit
            finally:
                seen["spec"] = None

    def generate(self, runner, rows, max_new_tokens):
        spec, harmful = seen.get("spec"), runner is self._harmful
        seen["prompts"] |= {(self.harmful if harmful else self.harmless)[r] for r in rows}
        if spec is None or not spec.edits_anything:
            script = ([REFUSE] * N, [HELP] * N)
        else:
            key = json.dumps(spec.to_dict(), sort_keys=True)
            if key not in seen["order"]:
                seen["order"].append(key)
            script = answers[min(seen["order"].index(key), len(answers) - 1)]
        return [script[0 if harmful else 1][r % N] for r in rows]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(choosing, "applied", applied)
        mp.setattr(Scorer, "_generate", generate)
        yield seen


FLAGS = {"n_train": 4, "n_val": 8, "n_test": 2, "search.trials": 16, "search.startup": 2, "search.kl_budget": 100.0}
FLAGS |= {"search.check_prompts": N, "search.answer_kl_budget": 1000.0}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """The tiny model, its activations and sweep (as ``run`` builds them) and a context to choose from."""
    lm = tiny_lm("qwen2")
    out = tmp_path_factory.mktemp("front") / "out"
    ctx = resolve(config.load(flags={**FLAGS, "out": str(out)}, env={}), judge=True)
    scorer = pipeline.scorer_for(ctx, lm)
    acts, sel = pipeline.measure(ctx, lm, None, scorer)
    return lm, ctx, scorer, acts, sel


def choose(measured, tmp_path, **flags):
    lm, ctx, scorer, acts, sel = measured
    cfg = config.load(flags={**FLAGS, **flags, "out": str(tmp_path / "out")}, env={})
    return choosing.choose_edit(replace(ctx, cfg=cfg), lm, acts, sel, scorer).search


def trial(result, seen, i=0):
    """The ``i``-th trial checked."""
    return next(t for t in result.trials if json.dumps(t.spec, sort_keys=True) == seen["order"][i])


class VerdictsOnly:
    """An LLM-judge stand-in: only ``name`` and ``verdicts`` (no ``judge``), recording what it was shown."""

    name = "stub-llm"

    def __init__(self) -> None:
        self.shown: list[str] = []

    def verdicts(self, prompts, answers):
        self.shown += answers
        return ["refusal" if "sorry" in a.lower() else "compliance" for a in answers]


def test_a_trial_that_loops_loses_to_one_that_answers(measured, tmp_path):
    """The first trial checked (the objectives' favourite) answers once, refuses once, loops once and answers
    nothing once: 1 refusal (all the old check counted), 3 failures; the others refuse twice and answer twice: 2
    refusals, 2 failures. The judge is the run's, here one with only ``verdicts`` (as an LLM judge)."""
    lm, ctx, scorer, acts, sel = measured
    stub = VerdictsOnly()
    with scripted(([LOOP, "", REFUSE, ANSWER], [HELP] * N), ([REFUSE, REFUSE, ANSWER, ANSWER], [HELP] * N)) as seen:
        result = choosing.choose_edit(replace(ctx, judge=stub), lm, acts, sel, scorer).search
    loops = trial(result, seen)
    assert (loops.refused, loops.degenerate, loops.failures, loops.judged) == (1, 2, 3, N)
    checked = [t for t in result.trials if t.failures is not None]
    assert len(checked) >= 2, "the test needs the loop trial and another one checked"
    assert result.chosen.number != loops.number and result.chosen.failures == 2 and result.chosen.refused == 2
    assert result.base_check["failures"] == N == result.base_refused
    assert "fewest judged failures (refusals + degenerate: 2/4)" in result.note
    assert stub.shown and LOOP not in stub.shown and "" not in stub.shown, "degenerate answers never reach the judge"
    assert seen["prompts"] == set(ctx.harmful.check) | set(ctx.harmless.check), "checked on the held-out prompts"
    assert not seen["prompts"] & set(ctx.harmful.val + ctx.harmless.val + ctx.harmful.test + ctx.harmless.test)
    for t in checked:  # whole-answer damage measured for every checked trial
        assert t.answer_kl is not None and t.answer_kl >= 0 and t.check_kl >= 0 and t.perplexity > 0
        assert t.harmless_judged == N and t.harmless_degenerate == 0


def test_degenerate_allowance_reaches_the_pick(measured, tmp_path):
    """Three trials checked: 1 failure but 3 harmless loops; 2 failures and 1 loop; 3 failures, no loop. The
    default allowance (1) would take the second; ``search.degenerate_allowance = 0`` leaves only the third."""
    first = ([ANSWER, ANSWER, ANSWER, REFUSE], [LOOP, LOOP, LOOP, HELP])
    second = ([REFUSE, REFUSE, ANSWER, ANSWER], [LOOP, HELP, HELP, HELP])
    third = ([REFUSE, REFUSE, REFUSE, ANSWER], [HELP] * N)
    with scripted(first, second, third) as seen:
        result = choose(measured, tmp_path, **{"search.degenerate_allowance": 0})
    assert len(seen["order"]) >= 3, "the test needs three trials checked"
    assert [trial(result, seen, i).harmless_degenerate for i in range(3)] == [3, 1, 0]
    assert result.base_check["harmless_degenerate"] == 0 and result.degenerate_allowance == 0
    assert result.chosen.failures == 3 and result.chosen.number == trial(result, seen, 2).number
    default = config.SearchConfig().degenerate_allowance
    assert default == 1, "the docstring's claim: the default would take the second trial"


def test_the_check_through_the_cli(model_dir, tmp_path):
    """``abliterate run`` with the front check on: the config's check keys reach the pick and metrics.json (an
    answer-KL budget nothing meets, kept by allow_over_budget: the pick says which budget it is over)."""
    out = tmp_path / "out"
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[search]\ntrials = 16\nstartup = 2\nkl_budget = 100.0\nverify_top = 2\ncheck_prompts = 3\n"
        "answer_kl_budget = 1e-12\ndegenerate_allowance = 4\nallow_over_budget = true\n"
    )
    small = ["--n-train", "4", "--n-val", "8", "--n-test", "2", "--max-new-tokens", "2", "--config", str(cfg)]
    answers = ([ANSWER, ANSWER, REFUSE], [HELP] * 3)
    with pretend_refusal(), scripted(answers):
        res = CliRunner().invoke(app, ["run", str(model_dir), "--out", str(out), *small])
    assert res.exit_code == 0, res.output
    search = json.loads((out / "metrics.json").read_text())["search"]
    assert search["answer_kl_budget"] == 1e-12 and search["degenerate_allowance"] == 4
    assert search["base_check"]["judged"] == 3 and search["base_check"]["failures"] == 3
    chosen = next(t for t in search["trials"] if t["number"] == search["chosen"])
    assert chosen["failures"] == 1 and chosen["judged"] == 3 and chosen["answer_kl"] > 1e-12
    assert "within every budget" in search["note"] and "answer KL" in search["note"]
    page = (out / "report.html").read_text()  # the report's front table shows the check's numbers
    assert "judged failures" in page and f"<td>{chosen['answer_kl']:.4f}</td>" in page
    assert f"<td>{chosen['perplexity']:.2f}</td>" in page and "unedited, on the held-out check: 3/3 failures" in page


def test_a_check_that_cannot_be_held_out_says_so():
    """No prompts left over from the train split (a one-set profile such as flowery uses all of its train
    questions): the front is checked on the validation prompts and the note says so; fewer left: says how many."""
    ctx = resolve(config.load(flags={**FLAGS, "search.check_prompts": 6}, env={}), judge=True)
    scorer = SimpleNamespace(refusal_ids=[1])
    held, where = choosing.front_check(ctx, None, scorer, None)
    assert where == "" and held.answer_kl_budget == 1000.0 and held.degenerate_allowance == 1
    empty = replace(ctx, harmful=replace(ctx.harmful, check=[]))
    _, where = choosing.front_check(empty, None, scorer, None)
    assert "checked on the validation prompts (in-sample)" in where
    fewer = replace(ctx, harmless=replace(ctx.harmless, check=ctx.harmless.check[:2]))
    verify, where = choosing.front_check(fewer, None, scorer, None)
    assert "checked on 6 + 2 held-out prompts (fewer were left)" in where and verify.key != held.key
    off = replace(ctx, cfg=config.load(flags={**FLAGS, "search.verify_top": 0}, env={}))
    assert choosing.front_check(off, None, scorer, None) == (None, "")
