"""``export RUN_DIR --format peft`` through the CLI: the adapter of the edit the run wrote, for the base model the run
recorded. Base + adapter (unmerged and merged) equals the run's written model; a norm-preserving edit has no exact
adapter and is refused with one line; ``run --adapter`` keeps the search to edits an adapter holds."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import invoke
from tiny import HARMFUL, pretend_refusal, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from abliterate.outputs.manifest import MANIFEST, read_manifest

peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'abliterate[adapter]')")

SMALL = ("--n-train", "6", "--n-val", "8", "--n-test", "2", "--max-new-tokens", "4")
CHEAP = {"ABLITERATE_SEARCH_VERIFY_TOP": "0", "ABLITERATE_SEARCH_STARTUP": "2"}
IDS = torch.randint(3, 300, (2, 13), generator=torch.Generator().manual_seed(0))


def one_line_error(res, *fragments: str) -> None:
    assert res.exit_code == 2, res.output
    noise = ("Loading weights", "Writing model shards")  # transformers' own progress bars
    lines = [line for line in res.output.splitlines() if line.strip() and not line.lstrip("\r").startswith(noise)]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    for fragment in fragments:
        assert fragment in " ".join(res.output.split()), res.output


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits.float()


def with_adapter(model_dir: Path, adapter: Path, *, untie: bool = False) -> torch.nn.Module:
    """``base + adapter``; ``untie``: the base given its own LM head first (how the export says to merge)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if untie:
        base.config.tie_word_embeddings = False
        base.get_output_embeddings().weight = torch.nn.Parameter(base.get_input_embeddings().weight.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(adapter)).eval()


def run(model: Path, out: Path, *flags: str) -> Path:
    harmful = model.parent / "harmful.txt"
    with pretend_refusal():
        res = invoke("run", str(model), "--out", str(out), "--harmful", str(harmful), *SMALL, *flags, env=CHEAP)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A searched run (k up to 2, kernels, the embeddings) of a tiny Qwen2 (GQA, tied embeddings) with --adapter."""
    root = tmp_path_factory.mktemp("adapter-run")
    model = root / "model"
    tiny_model("qwen2").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    (root / "harmful.txt").write_text("\n".join(f"{p} (variant {i})" for i in range(3) for p in HARMFUL) + "\n")
    return model, run(model, root / "run", "--trials", "3", "--kl-budget", "100", "--adapter")


def test_export_of_a_run_folder_is_its_written_model(searched, tmp_path):
    model, out = searched
    manifest = read_manifest(out)
    assert manifest["config"]["adapter"] is True and manifest["config"]["search"]["norm_preserving"] == [False]
    assert (out / "model.safetensors").is_file(), "--adapter writes the edited model as usual"
    res = invoke("export", str(out), "--format", "peft", "--out", str(tmp_path / "a"))  # no --model: the run's
    assert res.exit_code == 0, res.output
    exported = read_manifest(tmp_path / "a")
    assert exported["edit"] == json.loads((out / "edit.json").read_text())
    assert exported["config"]["model"] == str(model) and exported["config"]["edit"] == str(out / "edit.json")
    written = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())
    base = logits(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval())
    assert (written - base).abs().max() > 1e-2, "the run edited the model"
    adapted = with_adapter(model, tmp_path / "a")
    assert (logits(adapted) - written).abs().max() < 1e-4
    merged = with_adapter(model, tmp_path / "a", untie=True).merge_and_unload()  # tied: as the export's note says
    assert (logits(merged) - written).abs().max() < 1e-4
    assert "tie_word_embeddings=False" in " ".join(res.output.split())


def test_direction_file_beside_the_edit(searched, tmp_path):
    """Without --edit, a run's direction file exports the edit the run wrote; one direction only on request, with
    a warning that base + adapter is then not the run's model."""
    model, out = searched
    assert invoke("export", str(out), "--format", "peft", "--out", str(tmp_path / "dir")).exit_code == 0
    res = invoke("export", str(out / "directions.safetensors"), "--format", "peft", "--out", str(tmp_path / "file"))
    assert res.exit_code == 0, res.output
    assert "warning:" not in res.output
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("dir", "file"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    res = invoke("export", str(out), "--format", "peft", "--layer", "1", "--out", str(tmp_path / "one"))
    assert res.exit_code == 0, res.output
    assert "warning:" in res.output and "not the edit the run wrote" in " ".join(res.output.split())
    assert read_manifest(tmp_path / "one")["edit"]["direction"]["layer"] == 1
    assert json.loads((tmp_path / "one" / "adapter_config.json").read_text())["r"] == 1


def test_model_override_and_a_missing_base(searched, tmp_path):
    model, out = searched
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    res = invoke("export", str(out), "--format", "peft", "--model", str(copy), "--out", str(tmp_path / "a"))
    assert res.exit_code == 0, res.output
    assert read_manifest(tmp_path / "a")["config"]["model"] == str(copy)
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    manifest = json.loads((moved / MANIFEST).read_text())
    manifest["inputs"]["model"]["path"] = str(tmp_path / "gone")
    (moved / MANIFEST).write_text(json.dumps(manifest))
    target = tmp_path / "b"
    one_line_error(invoke("export", str(moved), "--format", "peft", "--out", str(target)), "is gone", "--model")
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")  # the recorded base, changed
    manifest["inputs"]["model"]["path"] = str(copy)
    (moved / MANIFEST).write_text(json.dumps(manifest))
    one_line_error(invoke("export", str(moved), "--format", "peft", "--out", str(target)), "has changed", "--model")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(out / "directions.safetensors", bare)
    one_line_error(invoke("export", str(bare), "--format", "peft", "--out", str(target)), "needs --model")
    one_line_error(invoke("export", str(tmp_path / "copy"), "--format", "peft", "--out", str(target)), "no directions")
    assert not target.exists() and not list(tmp_path.glob(".b*"))


def test_norm_preserving_run_is_refused_with_the_way_out(searched, tmp_path):
    """The written edit preserves norms (as the default search may pick): no exact adapter, one line naming the
    part and --adapter; and --adapter itself refuses a norm-preserving edit without search before capturing."""
    model, _ = searched
    out = run(model, tmp_path / "norm", "--no-search", "--norm-preserving")
    assert json.loads((out / "edit.json").read_text())["spec"]["norm_preserving"] is True
    target = tmp_path / "a"
    res = invoke("export", str(out), "--format", "peft", "--out", str(target))
    one_line_error(res, "norm-preserving", "neither LoRA nor DoRA", "--adapter")
    assert not target.exists()
    with pretend_refusal():
        res = invoke(
            "run", str(model), "--out", str(tmp_path / "x"), *SMALL, "--no-search", "--norm-preserving", "--adapter"
        )
    one_line_error(res, "--adapter with --no-search --norm-preserving")
    assert "capture" not in res.output and not (tmp_path / "x").exists()
