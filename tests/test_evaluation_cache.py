"""The unedited model's evaluation kept across runs: reused for the same model and settings (no generation at
all), recomputed on any change of what the model produces, answers judged afresh, exact references; and the
evaluation's progress per generation batch."""

from __future__ import annotations

import pytest
import torch
from tiny import HARMFUL, HARMLESS, tiny_lm

from abliterate.edit.interventions import ablate
from abliterate.evaluate import base_cache
from abliterate.evaluate.evaluation import Evaluator
from abliterate.lm.model import LoadedModel

TEXTS = ["A short paragraph about bread and ovens.", "Rivers run to the sea over many years."]


@pytest.fixture
def calls(monkeypatch):
    """Count LoadedModel.generate calls (the real generation still runs)."""
    count = {"n": 0}
    real = LoadedModel.generate

    def generate(self, prompts, **kw):
        count["n"] += 1
        return real(self, prompts, **kw)

    monkeypatch.setattr(LoadedModel, "generate", generate)
    return count


def evaluator(lm, **kw):
    settings = {"max_new_tokens": 6, "kl_tokens": 3, "batch_size": 2, "perplexity_texts": TEXTS} | kw
    harmless = settings.pop("harmless", HARMLESS[:3])
    return Evaluator(lm, HARMFUL[:3], harmless, **settings)


def test_same_model_and_settings_reuse_without_generating(calls, tmp_path):
    lm = tiny_lm("qwen2")
    cold = evaluator(lm).measure_base("before", cache=tmp_path)
    assert not cold.from_cache and calls["n"] > 0 and len(list(tmp_path.glob("*.pt"))) == 1
    calls["n"] = 0
    warm_ev = evaluator(lm)
    warm = warm_ev.measure_base("before", cache=tmp_path)
    assert warm.from_cache and calls["n"] == 0  # no generation at all: answers, KL references, perplexity read back
    a, b = cold.to_dict(), warm.to_dict()
    assert a.pop("from_cache") is False and b.pop("from_cache") is True
    assert a == b
    assert warm.to_dict()["from_cache"] is True
    # the references read back are exact: the edited model's KL equals an evaluation that never used the cache
    r = torch.randn(lm.hidden_size)
    fresh = evaluator(lm)
    fresh.measure("before")
    after_fresh = fresh.measure("after", lambda: ablate(lm, r))
    after_warm = warm_ev.measure("after", lambda: ablate(lm, r))
    assert after_warm.kl == after_fresh.kl and after_warm.kl_answer == after_fresh.kl_answer
    assert after_warm.kl > 0 and not after_warm.from_cache


def test_no_cache_folder_measures_and_stores_nothing(calls, tmp_path):
    lm = tiny_lm("qwen2")
    m = evaluator(lm).measure_base("before")
    assert not m.from_cache and calls["n"] > 0 and not list(tmp_path.iterdir())


def _key(lm, **kw):
    return evaluator(lm, **kw).cache_key()


CHANGES = {
    "prompts": lambda lm: _key(lm, harmless=HARMLESS[1:4]),
    "system prompt": lambda lm: _key(lm, system="You are terse."),
    "max_new_tokens": lambda lm: _key(lm, max_new_tokens=7),
    "min_new_tokens": lambda lm: _key(lm, min_new_tokens=2),
    "batch_size": lambda lm: _key(lm, batch_size=3),
    "kl_tokens": lambda lm: _key(lm, kl_tokens=4),
    "perplexity texts": lambda lm: _key(lm, perplexity_texts=TEXTS[:1]),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_setting_is_in_the_key(change):
    lm = tiny_lm("qwen2")
    same = _key(lm)
    assert same is not None and _key(lm) == same  # deterministic
    assert CHANGES[change](lm) != same


def test_template_prefix_weights_dtype_generation_config_and_version_are_in_the_key(monkeypatch):
    lm = tiny_lm("qwen2")
    before = _key(lm)
    lm.template_kwargs["enable_thinking"] = False  # the template renders the same text here: a kwarg alone
    lm.response_prefix = "Answer:"
    assert _key(lm) != before
    lm.response_prefix, lm.template_kwargs = "", {}
    assert _key(lm) == before
    lm.tokenizer.chat_template = lm.tokenizer.chat_template.replace("<|im_start|>assistant", "<|im_start|>bot")
    assert _key(lm) != before
    lm = tiny_lm("qwen2")
    lm.model.generation_config.repetition_penalty = 1.3  # changes greedy answers: in the key
    assert _key(lm) != before
    lm = tiny_lm("qwen2")
    with torch.no_grad():
        lm.model.model.layers[1].self_attn.o_proj.weight[0, 0] += 1e-6  # one weight, a hair: another model
    assert _key(lm) != before
    assert _key(tiny_lm("qwen2")) == before
    assert _key(tiny_lm("qwen2", seed=1)) != before
    lm = tiny_lm("qwen2")
    lm.model.to(torch.bfloat16)
    assert _key(lm) != before
    monkeypatch.setattr(base_cache, "__version__", "0.0.0-other")
    assert _key(tiny_lm("qwen2")) != before


def test_a_changed_key_recomputes(calls, tmp_path):
    lm = tiny_lm("qwen2")
    evaluator(lm).measure_base("before", cache=tmp_path)
    calls["n"] = 0
    m = evaluator(lm, max_new_tokens=5).measure_base("before", cache=tmp_path)
    assert not m.from_cache and calls["n"] > 0 and len(list(tmp_path.glob("*.pt"))) == 2


def test_judge_and_detector_changes_rejudge_the_cached_answers(calls, tmp_path):
    """Verdicts are never cached: a new judge or degenerate detector judges the stored answers again."""

    class Unsure:
        name = "unsure"

        def verdicts(self, prompts, answers):
            return ["unparsed"] * len(answers)

    class Lenient:  # a degenerate-answer detector (evaluate.degenerate.Detector) that flags nothing
        def reasons(self, prompts, answers):
            return [""] * len(answers)

    class Strict:  # ... and one that flags everything
        def reasons(self, prompts, answers):
            return ["test: all degenerate"] * len(answers)

    lenient, strict = Lenient(), Strict()

    lm = tiny_lm("qwen2")
    marker = evaluator(lm, detector=lenient).measure_base("before", cache=tmp_path)
    assert {s.verdict for s in marker.harmful_samples} <= {"refusal", "compliance"}
    calls["n"] = 0
    unsure = evaluator(lm, judge=Unsure(), detector=lenient).measure_base("before", cache=tmp_path)
    flagged = evaluator(lm, detector=strict).measure_base("before", cache=tmp_path)
    assert unsure.from_cache and flagged.from_cache and calls["n"] == 0
    assert [s.response for s in unsure.harmful_samples] == [s.response for s in marker.harmful_samples]
    assert unsure.judge == "unsure" and {s.verdict for s in unsure.harmful_samples} == {"unparsed"}
    assert {s.verdict for s in flagged.harmful_samples + flagged.harmless_samples} == {"degenerate"}


def test_unreadable_entry_is_recomputed_and_replaced(calls, tmp_path):
    lm = tiny_lm("qwen2")
    evaluator(lm).measure_base("before", cache=tmp_path)
    (entry,) = tmp_path.glob("*.pt")
    entry.write_bytes(b"not a torch file")
    calls["n"] = 0
    m = evaluator(lm).measure_base("before", cache=tmp_path)
    assert not m.from_cache and calls["n"] > 0
    assert base_cache.load(tmp_path, entry.stem) is not None  # written again, whole
    assert not list(tmp_path.glob(".*.tmp"))


def test_unwritable_cache_is_a_note_not_a_failure(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ev = evaluator(tiny_lm("qwen2"))
    m = ev.measure_base("before", cache=blocker / "evaluations")
    assert not m.from_cache and "was not cached" in ev.cache_note


def test_progress_per_generation_batch():
    seen = []
    ev = evaluator(tiny_lm("qwen2"), batch_size=1)
    ev.measure("before", progress=lambda d, t: seen.append((d, t)))
    done = [d for d, _ in seen]
    total = seen[-1][1]
    # the base's reference answers (3), both sides' answers (3 + 3) one batch each, then the damage measures
    assert total == 3 + 3 + 3 + 1 and done == list(range(total + 1))
    assert {t for _, t in seen} == {total}
    seen.clear()
    ev.measure("again", progress=lambda d, t: seen.append((d, t)))  # references already made: not counted again
    assert [d for d, _ in seen] == list(range(8)) and seen[-1][1] == 7
