"""template_kwargs (``enable_thinking``) and response_prefix reach every path that formats a prompt."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_cli import invoke
from tiny import HARMFUL, HARMLESS, pretend_refusal, tiny_model, tiny_tokenizer

from abliterate import capture
from abliterate.lm import from_pretrained_objects
from abliterate.measure.first_token import first_token_logprobs

# Like Qwen3's template: with enable_thinking=False the generation prompt carries an empty thinking block.
THINKING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
OFF = {"enable_thinking": False}
PREFIX = "Answer:"


def thinking_lm(**attrs):
    lm = from_pretrained_objects(tiny_model("qwen2"), tiny_tokenizer(THINKING), source="tiny-thinking")
    for key, value in attrs.items():
        setattr(lm, key, value)
    return lm


def test_format_passes_template_kwargs_and_appends_the_prefix():
    head = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert thinking_lm().format(["hi"], system="be brief") == [head]
    assert thinking_lm(template_kwargs=OFF).format(["hi"], system="be brief") == [head + "<think>\n\n</think>\n\n"]
    assert thinking_lm(response_prefix=PREFIX).format(["hi"], system="be brief") == [head + PREFIX]
    both = thinking_lm(template_kwargs=OFF, response_prefix=PREFIX).format(["hi"], system="be brief")
    assert both == [head + "<think>\n\n</think>\n\n" + PREFIX]
    assert thinking_lm(template_kwargs={"enable_thinking": True}).format(["hi"]) == thinking_lm().format(["hi"])


def _last_hidden_means(lm, texts):
    """The residual at each point, last token, averaged: computed by hand from the exact texts."""
    rows = []
    for text in texts:
        ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            hidden = lm.model(**ids, output_hidden_states=True).hidden_states
        rows.append(torch.stack([h[0, -1] for h in hidden]).double())
    return torch.stack(rows).mean(0)


@pytest.mark.parametrize("attrs", [{"template_kwargs": OFF}, {"response_prefix": PREFIX}])
def test_capture_sees_the_formatted_text(attrs):
    plain = capture(thinking_lm(), HARMFUL[:3], HARMLESS[:3], batch_size=2)
    lm = thinking_lm(**attrs)
    acts = capture(lm, HARMFUL[:3], HARMLESS[:3], batch_size=2)
    expected = [
        t + ("<think>\n\n</think>\n\n" if "template_kwargs" in attrs else PREFIX)
        for t in thinking_lm().format(HARMFUL[:3])
    ]
    by_hand = _last_hidden_means(lm, expected)
    # every layer's input (HF's last hidden state is after the final norm, capture's is before it)
    assert torch.allclose(acts.harmful_mean[:-1, -1].double(), by_hand[:-1], atol=1e-4)
    assert (acts.harmful_mean - plain.harmful_mean).abs().max() > 1e-2


def test_scores_and_generation_use_the_formatted_text():
    lm, plain = thinking_lm(template_kwargs=OFF, response_prefix=PREFIX), thinking_lm()
    diff = first_token_logprobs(lm, HARMLESS[:3]) - first_token_logprobs(plain, HARMLESS[:3])
    assert diff.abs().max() > 1e-2
    text = lm.format(HARMLESS[:1])[0]
    assert text.endswith("</think>\n\n" + PREFIX)
    ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        ref = lm.model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    expected = lm.tokenizer.decode(ref[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert lm.generate(HARMLESS[:1], max_new_tokens=6) == [expected]
    assert plain.generate(HARMLESS[:1], max_new_tokens=6) != [expected]


@pytest.fixture(scope="module")
def thinking_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("thinking") / "model"
    tiny_model("qwen2").save_pretrained(path)
    tiny_tokenizer(THINKING).save_pretrained(path)
    return path


def _run(model, out, *extra):
    args = ["run", str(model), "--out", str(out), "--n-train", "4", "--n-val", "8", "--n-test", "2", "--no-search"]
    args += ["--max-new-tokens", "3", "--layer", "1", *extra]
    with pretend_refusal():
        res = invoke(*args)
    assert res.exit_code == 0, res.output
    return load_file(out / "directions.safetensors"), json.loads((out / "abliterate_config.json").read_text())


def test_run_disable_thinking_and_response_prefix_change_the_run(thinking_dir, tmp_path):
    plain, _ = _run(thinking_dir, tmp_path / "plain")
    off, cfg = _run(thinking_dir, tmp_path / "off", "--disable-thinking")
    assert cfg["config"]["disable_thinking"] is True
    toml = tmp_path / "c.toml"
    toml.write_text('disable_thinking = true\nresponse_prefix = "Answer:"\n')
    shown = json.loads(invoke("config", "show", "--config", str(toml)).stdout)  # the keys the flags set
    assert (shown["disable_thinking"], shown["response_prefix"]) == (True, PREFIX)
    prefixed, cfg = _run(thinking_dir, tmp_path / "prefix", "--response-prefix", PREFIX)
    assert cfg["config"]["response_prefix"] == PREFIX
    assert plain.keys() == off.keys()
    for key in plain:
        assert (off[key] - plain[key]).abs().max() > 1e-3
        assert (prefixed[key] - plain[key]).abs().max() > 1e-3


def test_measure_takes_the_same_options(thinking_dir, tmp_path):
    found = {}
    for name, extra in {"plain": [], "off": ["--disable-thinking"], "prefix": ["--response-prefix", PREFIX]}.items():
        out = tmp_path / name
        res = invoke("measure", str(thinking_dir), "--out", str(out), "--n-train", "4", "--n-val", "8", *extra)
        assert res.exit_code == 0, res.output
        found[name] = load_file(out / "directions.safetensors")
    for key in found["plain"]:
        assert (found["off"][key] - found["plain"][key]).abs().max() > 1e-3
        assert (found["prefix"][key] - found["plain"][key]).abs().max() > 1e-3


def test_eval_takes_the_formatting_options(thinking_dir, monkeypatch):
    """eval's flags reach the text the model is given (scripted generation records it) and the KL pass."""
    from abliterate.evaluate import evaluation
    from abliterate.lm.model import LoadedModel

    texts, kl_texts = [], []
    real_logprobs = evaluation.first_token_logprobs

    def generate(self, prompts, **kw):
        texts.extend(self.format(prompts, system=kw["system"]))
        return ["Sure."] * len(prompts)

    def logprobs(lm, prompts, **kw):
        kl_texts.extend(lm.format(prompts, system=kw["system"]))
        return real_logprobs(lm, prompts, **kw)

    monkeypatch.setattr(LoadedModel, "generate", generate)
    monkeypatch.setattr(evaluation, "first_token_logprobs", logprobs)
    args = ["--json", "eval", str(thinking_dir), "--n-test", "2", "--batch-size", "3"]
    res = invoke(*args, "--disable-thinking", "--response-prefix", PREFIX, "--system", "Be terse.")
    assert res.exit_code == 0, res.output
    settings = json.loads(res.stdout)["settings"]
    assert settings["template_kwargs"] == OFF and settings["response_prefix"] == PREFIX
    assert settings["system"] == "Be terse."
    assert len(texts) == 4 and len(kl_texts) == 4
    for text in texts + kl_texts:
        assert text.startswith("<|im_start|>system\nBe terse.<|im_end|>")
        assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n" + PREFIX)
    texts.clear()
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert all(t.endswith("<|im_start|>assistant\n") and "system" not in t for t in texts)


def test_eval_batch_size_reaches_generation(thinking_dir, monkeypatch):
    from abliterate.lm.model import LoadedModel

    seen = []
    monkeypatch.setattr(
        LoadedModel, "generate", lambda self, prompts, **kw: seen.append(kw) or ["Sure."] * len(prompts)
    )
    res = invoke("eval", str(thinking_dir), "--n-test", "2", "--batch-size", "3")
    assert res.exit_code == 0, res.output
    assert {kw["batch_size"] for kw in seen} == {3}


def test_chat_takes_the_formatting_options(thinking_dir, tmp_path, monkeypatch):
    """chat's --system / --disable-thinking / --response-prefix reach the text each message is answered from."""
    from types import SimpleNamespace

    from test_cli import runner

    from abliterate.cli import app
    from abliterate.cli import chat as cli_chat
    from abliterate.lm.model import LoadedModel

    res = invoke("measure", str(thinking_dir), "--out", str(tmp_path / "m"), "--n-train", "4", "--n-val", "8")
    assert res.exit_code == 0, res.output
    texts: list[str] = []

    def generate(self, prompts, **kw):
        texts.extend(self.format(prompts, system=kw.get("system")))
        return ["Sure."] * len(prompts)

    monkeypatch.setattr(LoadedModel, "generate", generate)
    monkeypatch.setattr(cli_chat, "sys", SimpleNamespace(stdin=SimpleNamespace(isatty=lambda: True)))
    args = ["chat", str(thinking_dir), str(tmp_path / "m" / "directions.safetensors"), "--layer", "1"]
    head = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    for extra, expected in [
        ([], head),
        (["--disable-thinking"], head + "<think>\n\n</think>\n\n"),
        (["--response-prefix", PREFIX], head + PREFIX),
        (["--system", "Be terse."], "<|im_start|>system\nBe terse.<|im_end|>\n" + head),
    ]:
        texts.clear()
        res = runner.invoke(app, [*args, *extra], input="hello\n/quit\n")
        assert res.exit_code == 0, res.output
        assert texts == [expected] and "Sure." in res.stdout
