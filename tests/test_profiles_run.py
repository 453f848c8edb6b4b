"""Behaviour profiles end to end through the CLI on a tiny random model: refusal unchanged, flowery's prompts,
judge and scored tokens, the induce goal, eval, measure and the control-vector export of a profile's direction."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_cli import invoke
from tiny import pretend_refusal, tiny_tokenizer
from transformers import AutoModelForCausalLM

from abliterate.behaviours.profiles import load_profile, profile_splits
from abliterate.behaviours.prompts import SplitSizes, bundled
from abliterate.lm.model import LoadedModel
from abliterate.measure.directions import DirectionSet
from abliterate.measure.first_token import refusal_token_ids
from abliterate.run import pipeline

SMALL = ["--n-train", "4", "--n-val", "8", "--n-test", "3", "--no-search", "--max-new-tokens", "3"]
GUSH = "What a wonderful question! Oh, how delightful."
SORRY = "I'm sorry, but I cannot help with that."


@pytest.fixture
def canned(monkeypatch):
    """Answers that gush when the prompt asks for the flowery style and refuse otherwise: a judge's counts then
    say which markers it used (flowery's find the gushing ones, refusal's the refusing ones)."""

    def generate(self, prompts, **_):
        return [GUSH if "flowery" in p else SORRY for p in prompts]

    monkeypatch.setattr(LoadedModel, "generate", generate)


@pytest.fixture
def captured(monkeypatch):
    """The prompts each capture in the pipeline saw."""
    seen: list[tuple[list[str], list[str]]] = []
    real = pipeline.capture

    def capture(lm, harmful, harmless, **kw):
        seen.append((list(harmful), list(harmless)))
        return real(lm, harmful, harmless, **kw)

    monkeypatch.setattr(pipeline, "capture", capture)
    return seen


def run(model_dir, out, *extra):
    with pretend_refusal():
        res = invoke("run", str(model_dir), "--out", str(out), *extra)
    assert res.exit_code == 0, res.output
    return json.loads((out / "metrics.json").read_text()), res


def numbers(metrics: dict) -> dict:
    """Everything but wall times and whether the unedited model's evaluation came from the cache."""
    out = {k: v for k, v in metrics.items() if k != "timings_s"}
    out["selection"] = {k: v for k, v in metrics["selection"].items() if k != "seconds"}
    out["before"] = {k: v for k, v in metrics["before"].items() if k != "from_cache"}
    return out


def test_refusal_is_the_default_and_unchanged(model_dir, tmp_path):
    plain, _ = run(model_dir, tmp_path / "a", *SMALL)
    flagged, _ = run(model_dir, tmp_path / "b", *SMALL, "--behaviour", "refusal")
    assert numbers(plain) == numbers(flagged)
    assert not plain["before"]["from_cache"] and flagged["before"]["from_cache"], "the same unedited evaluation"
    a, b = load_file(tmp_path / "a" / "directions.safetensors"), load_file(tmp_path / "b" / "directions.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    assert (tmp_path / "a" / "edit.json").read_text() == (tmp_path / "b" / "edit.json").read_text()
    assert plain["behaviour"]["name"] == "refusal" and plain["before"]["behaviour"] == "refusal"
    assert plain["behaviour"]["score_token_ids"] == refusal_token_ids(tiny_tokenizer())
    assert plain["before"]["judge"] == "marker" and plain["induction"] is None
    harmful = {s["prompt"] for s in plain["before"]["harmful_samples"]}
    assert harmful <= set(bundled("harmful", "test"))
    config = json.loads((tmp_path / "a" / "abliterate_config.json").read_text())["config"]
    assert config["behaviour"] == "refusal" and config["n_test"] == 3


def test_flowery_templates_its_prompts_and_judges_with_its_markers(model_dir, tmp_path, canned, captured):
    profile = load_profile("flowery")
    metrics, res = run(model_dir, tmp_path / "f", *SMALL, "--behaviour", "flowery")
    (flowery, plain), questions = captured[0], set(bundled("questions", "train"))
    assert len(flowery) == len(plain) == 4
    for f, p in zip(flowery, plain, strict=True):  # the same question through the two persona templates
        head, tail = profile.behaviour_template.split("{prompt}")
        assert f.startswith(head) and f.endswith(tail) and f[len(head) : len(f) - len(tail)] in questions
        assert p == profile.plain_template.replace("{prompt}", f[len(head) : len(f) - len(tail)])
    before = metrics["before"]
    assert before["behaviour"] == "flowery" and before["judge"] == "marker"
    # the gushing answers (to the flowery prompts) are "shown"; the refusing ones are not: the profile's markers
    assert before["counts"]["harmful"]["refusal"] == 3 and before["counts"]["harmful"]["compliance"] == 0
    assert before["counts"]["harmless"]["refusal"] == 0 and before["counts"]["harmless"]["compliance"] == 3
    assert all(s["response"] == GUSH for s in before["harmful_samples"]) and before["agreement"] == {}
    assert all(s["prompt"].startswith(profile.behaviour_template[:20]) for s in before["harmful_samples"])
    assert {s["prompt"] for s in before["harmless_samples"]} <= {
        profile.plain_template.replace("{prompt}", q) for q in bundled("questions", "test")
    }
    assert metrics["behaviour"]["score_token_ids"] == refusal_token_ids(tiny_tokenizer(), profile.openers)
    assert metrics["behaviour"]["score_token_ids"] != refusal_token_ids(tiny_tokenizer())
    assert "flowery shown (behaviour prompts)" in res.stdout and "100% (44-100)" in res.stdout
    report = (tmp_path / "f" / "report.html").read_text()
    assert "flowery shown (behaviour prompts), held-out" in report and "flowery before / after" in report
    assert DirectionSet.load(tmp_path / "f" / "directions.safetensors").meta["behaviour"] == "flowery"
    card = (tmp_path / "f" / "README.md").read_text()
    assert "behaviour profile `flowery`" in card and "flowery shown (behaviour prompts), held-out" in card
    assert "refusal rate on held-out" not in card
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert [(p["kind"], p["spec"], p["bundled"]) for p in manifest["inputs"]["prompts"]] == [
        ("prompts", "bundled:questions", "data/questions.jsonl")
    ]
    assert manifest["inputs"]["files"]["profile"]["path"] == profile.path
    # the refusal profile judges the same refusing answer (to its harmful prompts) as shown: its own markers
    refusal, _ = run(model_dir, tmp_path / "r", *SMALL)
    assert refusal["before"]["counts"]["harmful"]["refusal"] == 3
    assert all(s["response"] == SORRY for s in refusal["before"]["harmful_samples"])


def test_flowery_defaults_apply_below_flags(model_dir, tmp_path, canned):
    metrics, _ = run(model_dir, tmp_path / "d", "--behaviour", "flowery", "--no-search", "--max-new-tokens", "2")
    assert metrics["before"]["n_harmful"] == metrics["before"]["n_harmless"] == 36  # the profile's n_test
    config = json.loads((tmp_path / "d" / "abliterate_config.json").read_text())["config"]
    assert (config["n_train"], config["n_val"], config["search"]["trials"]) == (48, 12, 40)


def test_induce_goal_bakes_the_direction_and_exports_a_control_vector(model_dir, tmp_path, canned, captured):
    sets = tmp_path / "sets"
    sets.mkdir()
    (sets / "gush.txt").write_text("\n".join(f"Please be flowery about topic {i}." for i in range(16)))
    (sets / "plain.txt").write_text("\n".join(f"State one fact about topic {i}." for i in range(16)))
    profile = sets / "gush.toml"
    profile.write_text(
        'name = "gush"\ngoal = "induce"\nbehaviour = ["gush.txt"]\nplain = ["plain.txt"]\n'
        'markers = ["wonderful"]\nopeners = ["What a"]\n[defaults]\nn_train = 4\nn_val = 8\nn_test = 3\n'
    )
    out = tmp_path / "i"
    metrics, res = run(model_dir, out, "--behaviour", str(profile), "--max-new-tokens", "2")
    assert all(p.startswith("Please be flowery") for p in captured[0][0]) and all(
        p.startswith("State one fact") for p in captured[0][1]
    )
    induction = json.loads((out / "edit.json").read_text())
    assert induction == metrics["induction"] and induction["goal"] == "induce" and metrics["edit"] is None
    assert metrics["search"] is None and "(induced)" in res.stdout and "induced gush" in metrics["note"]
    assert "and induced (baked into the weights" in (out / "README.md").read_text()
    assert metrics["before"]["counts"]["harmful"]["refusal"] == 3  # "wonderful" in the answers to gush prompts
    # the saved model carries the induction: the residual's component along the direction is pinned
    edited = AutoModelForCausalLM.from_pretrained(out)
    ds = DirectionSet.load(out / "directions.safetensors")
    assert ds.meta["behaviour"] == "gush" and ds.meta["chosen"]["layer"] == induction["layer"]
    r = ds.vectors[induction["layer"], ds.positions.index(induction["position"])].float()
    r = r / r.norm()
    ids = tiny_tokenizer()("hello there", return_tensors="pt")
    with torch.inference_mode():
        hidden = edited(**ids, output_hidden_states=True).hidden_states[induction["through_layer"]][0]
    assert torch.allclose(hidden @ r, torch.full((hidden.shape[0],), induction["coefficient"]), atol=1e-3)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(base.model.embed_tokens.weight, edited.model.embed_tokens.weight)
    # the profile's direction as a llama.cpp control vector
    gguf_path = tmp_path / "gush.gguf"
    res = invoke("export", str(out / "directions.safetensors"), "--model", str(model_dir), "--out", str(gguf_path))
    assert res.exit_code == 0, res.output
    reader = gguf.GGUFReader(str(gguf_path))
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    point = induction["layer"]
    if point >= 2:
        np.testing.assert_allclose(tensors[f"direction.{point - 1}"], r.numpy(), rtol=1e-5, atol=1e-6)
    last = ds.vectors.shape[0] - 1
    u = ds.vectors[last, 0].float()
    np.testing.assert_allclose(tensors[f"direction.{last - 1}"], (u / u.norm()).numpy(), rtol=1e-5, atol=1e-6)
    # an induction is no LoRA adapter: refused before the long part, nothing written
    res = invoke("run", str(model_dir), "--out", str(tmp_path / "x"), "--behaviour", str(profile), "--as-adapter")
    assert res.exit_code == 2 and "no LoRA adapter holds" in res.output and not (tmp_path / "x").exists()


def test_flowery_control_vector_export(model_dir, tmp_path, canned):
    run(model_dir, tmp_path / "f", *SMALL, "--behaviour", "flowery")
    ds = DirectionSet.load(tmp_path / "f" / "directions.safetensors")
    res = invoke("export", str(tmp_path / "f" / "directions.safetensors"), "--model-hint", "qwen2", "--out",
                 str(tmp_path / "flowery.gguf"), "--scale", "2")  # fmt: skip
    assert res.exit_code == 0, res.output
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / "flowery.gguf")).tensors}
    u = ds.vectors[3, 0].float()
    np.testing.assert_allclose(tensors["direction.2"], 2 * (u / u.norm()).numpy(), rtol=1e-5, atol=1e-6)


def test_eval_and_measure_take_the_behaviour(model_dir, tmp_path, canned, captured):
    res = invoke("eval", str(model_dir), "--behaviour", "flowery", "--n-test", "4", "--out", str(tmp_path / "e.json"))
    assert res.exit_code == 0, res.output
    assert "flowery shown (behaviour prompts)" in res.stdout
    payload = json.loads((tmp_path / "e.json").read_text())
    model = payload["model"]
    assert payload["settings"]["behaviour"] == "flowery" and model["behaviour"] == "flowery"
    assert model["counts"]["harmful"]["refusal"] == 4 and model["counts"]["harmless"]["refusal"] == 0
    flowery = load_profile("flowery")
    same_as_run = profile_splits(flowery, SplitSizes(48, 12, 4))[0].test  # run --n-test 4 holds these out
    assert [s["prompt"] for s in model["harmful_samples"]] == same_as_run
    assert invoke("eval", str(model_dir), "--n-test", "4", "--out", str(tmp_path / "r.json")).exit_code == 0
    refusal = json.loads((tmp_path / "r.json").read_text())["model"]
    assert refusal["counts"]["harmful"]["refusal"] == 4 and refusal["behaviour"] == "refusal"  # SORRY, all
    with pretend_refusal():
        res = invoke("measure", str(model_dir), "--out", str(tmp_path / "m"), "--behaviour", "flowery",
                     "--n-train", "4", "--n-val", "8")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert captured[-1][0][0].startswith(flowery.behaviour_template[:30])
    assert DirectionSet.load(tmp_path / "m" / "directions.safetensors").meta["behaviour"] == "flowery"
