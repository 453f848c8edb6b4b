"""Big-model capture on CPU: accelerate ``device_map`` / ``max_memory`` with CPU and disk offload.

A tiny checkpoint is loaded twice, plainly and dispatched by accelerate with some (or all) decoder
layers offloaded to disk (weights on the meta device, streamed in by accelerate's hooks). Capture,
runtime ablation and induction, generation and evaluation must give the plain model's numbers, and an
in-memory weight edit must refuse with a pointer to the streaming edit, which must then produce the
same model as editing the plain one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_loading import write_model
from tiny import FAMILIES, HARMFUL, HARMLESS, tiny_tokenizer
from transformers import AutoModelForCausalLM

from abliterate import ablate, capture, induce, load_model, orthogonalize
from abliterate.checkpoint.stream_edit import stream_orthogonalize
from abliterate.errors import AbliterateError
from abliterate.evaluate.evaluation import Evaluator
from abliterate.measure.directions import mean_diff

OFFLOAD_FAMILIES = ["llama", "gemma2", "gpt2", "qwen2_moe"]


def split_map(lm_plain, disk_layers: set[int]) -> dict[str, str]:
    """A device map with the named decoder layers on disk and every other module on the CPU."""
    names = {m: n for n, m in lm_plain.model.named_modules()}
    layers = [names[layer] for layer in lm_plain.anatomy.layers]
    dm = {name: "disk" if i in disk_layers else "cpu" for i, name in enumerate(layers)}
    for name, module in lm_plain.model.named_modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if own and not any(name.startswith(layer + ".") for layer in layers):
            dm[name] = "cpu"
    return dm


@pytest.fixture(params=OFFLOAD_FAMILIES)
def pair(request, tmp_path):
    src = tmp_path / "model"
    write_model(src, request.param)
    plain = load_model(src)
    offloaded = load_model(src, device_map=split_map(plain, {1, 2}), offload_folder=tmp_path / "offload")
    return src, plain, offloaded


def logits(lm, prompts):
    batch = lm.encode(lm.format(prompts))
    with torch.inference_mode():
        return lm.forward(batch).logits[:, -1].float()


def test_offloaded_layers_are_on_disk(pair):
    _, plain, lm = pair
    assert lm.offloaded and not plain.offloaded
    assert lm.device == torch.device("cpu")
    assert any(p.device.type == "meta" for p in lm.anatomy.layers[1].parameters())
    assert all(p.device.type == "cpu" for p in lm.anatomy.layers[0].parameters())


def test_capture_ablate_induce_match_plain_model(pair):
    _, plain, lm = pair
    acts_plain = capture(plain, HARMFUL, HARMLESS, positions=[-2, -1, "gen"], batch_size=4)
    acts = capture(lm, HARMFUL, HARMLESS, positions=[-2, -1, "gen"], batch_size=4)
    torch.testing.assert_close(acts.harmful_mean, acts_plain.harmful_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acts.harmless_mean, acts_plain.harmless_mean, atol=1e-5, rtol=1e-5)
    r = mean_diff(acts)[1, -1]
    with ablate(plain, r):
        want = logits(plain, HARMLESS[:3])
    with ablate(lm, r):
        got = logits(lm, HARMLESS[:3])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, logits(lm, HARMLESS[:3]), atol=1e-3)  # the ablation did something
    with induce(plain, r, acts):
        want = logits(plain, HARMLESS[:3])
    with induce(lm, r, acts):
        got = logits(lm, HARMLESS[:3])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_generation_and_evaluation_match_plain_model(pair):
    _, plain, lm = pair
    r = mean_diff(capture(plain, HARMFUL, HARMLESS))[2, -1]
    m_plain = Evaluator(plain, HARMFUL[:3], HARMLESS[:3], max_new_tokens=6).measure("after", lambda: ablate(plain, r))
    m = Evaluator(lm, HARMFUL[:3], HARMLESS[:3], max_new_tokens=6).measure("after", lambda: ablate(lm, r))
    assert [s.response for s in m.harmful_samples] == [s.response for s in m_plain.harmful_samples]
    assert [s.response for s in m.harmless_samples] == [s.response for s in m_plain.harmless_samples]
    assert m.kl == pytest.approx(m_plain.kl, abs=1e-5)


def test_weight_edit_of_offloaded_model_points_to_streaming(pair, tmp_path):
    src, plain, lm = pair
    r = mean_diff(capture(lm, HARMFUL, HARMLESS))[1, -1]
    before = {n: p.clone() for n, p in lm.model.named_parameters() if p.device.type != "meta"}
    with pytest.raises(AbliterateError, match="offloaded.*stream"):
        orthogonalize(lm, r)
    for n, p in lm.model.named_parameters():  # nothing was half-edited
        if n in before:
            assert torch.equal(p, before[n]), n
    # the streaming edit of the checkpoint is the edit the offloaded model could not make in place
    stream_orthogonalize(src, tmp_path / "edited", r)
    orthogonalize(plain, r)
    edited = load_model(tmp_path / "edited")
    torch.testing.assert_close(logits(edited, HARMLESS[:3]), logits(plain, HARMLESS[:3]), atol=1e-4, rtol=1e-4)


def test_auto_device_map_with_max_memory_offloads_to_disk(tmp_path):
    src = tmp_path / "model"
    write_model(src, "llama")
    plain = load_model(src)
    lm = load_model(src, device_map="auto", max_memory={"cpu": "120KB"}, offload_folder=tmp_path / "off")
    assert "disk" in set(lm.model.hf_device_map.values())
    assert lm.offloaded
    a, b = capture(plain, HARMFUL, HARMLESS), capture(lm, HARMFUL, HARMLESS)
    torch.testing.assert_close(a.harmful_mean, b.harmful_mean, atol=1e-5, rtol=1e-5)


def test_offload_folder_is_not_left_in_the_model_directory(tmp_path):
    src = tmp_path / "model"
    write_model(src, "llama")
    before = sorted(p.name for p in Path(src).iterdir())
    lm = load_model(src, device_map="auto", max_memory={"cpu": "120KB"})
    capture(lm, HARMFUL, HARMLESS)
    assert sorted(p.name for p in Path(src).iterdir()) == before


# --- 4-bit / 8-bit loading through bitsandbytes (runs where bitsandbytes is installed; it has a CPU backend) ----


def write_quantizable(directory: Path) -> None:
    """The tiny llama with an MLP width of 128: bitsandbytes' CPU 4-bit kernels need multiples of 64."""
    cls, kwargs = FAMILIES["llama"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(**{**kwargs, "intermediate_size": 128}))
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)


@pytest.mark.parametrize("quantize", ["8bit", "4bit"])
def test_quantized_capture_and_runtime_edits(tmp_path, quantize):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
    src = tmp_path / "model"
    write_quantizable(src)
    plain = load_model(src)
    lm = load_model(src, quantize=quantize)
    assert lm.quantized and not plain.quantized
    assert type(lm.anatomy.writers[0][0].module).__name__ in {"Linear8bitLt", "Linear4bit"}
    a, b = capture(plain, HARMFUL, HARMLESS), capture(lm, HARMFUL, HARMLESS)
    # quantization error, not a bug: the means agree closely (cosine) and the direction survives
    cos = torch.nn.functional.cosine_similarity(a.harmful_mean.flatten(), b.harmful_mean.flatten(), dim=0)
    assert cos > 0.95
    r, r_q = mean_diff(a)[2, -1], mean_diff(b)[2, -1]
    assert torch.nn.functional.cosine_similarity(r.vector, r_q.vector, dim=0) > 0.8
    base = logits(lm, HARMLESS[:3])
    with ablate(lm, r_q), torch.inference_mode():
        edited = logits(lm, HARMLESS[:3])
        hidden = lm.forward(lm.encode(lm.format(HARMLESS[:3])), output_hidden_states=True).hidden_states
    assert not torch.allclose(base, edited, atol=1e-3)
    u = r_q.vector / r_q.vector.norm()
    for h in hidden[:-1]:  # every layer input is orthogonal to the direction (the last one is normed)
        assert (h.float() @ u).abs().max() < 1e-3 * h.float().norm(dim=-1).max()
    with pytest.raises(AbliterateError, match="quantized.*stream_orthogonalize"):
        orthogonalize(lm, r_q)


def test_quantize_errors_are_one_line(tmp_path, monkeypatch):
    src = tmp_path / "model"
    write_model(src, "llama")
    with pytest.raises(AbliterateError, match="unknown quantize '3bit'"):
        load_model(src, quantize="3bit")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(AbliterateError, match="needs bitsandbytes: pip install bitsandbytes"):
        load_model(src, quantize="4bit")


# --- the whole journey on a model that does not fit: `abliterate run --device-map ... / --quantize` ------------


def _run_cli(model: Path, out: Path, *flags: str):
    from test_cli import invoke
    from tiny import pretend_refusal

    small = ("--n-train", "6", "--n-val", "8", "--n-test", "2", "--max-new-tokens", "4", "--no-search")
    with pretend_refusal():
        res = invoke("--json", "run", str(model), "--out", str(out), *small, *flags)
    assert res.exit_code == 0, res.output
    return json.loads((out / "metrics.json").read_text())


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {
        k: v
        for f in sorted(folder.glob("*.safetensors"))
        if f.name != "directions.safetensors"
        for k, v in load_file(f).items()
    }


def test_run_with_disk_offload_writes_the_same_model_as_in_memory(tmp_path):
    src = tmp_path / "model"
    write_model(src, "qwen2")
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    plain = _run_cli(src, tmp_path / "plain")
    off = _run_cli(src, tmp_path / "off", "--device-map", "auto", "--max-memory", "cpu=100KB")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == files  # the input is untouched
    assert off["chosen"] == plain["chosen"]
    for key in ("refusal_rate", "over_refusal", "kl"):
        assert off["after"][key] == pytest.approx(plain["after"][key], abs=1e-5), key
    assert "runtime ablation hooks" in off["note"] and "shard by shard" in off["note"]
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "off")
    assert a.keys() == b.keys()  # tied embeddings untied in both
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "off")  # plain transformers loads it
    assert not reloaded.config.tie_word_embeddings
    for name in ("README.md", "report.html", "directions.safetensors", "tokenizer_config.json", "config.json"):
        assert (tmp_path / "off" / name).is_file(), name


def test_run_quantized_writes_the_edit_of_the_full_precision_checkpoint(tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
    from abliterate.measure.directions import DirectionSet

    src = tmp_path / "model"
    write_quantizable(src)
    metrics = _run_cli(src, tmp_path / "q8", "--quantize", "8bit")
    chosen = metrics["chosen"]
    ds = DirectionSet.load(tmp_path / "q8" / "directions.safetensors")
    stream_orthogonalize(src, tmp_path / "want", ds[chosen["layer"], chosen["position"]])
    got, want = _weights(tmp_path / "q8"), _weights(tmp_path / "want")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert "quantized" in metrics["note"]


def test_bad_placement_flags_are_one_line_errors(tmp_path):
    from test_cli import invoke

    src = tmp_path / "model"
    write_model(src, "qwen2")
    cases = [
        (["--max-memory", "cpu=1GiB"], "max_memory needs device_map"),
        (["--device-map", "auto", "--max-memory", "cpu:1GiB"], "bad max_memory entry 'cpu:1GiB'"),
        (["--quantize", "2bit"], "quantize must be 4bit or 8bit"),
    ]
    for flags, message in cases:
        res = invoke("run", str(src), "--out", str(tmp_path / "o"), *flags)
        assert res.exit_code != 0 and message in res.output, (flags, res.output)
        assert not (tmp_path / "o").exists()
    res = invoke("eval", str(src), "--max-memory", "cpu=1GiB")
    assert res.exit_code != 0 and "max_memory needs a device_map" in res.output


def test_run_searches_an_offloaded_model_through_hooks_and_streams_the_pick(tmp_path):
    """The search scores offloaded trials with runtime hooks; the pick is written from the checkpoint."""
    from test_cli import invoke
    from tiny import pretend_refusal

    from abliterate.edit.plan import Directions, apply_plan, build_plan
    from abliterate.edit.spec import EditSpec
    from abliterate.measure.directions import DirectionSet

    src = tmp_path / "model"
    write_model(src, "qwen2")
    flags = ("--n-train", "6", "--n-val", "8", "--n-test", "2", "--max-new-tokens", "2", "--trials", "8")
    with pretend_refusal():
        res = invoke(
            "--json",
            "run",
            str(src),
            "--out",
            str(tmp_path / "off"),
            *flags,
            "--kl-budget",
            "100",
            "--device-map",
            "auto",
            "--max-memory",
            "cpu=100KB",
            env={"ABLITERATE_SEARCH_VERIFY_TOP": "0"},
        )
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "off" / "metrics.json").read_text())
    assert len(metrics["search"]["trials"]) == 8 and "runtime ablation hooks" in metrics["note"]
    spec = EditSpec.from_dict(metrics["edit"]["spec"])
    lm = load_model(str(src))
    source = Directions.from_sets(DirectionSet.load(tmp_path / "off" / "directions.safetensors"))
    apply_plan(lm, build_plan(lm, spec, source), mode="weights")
    lm.model.save_pretrained(tmp_path / "want")
    got, want = _weights(tmp_path / "off"), _weights(tmp_path / "want")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
