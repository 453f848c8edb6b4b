"""Forward capabilities (KV cache under either name, position_ids, logits_to_keep) are decided once per model,
never lost silently on a supported family, and reported when a model lacks one."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny import FAMILIES, HARMFUL, HARMLESS, tiny_lm, tiny_model, tiny_tokenizer

from abliterate import capture
from abliterate.errors import PromptError
from abliterate.lm import from_pretrained_objects
from abliterate.lm.model import CapabilityWarning, ForwardCapabilities, output_cache
from abliterate.measure.batching import BatchRunner
from abliterate.measure.first_token import first_token_logprobs

SYSTEM = "You are a careful assistant who answers briefly."


@pytest.mark.parametrize("family", list(FAMILIES))
def test_supported_families_keep_every_capability(family):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CapabilityWarning)
        lm = tiny_lm(family)
    assert lm.caps.cache_arg is not None, "prefix sharing would be silently off"
    assert lm.caps.position_ids and lm.caps.logits_to_keep
    assert lm.caps.notes == []
    assert BatchRunner(lm, lm.format(HARMFUL, system=SYSTEM), 4).prefix_len > 20


class OldNames(torch.nn.Module):
    """A transformers < 5.24 style forward: the cache goes in and comes out as ``past_key_values``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.seen: list[bool] = []

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None, logits_to_keep=0
    ):
        self.seen.append(past_key_values is not None)
        kwargs = {"cache": past_key_values} if ForwardCapabilities.of(self.inner).cache_arg == "cache" else {}
        if not kwargs:
            kwargs = {"past_key_values": past_key_values}
        out = self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

        class Output:
            logits = out.logits
            past_key_values = output_cache(out)

        return Output()


def test_cache_under_the_old_name_is_used_and_gives_the_same_numbers():
    plain = tiny_lm("llama")
    old = from_pretrained_objects(
        OldNames(tiny_model("llama")), tiny_tokenizer(), source="old-names", layers_path="inner.model.layers"
    )
    assert old.caps.cache_arg == "past_key_values"
    runner = BatchRunner(old, old.format(HARMFUL, system=SYSTEM), 3)
    assert runner.prefix_len > 20
    a = first_token_logprobs(plain, HARMLESS, system=SYSTEM, batch_size=3, share_prefix=False)
    b = first_token_logprobs(old, HARMLESS, system=SYSTEM, batch_size=3)
    assert any(old.model.seen), "the shared prefix's cache reached the model"
    assert (a - b).abs().max() < 1e-4
    acts_a = capture(plain, HARMFUL, HARMLESS, positions=[-1, "gen"], system=SYSTEM, batch_size=3, share_prefix=False)
    acts_b = capture(old, HARMFUL, HARMLESS, positions=[-1, "gen"], system=SYSTEM, batch_size=3)
    assert torch.allclose(acts_a.harmful_mean, acts_b.harmful_mean, atol=1e-4)


class Bare(torch.nn.Module):
    """A forward with none of the optional arguments."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_missing_capabilities_are_reported_once_and_results_stay_correct():
    with pytest.warns(CapabilityWarning) as record:
        bare = from_pretrained_objects(
            Bare(tiny_model("llama")), tiny_tokenizer(), source="bare", layers_path="inner.model.layers"
        )
    texts = [str(w.message) for w in record if issubclass(w.category, CapabilityWarning)]
    assert len(texts) == 3 and any("KV cache" in t for t in texts) and any("position_ids" in t for t in texts)
    assert bare.caps.to_dict()["notes"] == bare.caps.notes and len(bare.caps.notes) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", CapabilityWarning)  # nothing more is reported while it is used
        assert BatchRunner(bare, bare.format(HARMFUL, system=SYSTEM), 3).prefix_len == 0
        a = first_token_logprobs(tiny_lm("llama"), HARMLESS, system=SYSTEM, batch_size=3)
        b = first_token_logprobs(bare, HARMLESS, system=SYSTEM, batch_size=3)
    assert (a - b).abs().max() < 1e-4  # llama uses the attention mask for positions itself
    with pytest.raises(PromptError, match="'gen' needs a KV cache"):
        capture(bare, HARMFUL, HARMLESS, positions=["gen"])


def test_cli_reports_a_lost_capability_in_verbose_mode_and_metrics(tmp_path, monkeypatch):
    import json

    from tiny import pretend_refusal
    from typer.testing import CliRunner

    from abliterate.cli import app

    model_dir = tmp_path / "model"
    tiny_model("qwen2").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    real = ForwardCapabilities.of
    monkeypatch.setattr(ForwardCapabilities, "of", classmethod(lambda cls, m: real(m).__class__(None, True, True)))
    args = ["run", str(model_dir), "--n-train", "4", "--n-val", "8", "--n-test", "2", "--max-new-tokens", "2"]
    args += ["--no-search"]
    with pretend_refusal():
        quiet = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")])
        loud = CliRunner().invoke(app, ["-v", *args, "--out", str(tmp_path / "b")])
    assert quiet.exit_code == 0 and loud.exit_code == 0, quiet.output + loud.output
    assert "KV cache" not in quiet.stderr
    assert "warning:" in loud.stderr and "KV cache" in loud.stderr
    for out in ("a", "b"):
        caps = json.loads((tmp_path / out / "metrics.json").read_text())["model_capabilities"]
        assert caps["cache_arg"] is None and caps["position_ids"] and len(caps["notes"]) == 1
