"""The final-evaluation contract: 64 held-out prompts per side, answers of up to 100 new tokens by default,
--min-new-tokens forcing longer answers, and min above max as one clear error."""

from __future__ import annotations

import json

import pytest
from test_cli import invoke
from test_evaluation_verdicts import scripted  # noqa: F401  (fixture)
from tiny import pretend_refusal, tiny_model, tiny_tokenizer

from abliterate.behaviours.prompts import SplitSizes, make_splits
from abliterate.evaluate import evaluation
from abliterate.run import config as config_mod

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def test_defaults_are_the_contract():
    cfg = config_mod.RunConfig()
    assert cfg.n_test == evaluation.N_TEST >= 64
    assert cfg.max_new_tokens == evaluation.MAX_NEW_TOKENS >= 100
    assert cfg.min_new_tokens == evaluation.MIN_NEW_TOKENS == 0
    for kind in ("harmful", "harmless"):
        splits = make_splits(kind, ["bundled"], SplitSizes(cfg.n_train, cfg.n_val, cfg.n_test))
        assert len(splits.test) == 64 and not set(splits.test) & set(splits.train + splits.val)


@pytest.fixture(scope="module")
def letters_dir(tmp_path_factory):
    """A tiny model for which every token but 25 lower-case letters ends the answer (its favourite, "w",
    too): without a minimum its greedy answers stop within a token or two."""
    path = tmp_path_factory.mktemp("letters") / "model"
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    keep = set(tok.convert_tokens_to_ids([c for c in LETTERS if c != "w"]))
    model.generation_config.eos_token_id = [i for i in range(model.config.vocab_size) if i not in keep]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _answers(model, out, *extra):
    args = ["run", str(model), "--out", str(out), "--n-train", "4", "--n-val", "8", "--n-test", "6", "--no-search"]
    with pretend_refusal():
        res = invoke(*args, "--layer", "1", "--max-new-tokens", "8", *extra)
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    return [s["response"] for side in ("harmful_samples", "harmless_samples") for s in metrics["before"][side]]


def test_min_new_tokens_forces_longer_answers(letters_dir, tmp_path):
    free = _answers(letters_dir, tmp_path / "free")
    forced = _answers(letters_dir, tmp_path / "forced", "--min-new-tokens", "6")
    assert sum(len(a) < 6 for a in free) >= len(free) // 2
    assert all(6 <= len(a) <= 8 and set(a[:6]) <= set(LETTERS) for a in forced), forced  # then any token ends it
    recorded = json.loads((tmp_path / "forced" / "abliterate_config.json").read_text())["config"]
    assert (recorded["min_new_tokens"], recorded["max_new_tokens"]) == (6, 8)


def test_eval_defaults_and_its_min_new_tokens(scripted, letters_dir, tmp_path):  # noqa: F811
    res = invoke("eval", str(letters_dir), "--out", str(tmp_path / "m.json"))
    assert res.exit_code == 0, res.output
    payload = json.loads((tmp_path / "m.json").read_text())
    assert payload["model"]["n_harmful"] == payload["model"]["n_harmless"] == 64
    assert (scripted[0]["max_new_tokens"], scripted[0]["min_new_tokens"]) == (100, 0)
    assert payload["settings"]["max_new_tokens"] == 100
    res = invoke("eval", str(letters_dir), "--n-test", "2", "--min-new-tokens", "7", "--max-new-tokens", "9")
    assert res.exit_code == 0, res.output
    assert (scripted[-1]["max_new_tokens"], scripted[-1]["min_new_tokens"]) == (9, 7)


def test_eval_answers_follow_min_new_tokens(letters_dir, tmp_path):
    res = invoke("--json", "eval", str(letters_dir), "--n-test", "3", "--max-new-tokens", "7", "--min-new-tokens", "5")
    assert res.exit_code == 0, res.output
    answers = [s["response"] for s in json.loads(res.stdout)["model"]["harmful_samples"]]
    assert all(5 <= len(a) <= 7 for a in answers), answers


def test_min_above_max_is_one_clear_line(letters_dir, tmp_path):
    run = invoke(
        "run", str(letters_dir), "--out", str(tmp_path / "o"), "--min-new-tokens", "50", "--max-new-tokens", "10"
    )
    assert run.exit_code == 2 and run.output.count("error:") == 1
    assert "min_new_tokens (50) is above max_new_tokens (10)" in run.output and not (tmp_path / "o").exists()
    toml = tmp_path / "c.toml"
    toml.write_text("min_new_tokens = 200\n")
    res = invoke("config", "show", "--config", str(toml))
    assert res.exit_code == 2 and "min_new_tokens (200) is above max_new_tokens (100)" in res.output
    ev = invoke(
        "eval", str(letters_dir), "--min-new-tokens", "5", "--max-new-tokens", "3", "--out", str(tmp_path / "m")
    )
    assert ev.exit_code == 2 and ev.output.count("error:") == 1 and "lower --min-new-tokens" in ev.output
    assert not (tmp_path / "m").exists()
    big = invoke("eval", str(letters_dir), "--n-test", "1000")
    assert big.exit_code == 2 and "lower --n-test" in big.output
