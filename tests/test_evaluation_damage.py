"""Damage beyond the first token: KL along the base model's answers (teacher-forced) and perplexity."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_cli import invoke
from test_evaluation_verdicts import flat
from tiny import HARMFUL, HARMLESS, pretend_refusal, tiny_lm, tiny_model, tiny_tokenizer

from abliterate import ablate, capture, directions
from abliterate.evaluate.damage import answer_kl, answer_reference, bundled_texts, perplexity
from abliterate.measure.first_token import first_token_logprobs, kl_divergence


@pytest.fixture(scope="module")
def lm_r():
    lm = tiny_lm("llama")
    lm.model.generation_config.eos_token_id = None  # answers run the full k tokens
    return lm, directions.mean_diff(capture(lm, HARMFUL, HARMLESS))[1, -1]


def test_generate_ids_are_what_generate_decodes(lm_r):
    lm, _ = lm_r
    ids = lm.generate_ids(HARMLESS[:3], max_new_tokens=5, batch_size=2)
    assert [len(a) for a in ids] == [5, 5, 5]
    assert lm.tokenizer.batch_decode(ids, skip_special_tokens=True) == lm.generate(HARMLESS[:3], max_new_tokens=5)
    stop = tiny_lm("llama")
    stop.model.generation_config.eos_token_id = ids[0][0]  # the first answer's first token now ends it
    assert stop.generate_ids(HARMLESS[:1], max_new_tokens=5) == [ids[0][:1]]


def _teacher_forced(lm, prompt, answer):
    """Log-probs predicting each answer token, from one unpadded forward pass."""
    head = lm.tokenizer(lm.format([prompt])[0], add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = lm.model(torch.tensor([head + answer])).logits[0].float()
    return torch.log_softmax(logits[len(head) - 1 : len(head) - 1 + len(answer)], dim=-1)


def test_answer_kl_is_exact_with_a_full_vocabulary_and_a_lower_bound_otherwise(lm_r):
    lm, r = lm_r
    prompts = HARMLESS[:4]
    full = answer_reference(lm, prompts, k=4, batch_size=3, top=lm.model.config.vocab_size)
    small = answer_reference(lm, prompts, k=4, batch_size=3, top=8)
    assert [len(a) for a in full.answers] == [4] * 4 and full.answers == small.answers
    assert answer_kl(lm, prompts, full).abs().max() < 1e-5  # the unedited model against itself
    base_rows = [_teacher_forced(lm, p, a) for p, a in zip(prompts, full.answers, strict=True)]
    with ablate(lm, r):
        edited_rows = [_teacher_forced(lm, p, a) for p, a in zip(prompts, full.answers, strict=True)]
        got, bound = answer_kl(lm, prompts, full, batch_size=3), answer_kl(lm, prompts, small, batch_size=2)
    exact = torch.stack([kl_divergence(b, e).mean() for b, e in zip(base_rows, edited_rows, strict=True)])
    assert torch.allclose(got, exact, atol=1e-5) and got.min() > 1e-4
    assert (bound <= got + 1e-6).all() and bound.max() > 0


def test_first_answer_position_equals_the_first_token_kl(lm_r):
    lm, r = lm_r
    prompts = HARMLESS[:3]
    ref = answer_reference(lm, prompts, k=1, top=lm.model.config.vocab_size)
    base = first_token_logprobs(lm, prompts)
    with ablate(lm, r):
        assert torch.allclose(
            answer_kl(lm, prompts, ref), kl_divergence(base, first_token_logprobs(lm, prompts)), atol=1e-5
        )


def test_perplexity_matches_the_models_own_loss_and_sees_hooks(lm_r):
    lm, r = lm_r
    texts = bundled_texts()
    assert len(texts) >= 20 and all(len(t.split()) >= 40 for t in texts)
    nll, count = 0.0, 0
    for text in texts[:3]:
        ids = lm.tokenizer(text, return_tensors="pt")["input_ids"][:, :128]  # each text's first 128 tokens
        with torch.inference_mode():
            nll += float(lm.model(ids, labels=ids).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert perplexity(lm, texts[:3], batch_size=2) == pytest.approx(math.exp(nll / count), rel=1e-4)
    with ablate(lm, r):
        assert abs(perplexity(lm, texts[:3]) - math.exp(nll / count)) > 1e-3


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    for name, seed in (("base", 0), ("other", 1)):
        tiny_model("qwen2", seed).save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    return root / "base", root / "other"


def test_eval_reports_multi_token_kl_and_perplexity(two_models):
    base, other = two_models
    found = {}
    for k in ("1", "6"):
        res = invoke(
            "--json",
            "eval",
            str(other),
            "--base",
            str(base),
            "--n-test",
            "3",
            "--max-new-tokens",
            "2",
            "--kl-tokens",
            k,
        )
        assert res.exit_code == 0, res.output
        found[k] = json.loads(res.stdout)
    assert found["6"]["settings"]["kl_tokens"] == 6 and found["6"]["model"]["kl_tokens"] == 6
    assert found["1"]["model"]["kl_answer"] == pytest.approx(found["1"]["model"]["kl"], rel=1e-3)  # k=1: first token
    assert found["6"]["model"]["kl_answer"] != pytest.approx(found["1"]["model"]["kl_answer"], rel=1e-3)
    assert found["6"]["base"]["kl_answer"] == pytest.approx(0.0, abs=1e-5)
    assert found["6"]["base"]["perplexity"] != pytest.approx(found["6"]["model"]["perplexity"])
    res = invoke("eval", str(other), "--base", str(base), "--n-test", "2", "--max-new-tokens", "2", "--kl-tokens", "4")
    assert "KL vs base (first 4 answer tokens)" in flat(res.stdout) and "perplexity (harmless texts)" in flat(
        res.stdout
    )
    bad = invoke("eval", str(other), "--kl-tokens", "0")
    assert bad.exit_code == 2 and "--kl-tokens must be at least 1" in bad.output


def test_run_records_multi_token_kl_and_perplexity(two_models, tmp_path):
    base, _ = two_models
    args = [
        "run",
        str(base),
        "--out",
        str(tmp_path / "o"),
        "--n-train",
        "4",
        "--n-val",
        "8",
        "--n-test",
        "3",
        "--no-search",
    ]
    with pretend_refusal():
        res = invoke(*args, "--layer", "1", "--max-new-tokens", "2", "--kl-tokens", "5")
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    assert before["kl_tokens"] == after["kl_tokens"] == 5
    assert before["kl_answer"] == pytest.approx(0.0, abs=1e-5) and after["kl_answer"] > 0
    assert math.isfinite(before["perplexity"]) and after["perplexity"] != before["perplexity"]
    assert "KL vs base (first 5 answer tokens)" in flat(res.stdout)
    report = (tmp_path / "o" / "report.html").read_text()
    assert (
        "mean over the first 5 tokens of the base model's answers" in report
        and "perplexity on harmless texts" in report
    )
    bad = invoke(*args, "--kl-tokens", "0")
    assert bad.exit_code == 2 and "kl_tokens must be at least 1" in bad.output
