"""GGUF through the CLI: ``run model.gguf`` writes ``<name>-abliterated.gguf`` (+ gguf.json, Modelfile) beside the
safetensors model; ``apply --stream model.gguf --edit RUN_DIR`` and ``export RUN_DIR --format gguf`` write the same
file without loading the model; bad input is one line, exit code 2, nothing written, the input untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from gguf_tiny import write_tiny_gguf
from test_cli import invoke
from tiny import pretend_refusal
from transformers import AutoModelForCausalLM

from abliterate.checkpoint.gguf_file import read_gguf

SMALL = ("--n-train", "6", "--n-val", "8", "--n-test", "2", "--max-new-tokens", "4", "--no-search")
IDS = torch.tensor([[5, 70, 80, 90, 100, 33, 41, 7]])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(model: Path, out: Path, *flags: str) -> Path:
    with pretend_refusal():
        res = invoke("run", str(model), "--out", str(out), *SMALL, *flags)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def f32_run(tmp_path_factory):
    """A run on the tiny GGUF whose edited tensors are written in F32: the GGUF holds the edit exactly."""
    folder = tmp_path_factory.mktemp("gguf-cli")
    source = write_tiny_gguf(folder / "tiny.gguf")
    return source, run(source, folder / "run", "--gguf-type", "F32")


def first_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits[0]


def test_run_writes_the_gguf_beside_the_model(f32_run):
    source, out = f32_run
    gguf_file = out / "tiny-abliterated.gguf"
    record = json.loads((out / "gguf.json").read_text())
    assert record["sha256"] == sha(gguf_file)
    assert {v["after"] for v in record["edited"].values()} == {"F32"}
    assert record["edited"]["blk.0.ffn_down.weight"]["before"] == "Q6_K"
    manifest = json.loads((out / "manifest.json").read_text())
    assert gguf_file.name in json.dumps(manifest["outputs"]) and record["sha256"] in json.dumps(manifest["outputs"])
    assert (out / "Modelfile").read_text() == "FROM ./tiny-abliterated.gguf\n"
    assert "tiny-abliterated.gguf" in json.loads((out / "metrics.json").read_text())["note"]
    # the pure-Python proof: transformers reads the GGUF back; its logits equal the written safetensors model's
    written = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file.name, dtype=torch.float32)
    torch.testing.assert_close(first_logits(back), first_logits(written), atol=1e-5, rtol=0)
    edit = json.loads(read_gguf(gguf_file).fields["general.abliterate.edit"].contents())
    assert edit == json.loads((out / "edit.json").read_text())


def test_apply_stream_and_export_write_the_runs_gguf_byte_for_byte(f32_run, tmp_path):
    source, out = f32_run
    digest = sha(source)
    res = invoke(
        "apply", "--stream", str(source), "--edit", str(out), "--out", str(tmp_path / "s.gguf"), "--gguf-type", "F32"
    )
    assert res.exit_code == 0, res.output
    assert sha(tmp_path / "s.gguf") == sha(out / "tiny-abliterated.gguf")
    res = invoke("export", str(out), "--format", "gguf", "--out", str(tmp_path / "e.gguf"), "--gguf-type", "F32")
    assert res.exit_code == 0, res.output
    assert sha(tmp_path / "e.gguf") == sha(out / "tiny-abliterated.gguf")
    res = invoke("export", str(out), "--format", "gguf", "--out", str(tmp_path / "q.gguf"))  # auto: Q8_0 for Q6_K
    assert res.exit_code == 0, res.output
    types = {t.name: t.tensor_type.name for t in read_gguf(tmp_path / "q.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.0.attn_output.weight"] == "Q5_0"
    assert sha(source) == digest


def test_no_gguf_writes_none(tmp_path):
    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = run(source, tmp_path / "run", "--no-gguf")
    assert not list(out.glob("*.gguf")) and not (out / "Modelfile").exists()
    assert (out / "model.safetensors").is_file()


def test_bad_input_is_one_line_exit_2_and_writes_nothing(f32_run, tmp_path):
    source, out = f32_run
    digest = sha(source)
    other = write_tiny_gguf(tmp_path / "three.gguf", layers=4)
    cases = {
        "residual points": ("apply", "--stream", str(other), "--edit", str(out), "--out", str(tmp_path / "x.gguf")),
        "is the input GGUF": ("apply", "--stream", str(source), "--edit", str(out), "--out", str(source), "--force"),
        "unknown --gguf-type": (
            "export",
            str(out),
            "--format",
            "gguf",
            "--out",
            str(tmp_path / "x.gguf"),
            "--gguf-type",
            "Q6_K",
        ),
    }
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(source.read_bytes()[:-1000])
    cases["truncated"] = ("apply", "--stream", str(truncated), "--edit", str(out), "--out", str(tmp_path / "x.gguf"))
    for message, args in cases.items():
        res = invoke(*args)
        assert res.exit_code == 2, (message, res.output)
        assert message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".*partial*"))
    assert sha(source) == digest


def test_apply_without_directions_or_run_folder_is_one_line(tmp_path):
    res = invoke("apply", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "no directions" in res.output, res.output
    assert not (tmp_path / "o").exists()
