"""Through the CLI: ``export --format peft``, ``run --as-adapter``, manifests, ``verify`` and ``reproduce``."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from test_cli import invoke
from tiny import HARMFUL, HARMLESS, pretend_refusal, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from abliterate import DirectionSet, load_model
from abliterate.edit.plan import Directions, apply_plan, build_plan
from abliterate.edit.spec import EditSpec, Kernel
from abliterate.outputs.manifest import MANIFEST, read_manifest, sha256_file

peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'abliterate[adapter]')")

SMALL = ("--n-train", "6", "--n-val", "8", "--n-test", "2", "--max-new-tokens", "4")


def one_line_error(res, *fragments: str) -> None:
    assert res.exit_code == 2, res.output
    noise = ("Loading weights", "Writing model shards")  # transformers' own progress bars
    lines = [line for line in res.output.splitlines() if line.strip() and not line.lstrip("\r").startswith(noise)]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    for fragment in fragments:
        assert fragment in res.output, res.output


def logits(model: torch.nn.Module, lm) -> torch.Tensor:
    batch = lm.encode(lm.format(HARMLESS[:3]))
    with torch.inference_mode():
        return model(**batch).logits.float()


def with_adapter(model_dir: Path, adapter: Path) -> torch.nn.Module:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(adapter)).eval()


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("share")
    model = root / "model"
    tiny_model("llama").save_pretrained(model)  # ties its embeddings: the export prints how to merge
    tiny_tokenizer().save_pretrained(model)
    res = invoke("measure", str(model), "--out", str(root / "measure"), "--n-train", "6", "--n-val", "8")
    assert res.exit_code == 0, res.output
    return model, root / "measure" / "directions.safetensors"


# --- export --format peft --------------------------------------------------------------------------------------


def test_export_peft_equals_apply(measured, tmp_path):
    model, directions = measured
    flags = ("--layer", "2", "--position", "-1", "--scale", "0.8")
    res = invoke(
        "export", str(directions), "--format", "peft", "--model", str(model), "--out", str(tmp_path / "a"), *flags
    )
    assert res.exit_code == 0, res.output
    assert "LoRA rank 1" in res.output and "tie_word_embeddings=False" in res.output
    assert {p.name for p in (tmp_path / "a").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        MANIFEST,
    }
    res = invoke("apply", str(model), str(directions), "--out", str(tmp_path / "edited"), *flags)
    assert res.exit_code == 0, res.output
    lm = load_model(model)
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32)
    assert (logits(with_adapter(model, tmp_path / "a"), lm) - logits(edited, lm)).abs().max() < 1e-4
    manifest = read_manifest(tmp_path / "a")
    assert manifest["command"] == "export" and manifest["config"]["format"] == "peft"
    assert manifest["inputs"]["files"]["directions"]["sha256"] == sha256_file(directions)
    assert manifest["inputs"]["model"]["files"]["model.safetensors"] == sha256_file(model / "model.safetensors")
    assert manifest["edit"] == {"direction": {"layer": 2, "position": -1, "method": "mean_diff"}, "scale": 0.8}
    assert invoke("verify", str(tmp_path / "a")).exit_code == 0
    assert read_manifest(directions.parent)["command"] == "measure"  # measure's folder carries one too
    applied = read_manifest(tmp_path / "edited")  # so does apply's, in memory and streamed
    assert applied["command"] == "apply" and applied["config"]["scale"] == 0.8
    assert applied["edit"]["direction"] == manifest["edit"]["direction"]
    res = invoke("apply", str(model), str(directions), "--stream", "--out", str(tmp_path / "streamed"), *flags)
    assert res.exit_code == 0, res.output
    assert read_manifest(tmp_path / "streamed")["config"]["stream"] is True
    assert invoke("verify", str(tmp_path / "edited")).exit_code == 0
    assert invoke("verify", str(tmp_path / "streamed")).exit_code == 0


def test_export_peft_of_an_edit_json(measured, tmp_path):
    model, directions = measured
    spec = EditSpec(k=2, attn=Kernel(1.0, 1.0, 0.4, 1.0), mlp=Kernel(2.0, 0.8, 0.8, math.inf), embedding=0.5)
    edit = tmp_path / "edit.json"
    edit.write_text(json.dumps({"spec": spec.to_dict(), "note": "test", "searched": True}))
    out = tmp_path / "adapter"
    res = invoke(
        "export", str(directions), "--format", "peft", "--model", str(model), "--edit", str(edit), "-o", str(out)
    )
    assert res.exit_code == 0, res.output
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    lm = load_model(model)
    adapted = logits(with_adapter(model, out), lm)
    apply_plan(lm, build_plan(lm, spec, Directions.from_sets(DirectionSet.load(directions))), mode="weights")
    assert (adapted - logits(lm.model, lm)).abs().max() < 1e-4
    manifest = read_manifest(out)
    assert manifest["edit"]["spec"] == spec.to_dict()
    assert manifest["inputs"]["files"]["edit"]["sha256"] == sha256_file(edit)
    res = invoke("apply", str(model), str(directions), "--edit", str(edit), "--stream", "--out", str(tmp_path / "s"))
    assert res.exit_code == 0, res.output
    streamed = read_manifest(tmp_path / "s")
    assert streamed["command"] == "apply" and streamed["edit"]["spec"] == spec.to_dict()
    assert invoke("verify", str(tmp_path / "s")).exit_code == 0


def test_export_peft_bad_input(measured, tmp_path):
    model, directions = measured
    out = tmp_path / "adapter"
    base = ("export", str(directions), "--out", str(out))
    norm = tmp_path / "norm.json"
    norm.write_text(json.dumps({"spec": EditSpec.full(1, norm_preserving=True).to_dict()}))
    cases = [
        ((*base, "--format", "peft", "--model", str(model), "--edit", str(norm)), "norm-preserving"),
        ((*base, "--format", "lora"), "unknown --format 'lora'"),
        ((*base, "--format", "peft", "--model-hint", "llama"), "drop --model-hint"),
        ((*base, "--model", str(model), "--edit", str(norm)), "--edit applies to --format peft only"),
        ((*base, "--format", "peft", "--model", str(model), "--edit", str(norm), "--scale", "0.5"), "drop --layer"),
        ((*base, "--format", "peft", "--model", str(model), "--layer", "1", "--layer", "2"), "at most one --layer"),
        ((*base, "--format", "peft", "--model", str(model), "--edit", str(tmp_path / "nope.json")), "not an edit.json"),
    ]
    for args, fragment in cases:
        one_line_error(invoke(*args), fragment)
        assert not out.exists() and not list(tmp_path.glob(".adapter*"))


# --- run: manifest, verify, reproduce, --as-adapter -------------------------------------------------------------


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """A run whose harmful prompts come from a file named relative to the working directory."""
    root = tmp_path_factory.mktemp("ran")
    model = root / "model"
    tiny_model("qwen2").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    prompts = root / "harmful.txt"
    prompts.write_text("\n".join(f"{p} (variant {i})" for i in range(3) for p in HARMFUL) + "\n")
    with pytest.MonkeyPatch.context() as mp, pretend_refusal():
        mp.chdir(root)
        res = invoke("run", str(model), "--out", str(root / "out"), "--harmful", "harmful.txt", *SMALL, "--no-search")
    assert res.exit_code == 0, res.output
    return root, model, prompts, root / "out"


def test_run_writes_a_manifest(ran):
    root, model, prompts, out = ran
    manifest = read_manifest(out)
    assert manifest["command"] == "run" and manifest["seed"] == 0 and manifest["config"]["n_train"] == 6
    assert manifest["versions"]["torch"] == torch.__version__
    files = manifest["inputs"]["model"]["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert files["config.json"] == sha256_file(model / "config.json")
    harmful, harmless = manifest["inputs"]["prompts"]
    assert harmful == {"kind": "harmful", "spec": "harmful.txt", "path": str(prompts), "sha256": sha256_file(prompts)}
    assert (
        harmless["spec"] == "bundled" and harmless["bundled"] == "data/harmless.jsonl" and len(harmless["sha256"]) == 64
    )
    outputs = manifest["outputs"]
    assert MANIFEST not in outputs and {"model.safetensors", "directions.safetensors", "metrics.json"} <= set(outputs)
    assert outputs["model.safetensors"] == sha256_file(out / "model.safetensors")
    if (out / "edit.json").is_file():
        assert manifest["edit"] == json.loads((out / "edit.json").read_text())


def test_card_of_a_local_model(ran):
    """A local input folder has no hub id: the card omits base_model and says why; the rest of the metadata parses."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(ran[3] / "README.md")
    data = card.data.to_dict()
    assert "base_model" not in data and data["library_name"] == "transformers" and "abliterated" in data["tags"]
    assert "`base_model` is omitted from the metadata: the input model was the local folder model" in card.text
    assert "license was not found" in card.text and "AutoModelForCausalLM.from_pretrained(" in card.text


def test_verify_reports_each_problem(ran, tmp_path):
    _, _, _, out = ran
    res = invoke("verify", str(out))
    assert res.exit_code == 0 and "match manifest.json" in " ".join(res.output.split())
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "metrics.json").write_text("{}\n")
    (copy / "directions.safetensors").unlink()
    (copy / "extra.txt").write_text("hi\n")
    res = invoke("verify", str(copy))
    assert res.exit_code == 1
    lines = res.output.splitlines()
    assert lines[0] == "missing: directions.safetensors"
    assert lines[1].startswith("changed: metrics.json (sha256 ")
    assert lines[2] == "unexpected: extra.txt (not in the manifest)" and len(lines) == 3
    res = invoke("--json", "verify", str(copy))
    assert res.exit_code == 1 and json.loads(res.output)["problems"] == lines
    # a tampered folder is not re-run
    one_line_error(invoke("reproduce", str(copy)), "does not match its own manifest (missing: directions.safetensors)")
    (copy / MANIFEST).write_text("{not json")
    one_line_error(invoke("verify", str(copy)), "manifest.json is not valid JSON")
    one_line_error(invoke("verify", str(tmp_path)), "has no manifest.json")
    one_line_error(invoke("reproduce", str(copy)), "not valid JSON")


def test_reproduce_is_bit_identical(ran, tmp_path, monkeypatch):
    _, _, _, out = ran
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    monkeypatch.chdir(tmp_path)  # the relative prompt path is found at its recorded place
    with pretend_refusal():
        res = invoke("reproduce", str(out))
    assert res.exit_code == 0, res.output
    assert "bit-identical" in res.output
    count = int(res.output.split("bit-identical: ")[1].split()[0])
    assert count > 30  # every tensor of the model and the direction set
    assert list(scratch.iterdir()) == []  # the temporary re-run is gone


def test_reproduce_reports_the_first_differing_tensor(ran, tmp_path):
    _, _, _, out = ran
    copy = tmp_path / "changed"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["config"]["scale"] = 0.5  # as if the run had been made with another scale
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pretend_refusal():
        res = invoke("reproduce", str(copy), "--out", str(tmp_path / "again"))
    assert res.exit_code == 1, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("differs: model.safetensors: tensor model.") and "differs (max |difference|" in line
    assert invoke("verify", str(tmp_path / "again")).exit_code == 0  # --out keeps the re-run, with its manifest


def test_reproduce_names_the_changed_or_missing_input(ran, tmp_path):
    root, model, prompts, out = ran
    original = prompts.read_text()
    prompts.write_text(original + "One more prompt.\n")
    try:
        one_line_error(invoke("reproduce", str(out)), f"input prompt file (harmful) {prompts} has changed")
    finally:
        prompts.write_text(original)
    config = model / "config.json"
    saved = config.read_bytes()
    config.write_bytes(saved + b"\n")
    try:
        one_line_error(invoke("reproduce", str(out)), f"input model file {model}/config.json has changed")
    finally:
        config.write_bytes(saved)
    moved = root / "moved"
    model.rename(moved)
    try:
        one_line_error(invoke("reproduce", str(out)), f"input model {model} is not found")
    finally:
        moved.rename(model)
    assert not (tmp_path / "again").exists()


def test_reproduce_refuses_other_outputs(measured, tmp_path):
    model, directions = measured
    res = invoke(
        "export",
        str(directions),
        "--format",
        "peft",
        "--model",
        str(model),
        "--layer",
        "1",
        "--out",
        str(tmp_path / "a"),
    )
    assert res.exit_code == 0, res.output
    one_line_error(invoke("reproduce", str(tmp_path / "a")), "written by 'export'", "only run outputs")


def test_run_as_adapter_after_a_search(ran, tmp_path, monkeypatch):
    """A tiny seeded search, its edit written as an adapter: base + adapter equals apply --edit of the same edit,
    and reproduce rebuilds it bit-identically (the search is deterministic under its seed)."""
    root, model, _, _ = ran
    out = tmp_path / "adapter-run"
    monkeypatch.chdir(root)
    with pretend_refusal():
        cheap = {"ABLITERATE_SEARCH_VERIFY_TOP": "0", "ABLITERATE_SEARCH_STARTUP": "2"}  # recorded in the manifest
        flags = ("--harmful", "harmful.txt", *SMALL, "--trials", "3", "--kl-budget", "100", "--as-adapter")
        res = invoke("run", str(model), "--out", str(out), *flags, env=cheap)
    assert res.exit_code == 0, res.output
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "edit.json", MANIFEST} <= names
    assert "model.safetensors" not in names and "config.json" not in names
    manifest = read_manifest(out)
    assert manifest["config"]["as_adapter"] is True and manifest["config"]["search"]["norm_preserving"] == [False]
    spec = json.loads((out / "edit.json").read_text())["spec"]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == spec["k"]
    res = invoke(
        "apply",
        str(model),
        str(out / "directions.safetensors"),
        "--edit",
        str(out / "edit.json"),
        "--out",
        str(tmp_path / "full"),
    )
    assert res.exit_code == 0, res.output
    lm = load_model(model)
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32)
    assert read_manifest(tmp_path / "full")["edit"]["spec"] == spec
    assert (logits(with_adapter(model, out), lm) - logits(full, lm)).abs().max() < 1e-4
    monkeypatch.chdir(tmp_path)
    with pretend_refusal():
        res = invoke("reproduce", str(out))
    assert res.exit_code == 0 and "bit-identical" in res.output, res.output


def test_run_as_adapter_refuses_early(tmp_path):
    model = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(model)  # writer biases: the classic edit's embedding part has no adapter
    tiny_tokenizer().save_pretrained(model)
    res = invoke("run", str(model), "--out", str(tmp_path / "out"), *SMALL, "--no-search", "--as-adapter")
    one_line_error(res, "lora_bias", "transformer.wte", "--no-search edits the embeddings")
    assert "capture" not in res.output  # refused right after loading
    res = invoke(
        "run", str(model), "--out", str(tmp_path / "out"), *SMALL, "--no-search", "--norm-preserving", "--as-adapter"
    )
    one_line_error(res, "norm-preserving")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]
