"""Runtime ablation of the residual stream itself (``residual_only=True``, CLI ``--residual-stream``): the path for
models no weight edit is exact for. Shown on a post-LN OPT (``do_layer_norm_before=False``, a LayerNorm on the sum
after every sublayer): its weights cannot be edited exactly, but projecting the direction out of every layer's input
and output leaves none of it anywhere in the stream; weight edits through such a load are refused, nothing written."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import transformers as tf
from registry import randomize
from terminal import Terminal
from test_cli import invoke
from tiny import HARMFUL, VOCAB, H, tiny_tokenizer

from abliterate import ArchitectureError, DirectionSet, ablate, orthogonalize
from abliterate.lm import from_pretrained_objects
from abliterate.ops.hooks import HookSet

LOOSE = ("--n-train", "6", "--n-val", "8")


def post_ln_opt(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tf.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=H,
        word_embed_proj_dim=H,
        num_hidden_layers=2,
        ffn_dim=2 * H,
        num_attention_heads=4,
        max_position_embeddings=256,
        do_layer_norm_before=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return randomize(tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32))


@pytest.fixture(scope="module")
def post_ln_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("postln") / "model"
    post_ln_opt().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _needs(model_type: str) -> None:
    if model_type not in tf.CONFIG_MAPPING:
        pytest.skip(f"transformers {tf.__version__} has no {model_type}")


def _unit(seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(H, generator=gen), dim=0)


def _stream(lm, ids):
    """Logits and every layer's input and output, in call order."""
    seen: list[torch.Tensor] = []
    with HookSet() as watch, torch.no_grad():
        for layer in lm.anatomy.layers:
            watch.watch_input(layer, lambda x: seen.append(x.float().clone()))
            watch.watch_output(layer, lambda x: seen.append(x.float().clone()))
        logits = lm.model(input_ids=ids).logits.float()
    return logits, seen


def _leak(h: torch.Tensor, u: torch.Tensor) -> float:
    return float((h @ u).abs().max() / h.norm(dim=-1).max())


def test_a_post_ln_model_is_refused_for_weights_and_names_the_runtime_path():
    with pytest.raises(ArchitectureError) as exc:
        from_pretrained_objects(post_ln_opt(), tiny_tokenizer())
    msg = str(exc.value)
    assert "\n" not in msg and "post-LN residual" in msg
    assert "residual_only=True" in msg and "--residual-stream" in msg


def test_runtime_residual_ablation_is_exact_and_reversible():
    lm = from_pretrained_objects(post_ln_opt(), tiny_tokenizer(), residual_only=True)
    assert lm.anatomy.residual_only and "post-LN residual" in (lm.anatomy.weight_error or "")
    u = _unit()
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    base, base_stream = _stream(lm, ids)
    assert max(_leak(h, u) for h in base_stream) > 1e-2, "the direction is in the unedited stream"
    with ablate(lm, u):
        edited, stream = _stream(lm, ids)
    assert max(_leak(h, u) for h in stream) < 1e-6, "every layer's input and output is free of the direction"
    assert float((edited - base).abs().max()) > 1e-3
    after, _ = _stream(lm, ids)
    assert torch.equal(after, base), "leaving the context removes the hooks"
    with ablate(lm, u, scale=0.0):
        unchanged, _ = _stream(lm, ids)
    assert torch.equal(unchanged, base), "scale 0 removes nothing"
    with ablate(lm, u, layers=[1]):
        _, partial = _stream(lm, ids)
    # inputs/outputs in call order: layer 0 in, layer 0 out, layer 1 in, layer 1 out
    assert _leak(partial[0], u) > 1e-2 and _leak(partial[1], u) > 1e-2, "layer 0 and the embeddings untouched"
    assert _leak(partial[2], u) < 1e-6 and _leak(partial[3], u) < 1e-6


def test_a_partial_scale_is_applied_once_at_each_point():
    """scale=0.5 halves the component once where a layer hands its output to the next, not twice."""
    lm = from_pretrained_objects(post_ln_opt(), tiny_tokenizer(), residual_only=True)
    u = _unit()
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with ablate(lm, u, scale=0.5):
        _, stream = _stream(lm, ids)
    layer0_in, layer0_out, layer1_in, _ = stream
    torch.testing.assert_close(layer1_in @ u, layer0_out @ u, rtol=1e-6, atol=1e-6)
    assert float((layer0_out @ u).abs().max()) > 1e-3, "half the component is left"


def test_weight_edits_through_a_residual_only_load_are_refused():
    lm = from_pretrained_objects(post_ln_opt(), tiny_tokenizer(), residual_only=True)
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    with pytest.raises(ArchitectureError, match=r"loaded with residual_only=True \(.*post-LN.*\): only runtime"):
        orthogonalize(lm, _unit())
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def test_residual_only_refuses_a_model_whose_layers_loop():
    """A layer that runs several times per forward would be captured several times: refused in one line."""
    from registry import tiny_registry_model

    from abliterate.arch.selfcheck import checked_anatomy

    _needs("dory")
    with pytest.raises(ArchitectureError, match=r"layer 0 runs 2 times in one forward pass"):
        checked_anatomy(tiny_registry_model("dory"), residual_only=True)


def test_cli_measure_and_apply_with_residual_stream(post_ln_dir, tmp_path):
    plain = invoke("measure", str(post_ln_dir), "--out", str(tmp_path / "refused"), *LOOSE)
    assert plain.exit_code != 0 and "--residual-stream" in plain.output
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "m"
    res = invoke("measure", str(post_ln_dir), "--out", str(out), *LOOSE, "--residual-stream")
    assert res.exit_code == 0, res.output
    dirs = out / "directions.safetensors"
    assert DirectionSet.load(dirs).vectors.shape[-1] == H
    assert json.loads((out / "candidates.json").read_text())["settings"]["ablation"] == "residual_stream"

    check = invoke(
        "apply", str(post_ln_dir), str(dirs), "--layer", "1", "--runtime-check", HARMFUL[0], "--residual-stream"
    )
    assert check.exit_code == 0, check.output
    assert f"> {HARMFUL[0]}" in check.output

    write = invoke(
        "apply", str(post_ln_dir), str(dirs), "--layer", "1", "--out", str(tmp_path / "w"), "--residual-stream"
    )
    assert write.exit_code == 2 and "--residual-stream acts at run time only" in write.output
    induce = invoke(
        "apply",
        str(post_ln_dir),
        str(dirs),
        "--layer",
        "1",
        "--mode",
        "induce",
        "--residual-stream",
        "--runtime-check",
        HARMFUL[0],
    )
    assert induce.exit_code == 0, induce.output
    weights = invoke("apply", str(post_ln_dir), str(dirs), "--layer", "1", "--out", str(tmp_path / "w"))
    assert weights.exit_code != 0 and "post-LN residual" in weights.output
    assert not (tmp_path / "w").exists()


def test_cli_chat_with_residual_stream_in_a_terminal(post_ln_dir, tmp_path):
    out = tmp_path / "m"
    assert invoke("measure", str(post_ln_dir), "--out", str(out), *LOOSE, "--residual-stream").exit_code == 0
    args = [str(post_ln_dir), str(out / "directions.safetensors"), "--layer", "1", "--max-new-tokens", "3"]
    with Terminal([sys.executable, "-m", "abliterate.cli", "chat", *args, "--residual-stream"]) as term:
        term.read_until(b"[ablate] you>")
        term.type(HARMFUL[0].encode())
        term.read_until(b"[ablate] you>")  # answered with the residual stream ablated, then asked again
        term.type(b"/quit")
        assert term.proc.wait(timeout=60) == 0


@pytest.mark.parametrize("model_type", ["deepseek_v4", "qwen4_exp_text"])
def test_capture_reads_the_mean_of_hyper_connection_streams(model_type):
    """DeepSeek V4 carries (batch, tokens, 4, hidden) streams, Qwen4-exp (batch, tokens, 4 * hidden): capture
    records the streams' mean at each layer input, for every prompt."""
    from registry import OVERRIDES, SIZES, causal_lm_class, config_class, randomize, tiny_kwargs

    from abliterate import capture

    _needs(model_type)
    cls = config_class(model_type)  # the registry's tiny config, with the tiny tokenizer's vocabulary
    config = cls(**tiny_kwargs(cls, OVERRIDES.get(model_type), {**SIZES, "vocab_size": VOCAB}))
    torch.manual_seed(0)
    model = randomize(causal_lm_class(model_type)._from_config(config, dtype=torch.float32))
    lm = from_pretrained_objects(model, tiny_tokenizer())
    hidden = lm.hidden_size
    acts = capture(lm, HARMFUL[:4], HARMFUL[:4], batch_size=1, share_prefix=False)
    assert acts.harmful_mean.shape == (lm.num_layers + 1, 1, hidden)
    seen: list[torch.Tensor] = []
    with HookSet() as watch, torch.no_grad():
        watch.watch_input(lm.anatomy.layers[1], lambda x: seen.append(x[:, -1].float().reshape(1, -1, hidden)))
        for text in lm.format(HARMFUL[:4]):
            lm.model(**lm.encode([text]))
    manual = torch.cat(seen).mean(1).mean(0)
    assert seen[0].shape[1] == 4, "four streams"
    torch.testing.assert_close(acts.harmful_mean[1, 0].float(), manual, rtol=1e-4, atol=1e-5)
