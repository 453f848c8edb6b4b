"""measure / apply / eval / chat through the CLI on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import invoke
from tiny import HARMLESS, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from abliterate import DirectionSet, load_model, orthogonalize

LOOSE = ("--n-train", "6", "--n-val", "8")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = root / "model"
    tiny_model("llama").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    out = root / "measure"
    res = invoke("measure", str(model), "--out", str(out), *LOOSE, "--position", "-1", "--position", "-2")
    assert res.exit_code == 0, res.output
    return model, out


def test_measure_writes_directions_and_table(measured):
    model, out = measured
    ds = DirectionSet.load(out / "directions.safetensors")
    assert ds.positions == [-1, -2] and ds.vectors.shape[0] == 4
    assert len(ds.meta["harmful_projection"]) == 4
    table = json.loads((out / "candidates.json").read_text())
    assert table["candidates"] and "note" in table
    assert json.loads((out / "abliterate_config.json").read_text())["versions"]["abliterate"]


def test_apply_writes_the_same_model_as_orthogonalize(measured, tmp_path):
    model, out = measured
    res = invoke(
        "apply",
        str(model),
        str(out / "directions.safetensors"),
        "--layer",
        "2",
        "--position",
        "-1",
        "--out",
        str(tmp_path / "edited"),
    )
    assert res.exit_code == 0, res.output
    lm = load_model(model)
    orthogonalize(lm, DirectionSet.load(out / "directions.safetensors")[2, -1])
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32)
    batch = lm.encode(lm.format(HARMLESS[:2]))
    with torch.inference_mode():
        assert (edited(**batch).logits - lm.model(**batch).logits).abs().max() < 1e-5
    again = invoke(
        "apply", str(model), str(out / "directions.safetensors"), "--layer", "2", "--out", str(tmp_path / "edited")
    )
    assert again.exit_code == 2 and "already exists" in again.output


def test_apply_induce_and_runtime_check(measured, tmp_path):
    model, out = measured
    d = str(out / "directions.safetensors")
    res = invoke("apply", str(model), d, "--layer", "1", "--runtime-check", "Say hi")
    assert res.exit_code == 0 and "> Say hi" in res.output
    res = invoke("apply", str(model), d, "--layer", "1", "--mode", "induce", "--out", str(tmp_path / "ind"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ind" / "config.json").is_file()


def test_apply_bad_input(measured, tmp_path):
    model, out = measured
    d = str(out / "directions.safetensors")
    assert "nothing to do" in invoke("apply", str(model), d, "--layer", "1").output
    assert "unknown mode" in invoke("apply", str(model), d, "--mode", "x", "--out", str(tmp_path / "o")).output
    assert "out of range" in invoke("apply", str(model), d, "--layer", "9", "--out", str(tmp_path / "o")).output
    wrong = DirectionSet(torch.randn(4, 1, 32), [-1], "mean_diff")
    wrong.save(tmp_path / "wrong.safetensors")
    res = invoke("apply", str(model), str(tmp_path / "wrong.safetensors"), "--layer", "1", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "hidden size 32" in res.output
    assert not (tmp_path / "o").exists()


def test_eval_json_and_chat_needs_a_tty(measured, tmp_path):
    model, out = measured
    res = invoke(
        "--json",
        "eval",
        str(model),
        "--base",
        str(model),
        "--n-test",
        "2",
        "--max-new-tokens",
        "3",
        "--out",
        str(tmp_path / "m.json"),
    )
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["model"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert json.loads((tmp_path / "m.json").read_text())["base"]["n_harmful"] == 2
    res = invoke("chat", str(model), str(out / "directions.safetensors"), "--layer", "1")
    assert res.exit_code == 2 and "interactive terminal" in res.output


@pytest.mark.parametrize(
    ("exc", "code", "message"),
    [(KeyboardInterrupt(), 130, "interrupted"), (OSError(28, "No space left on device"), 2, "No space left")],
)
def test_interrupt_or_full_disk_while_saving_leaves_nothing(measured, tmp_path, monkeypatch, exc, code, message):
    from transformers import PreTrainedModel

    model, out = measured

    def broken_save(self, path, *a, **k):
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise exc

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken_save)
    res = invoke("apply", str(model), str(out / "directions.safetensors"), "--layer", "1", "--out", str(tmp_path / "o"))
    assert res.exit_code == code and message in res.output
    assert list(tmp_path.iterdir()) == []


def test_apply_stream_equals_in_memory_apply(measured, tmp_path):
    model, out = measured
    d = str(out / "directions.safetensors")
    assert invoke("apply", str(model), d, "--layer", "2", "--out", str(tmp_path / "mem")).exit_code == 0
    res = invoke("apply", str(model), d, "--layer", "2", "--stream", "--out", str(tmp_path / "stream"))
    assert res.exit_code == 0, res.output
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "mem", dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "stream", dtype=torch.float32)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert (x - y).abs().max() < 1e-6, name
    res = invoke("apply", str(model), d, "--layer", "2", "--stream", "--mode", "induce", "--out", str(tmp_path / "x"))
    assert res.exit_code == 2 and "--stream edits weights only" in res.output


def test_export_control_vector(measured, tmp_path):
    import gguf

    model, out = measured
    d = str(out / "directions.safetensors")
    res = invoke("export", d, "--model", str(model), "--out", str(tmp_path / "cv.gguf"), "--layer", "2", "--layer", "3")
    assert res.exit_code == 0, res.output
    reader = gguf.GGUFReader(str(tmp_path / "cv.gguf"))
    assert sorted(t.name for t in reader.tensors) == ["direction.1", "direction.2"]
    assert "already exists" in invoke("export", d, "--model-hint", "llama", "--out", str(tmp_path / "cv.gguf")).output
    assert "exactly one of" in invoke("export", d, "--out", str(tmp_path / "cv2.gguf")).output


def test_chat_in_a_real_terminal_toggles_modes(measured):
    """Drive `abliterate chat` through a pseudo-terminal, as a person would type."""
    import sys

    from terminal import Terminal

    model, out = measured
    args = [str(model), str(out / "directions.safetensors"), "--layer", "1", "--max-new-tokens", "3"]
    with Terminal([sys.executable, "-m", "abliterate.cli", "chat", *args]) as term:
        term.read_until(b"[ablate] you>")
        term.type(b"hello")
        term.read_until(b"[ablate] you>", 60)
        term.type(b"/base")
        term.read_until(b"mode: base")
        term.type(b"/nonsense")
        term.read_until(b"unknown command")
        term.type(b"/quit")
        assert term.proc.wait(timeout=60) == 0
