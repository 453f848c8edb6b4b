"""``abliterate run`` with the search (the default), end to end through the CLI on a tiny model: artifacts,
the chosen edit written and re-applied, --no-search, an interrupted search resumed, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_search import finished
from tiny import HARMLESS, pretend_refusal, tiny_tokenizer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from abliterate.cli import app
from abliterate.edit.plan import Directions, applied
from abliterate.edit.spec import EditSpec
from abliterate.lm import from_pretrained_objects
from abliterate.measure.directions import DirectionSet
from abliterate.run import choosing

SMALL = ["--n-train", "4", "--n-val", "8", "--n-test", "2", "--max-new-tokens", "2"]
CHEAP = {"ABLITERATE_SEARCH_VERIFY_TOP": "0", "ABLITERATE_SEARCH_STARTUP": "2"}


def invoke(*args, env=None):
    return CliRunner().invoke(app, list(args), env={**CHEAP, **(env or {})})


@pytest.fixture(scope="module")
def searched(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    config = out.parent / "c.toml"
    config.write_text("[search]\ntrials = 5\nkl_budget = 100.0\nmax_k = 2\n")
    with pretend_refusal():
        res = invoke("run", str(model_dir), "--out", str(out), "--config", str(config), *SMALL)
    assert res.exit_code == 0, res.output
    return out


def logits(model, texts):
    tok = tiny_tokenizer()
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model(**batch).logits


def test_search_is_recorded_and_the_chosen_edit_is_what_was_written(searched, model_dir):
    metrics = json.loads((searched / "metrics.json").read_text())
    search = metrics["search"]
    assert len(search["trials"]) == 5 and search["front"] and search["chosen"] in search["front"]
    chosen = next(t for t in search["trials"] if t["number"] == search["chosen"])
    edit = json.loads((searched / "edit.json").read_text())
    assert edit["searched"] and edit["spec"] == chosen["spec"] == metrics["edit"]["spec"]
    assert (searched / "search_journal.log").is_file()
    assert not choosing.journal_path(searched).exists(), "the journal moved inside on success"
    page = (searched / "report.html").read_text()
    assert "<h2>Search</h2>" in page and 'alt="front"' in page and (searched / "front.png").is_file()
    # the written model is exactly the base model with the chosen edit applied (rebuilt from the saved files)
    lm = from_pretrained_objects(AutoModelForCausalLM.from_pretrained(model_dir), tiny_tokenizer())
    source = Directions.from_sets(DirectionSet.load(searched / "directions.safetensors"))
    written = AutoModelForCausalLM.from_pretrained(searched)
    with applied(lm, EditSpec.from_dict(edit["spec"]), source):
        assert (logits(lm.model, HARMLESS) - logits(written, HARMLESS)).abs().max() < 1e-4
    assert (logits(lm.model, HARMLESS) - logits(written, HARMLESS)).abs().max() > 1e-3, "the edit did something"


def test_apply_edit_writes_the_same_model_again(searched, model_dir, tmp_path):
    again = tmp_path / "again"
    res = invoke(
        "apply",
        str(model_dir),
        str(searched / "directions.safetensors"),
        "--edit",
        str(searched / "edit.json"),
        "--out",
        str(again),
    )
    assert res.exit_code == 0, res.output
    a, b = load_file(searched / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_search_is_the_sweeps_full_strength_edit(model_dir, tmp_path):
    out = tmp_path / "out"
    with pretend_refusal():
        res = invoke("--json", "run", str(model_dir), "--out", str(out), "--no-search", *SMALL)
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["search"] is None and not (out / "search_journal.log").exists()
    spec = EditSpec.from_dict(metrics["edit"]["spec"])
    assert spec.direction_index == metrics["chosen"]["layer"] and spec.embedding == 1.0 and spec.k == 1
    assert spec.attn.weights(3) == spec.mlp.weights(3) == [1.0, 1.0, 1.0]


def test_interrupted_search_keeps_its_journal_and_resumes(model_dir, tmp_path, monkeypatch):
    from abliterate.select import scorer

    out = tmp_path / "out"
    journal = choosing.journal_path(out)
    real, calls = scorer.Scorer.score, {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self)

    args = ["run", str(model_dir), "--out", str(out), "--trials", "6", "--kl-budget", "100", *SMALL]
    with pretend_refusal():
        monkeypatch.setattr(scorer.Scorer, "score", flaky)
        res = invoke(*args)
        assert res.exit_code == 130 and "nothing was written" in res.output
        assert not out.exists() and journal.is_file(), "Ctrl-C keeps the journal and writes nothing else"
        kept = finished(journal)
        assert kept >= 1
        again = invoke(*args)
        assert again.exit_code == 2 and "--resume" in again.output and not out.exists()
        resumed = invoke("--json", *args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    search = json.loads((out / "metrics.json").read_text())["search"]
    assert search["resumed"] == kept and len(search["trials"]) == 6 and not journal.exists()


def test_search_bad_input_writes_nothing(model_dir, tmp_path):
    out = tmp_path / "out"
    for flags, message in [
        (["--trials", "0"], "trials"),
        (["--trials", "-2"], "trials"),
        (["--timeout", "-5"], "timeout"),
        (["--kl-budget", "0"], "kl_budget"),
    ]:
        res = invoke("run", str(model_dir), "--out", str(out), *flags, *SMALL)
        assert res.exit_code == 2 and message in res.output and res.output.count("error:") == 1, res.output
    with pretend_refusal():
        res = invoke(
            "run", str(model_dir), "--out", str(out), "--trials", "3", "--trial", "999", "--kl-budget", "9", *SMALL
        )
    assert res.exit_code == 2 and "trial 999 is not on the Pareto front" in res.output
    assert not out.exists()


def test_demo_flags_reach_the_run(model_dir, tmp_path, monkeypatch):
    """`abliterate demo` with the demo model swapped for the tiny one: its evaluation and search flags take effect."""
    from abliterate.lm import demo

    monkeypatch.setattr(demo, "demo_model_path", lambda step=None: model_dir)
    out = tmp_path / "demo"
    with pretend_refusal():
        res = invoke(
            "demo",
            "--out",
            str(out),
            "--n-train",
            "4",
            "--n-test",
            "2",
            "--max-new-tokens",
            "2",
            "--trials",
            "5",
            env={"ABLITERATE_N_VAL": "8", "ABLITERATE_SEARCH_KL_BUDGET": "100"},
        )
    assert res.exit_code == 0, res.output
    assert "below the full contract" in res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["before"]["n_harmful"] == 2 and len(metrics["search"]["trials"]) == 5
    config = json.loads((out / "abliterate_config.json").read_text())["config"]
    assert config["max_new_tokens"] == 2 and config["n_test"] == 2 and config["search"]["trials"] == 5
