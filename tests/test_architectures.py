"""Every causal-LM type transformers registers, as a tiny random model: supported (runtime ablation of a random
direction equals the orthogonalized weights, and the residual stream has no component along it), or refused with a
clear ArchitectureError, or listed here as impossible to build tiny. A type in none of these fails, so a
transformers release that adds one gets reported. ``python bench/architectures.py`` prints the table."""

from __future__ import annotations

import re

import pytest
from registry import CAUSAL_TYPES, ENCODER_TYPES, Outcome, check_type

# Types no tiny model is built for, and why.
UNBUILDABLE: dict[str, str] = {
    "blt": "byte latent transformer: four sub-models (patcher, local encoder/decoder, global transformer) whose "
    "widths and hash-embedding tables must agree; no tiny config runs",
    "gemma3n": "its vision tower needs the timm package",
    "gemma4_assistant": "a draft model: its config requires the target model's shared KV cache layout",
    "gemma4_unified_assistant": "a draft model: its forward needs the target model's shared KV states",
    "kolibri1_1": "its config validation (validate_architecture) rejects every tiny layout tried",
}

# Types refused with a clear ArchitectureError, and what the error must say: no weight edit is exact for them.
_EMBEDDING_NORM = r"transforms the embeddings before the first layer \(.*(norm|LayerNorm).*\)"
_POST_LN = r"normalizes the residual stream after each layer adds to it .* a post-LN residual"
_ENCODER_EMBEDDINGS = r"transforms the embeddings before the first layer \(.*embeddings\.LayerNorm"
REFUSED: dict[str, str] = {
    # decoder-only
    # sinusoidal positions: a buffer, not a weight
    "ctrl": r"transforms the embeddings before the first layer: it adds a term that depends only on the position",
    "xglm": r"before the first layer \(model\.embed_positions\): it adds a term that depends only on the position",
    # a per-channel scale and bias on the embeddings and on the stream
    "zaya": r"transforms the embeddings before the first layer: it scales each channel of the embeddings",
    # AltUp: four streams stacked in front of the batch (and a copy of the normed stream added back by LAuReL)
    "gemma3n_text": r"layer 0 takes a \(4, 1, 8, 64\) input .* not \(batch, tokens, hidden\)",
    "openai-gpt": _POST_LN,
    "minimax": _POST_LN,  # the residual itself goes through the input norm
    "dory": r"the residual changes between layer 1's output and layer 0's input",  # layers re-run in a loop
    "hrm_text": r"the residual changes between layer 1's output and layer 0's input",  # H/L loops with injection
    "inkling2_loop_text": r"the residual changes between layer 3's output and layer 2's input",  # looped layers
    "musicgen": r"input embeddings are a ModuleList, not one embedding table",  # one table per codebook
    "musicgen_melody": r"input embeddings are a ModuleList, not one embedding table",
    "rwkv": r"layer 0 of RwkvForCausalLM: .* of its residual update is not written",  # gated writes, pre_ln
    "longcat_flash": r"layer 0 of LongcatFlashForCausalLM: .* not written",  # identity ("zero") experts
    # a norm after each routed expert's down projection (mlp.experts.post_expert_norm), then the gate's weights
    "ergo": r"layer 1 of ErgoForCausalLM: after ablating a random direction from its writers .* is still in",
    # encoders and encoder-decoders exposed as causal LMs
    "bart": _EMBEDDING_NORM,
    "blenderbot-small": _EMBEDDING_NORM,
    "mbart": _EMBEDDING_NORM,
    "mvp": _EMBEDDING_NORM,
    "plbart": _EMBEDDING_NORM,
    "prophetnet": _EMBEDDING_NORM,
    "trocr": _EMBEDDING_NORM,
    "marian": _POST_LN,
    "xlnet": r"layer 0 takes a \(8, 1, 64\) input for a batch of 1 x 8 tokens: its axes are not",  # tokens first
    "bert": _ENCODER_EMBEDDINGS,
    "bert-generation": _ENCODER_EMBEDDINGS,
    "big_bird": _ENCODER_EMBEDDINGS,
    "camembert": _ENCODER_EMBEDDINGS,
    "data2vec-text": _ENCODER_EMBEDDINGS,
    "ernie": _ENCODER_EMBEDDINGS,
    "roberta": _ENCODER_EMBEDDINGS,
    "roberta-prelayernorm": _ENCODER_EMBEDDINGS,
    "roc_bert": _ENCODER_EMBEDDINGS,
    "roformer": _ENCODER_EMBEDDINGS,
    "xlm-roberta": _ENCODER_EMBEDDINGS,
    "xmod": _ENCODER_EMBEDDINGS,
    "reformer": r"transforms the embeddings before the first layer",  # reversible two-stream residual
    "xlm": r"the residual changes between layer 0's output and layer 1's input",  # a norm between layers
    "electra": r"token embeddings are 128-wide but its residual stream is 64-wide",
    "rembert": r"token embeddings are 256-wide but its residual stream is 64-wide",
    "git": r"git\.embeddings\.word_embeddings \(Embedding\) transforms its rows",  # BERT-like text layers
}

# Refused types that runtime ablation of the residual stream itself (residual_only=True) cannot serve either, and
# what that refusal must say; every other refused type must be served by it (nothing left between layers).
RUNTIME_REFUSED: dict[str, str] = {
    "gemma3n_text": r"not \(batch, tokens, hidden\)",
    "dory": r"layer 0 runs 2 times in one forward pass",
    "hrm_text": r"layer 0 runs 6 times in one forward pass",
    "inkling2_loop_text": r"layer 2 runs 2 times in one forward pass",
    "musicgen": r"input embeddings are a ModuleList",
    "musicgen_melody": r"input embeddings are a ModuleList",
    "prophetnet": r"layer 0 takes 24 positions for 8 tokens",
    "reformer": r"runtime ablation of the residual stream breaks its forward pass",
    "xlnet": r"its axes are not",
    "electra": r"token embeddings are 128-wide",
    "rembert": r"token embeddings are 256-wide",
}

TOLERANCE = 1e-4


def test_tables_name_registered_types_only():
    known = set(CAUSAL_TYPES)
    assert not set(UNBUILDABLE) - known, "a listed type left transformers' registry: drop it from UNBUILDABLE"
    assert not set(REFUSED) - known, "a listed type left transformers' registry: drop it from REFUSED"
    assert not set(UNBUILDABLE) & set(REFUSED)
    assert not set(RUNTIME_REFUSED) - set(REFUSED)


@pytest.mark.parametrize("model_type", [t for t in CAUSAL_TYPES if t not in UNBUILDABLE])
def test_architecture(model_type):
    assert_outcome(check_type(model_type), REFUSED)


def assert_outcome(outcome: Outcome, refused: dict[str, str]) -> None:
    """Supported (exact: runtime == weights, residual clean) or refused in one line as ``refused`` expects."""
    model_type = outcome.model_type
    assert outcome.status != "unbuildable", (
        f"{model_type} cannot be built tiny ({outcome.detail}): fix the tiny config or list it as unbuildable"
    )
    if outcome.status == "refused":
        assert model_type in refused, f"{model_type} is refused but not listed as refused: {outcome.detail}"
        assert "\n" not in outcome.detail
        assert re.search(refused[model_type], outcome.detail), outcome.detail
        if model_type in RUNTIME_REFUSED:
            assert "\n" not in outcome.runtime_only
            assert re.search(RUNTIME_REFUSED[model_type], outcome.runtime_only), outcome.runtime_only
            assert "residual_only=True" not in outcome.detail, "the refusal offers a runtime path that is refused too"
            return
        assert not outcome.runtime_only, f"residual_only=True refuses {model_type}: {outcome.runtime_only}"
        assert "residual_only=True (CLI: measure or chat --residual-stream)" in outcome.detail
        assert outcome.runtime_leak < TOLERANCE, f"runtime residual ablation leaves {outcome.runtime_leak:.2e}"
        assert outcome.runtime_effect > 1e-3, "ablating the residual stream must change the logits"
        return
    assert model_type not in refused, f"{model_type} is supported now: remove it from the refused table"
    assert outcome.writers >= 2
    assert outcome.effect > 1e-3, "ablating the direction must change the logits"
    assert outcome.residual_leak < TOLERANCE, f"the residual keeps {outcome.residual_leak:.2e} of the direction"
    assert outcome.runtime_vs_weights < TOLERANCE, (
        f"runtime ablation and the weight edit differ by {outcome.runtime_vs_weights:.2e} on the logits"
    )
    assert not outcome.discovered, f"only probing found {outcome.discovered}: add a pattern to anatomy.py"


def test_support_target():
    """Share of the decoder-only types that build which are supported: 146 of 158 (92.4 %) with transformers 5.24,
    148 of 161 (91.9 %) with 5.25, whose new `ergo` normalizes each expert's output after its down projection (no
    exact weight edit: refused in one line). The issue asks for 95 %; every refusal in REFUSED is a model no weight
    edit removes a direction from exactly
    (or one that needs a LayerNorm post-norm / container bias in the edit), so this guards against regressions."""
    decoder_only = [t for t in CAUSAL_TYPES if t not in ENCODER_TYPES and t not in UNBUILDABLE]
    refused = [t for t in decoder_only if t in REFUSED]
    supported = len(decoder_only) - len(refused)
    assert supported / len(decoder_only) >= 0.915, f"{supported}/{len(decoder_only)} supported"


def test_qwen4_exp_with_ple_layers_is_refused():
    """Qwen4-exp without PLE layers (its default) is supported; a PLE layer adds a depthwise convolution and a SiLU
    after its value projection, which no edit makes exact: refused in one line, never edited wrongly."""
    import torch
    from registry import OVERRIDES, causal_lm_class, config_class, randomize, tiny_kwargs

    from abliterate import ArchitectureError
    from abliterate.arch.selfcheck import checked_anatomy

    if "qwen4_exp_text" not in CAUSAL_TYPES:
        pytest.skip("this transformers has no Qwen4-exp")
    cls = config_class("qwen4_exp_text")
    config = cls(**{**tiny_kwargs(cls, OVERRIDES.get("qwen4_exp_text")), "ple_layer_ids": [1]})
    torch.manual_seed(0)
    model = randomize(causal_lm_class("qwen4_exp_text")._from_config(config, dtype=torch.float32))
    with pytest.raises(ArchitectureError, match=r"layer 0 of .*\(ple\.value_proj, .*is still in the layer's residual"):
        checked_anatomy(model)
