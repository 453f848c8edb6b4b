"""PEFT LoRA export: base + adapter equals the orthogonalized model, merging equals the weight edit, and every edit
PEFT cannot carry exactly is refused with one line and nothing written."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from tiny import tiny_lm, tiny_model

from abliterate import DirectionSet, load_model
from abliterate.edit.direction_edit import edit_plan
from abliterate.edit.plan import Directions, EditPlan, apply_plan, build_plan
from abliterate.edit.spec import FLAT, EditSpec, Kernel
from abliterate.errors import OutputError
from abliterate.outputs.adapter import CONFIG_FILE, WEIGHTS_FILE, AdapterError, adapter_notes, export_adapter

peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'abliterate[adapter]')")

IDS = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))


def random_directions(lm, seed: int = 0) -> Directions:
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(lm.num_layers + 1, 1, lm.hidden_size, generator=g)
    return Directions.from_sets(DirectionSet(vectors, [-1], "mean_diff"))


def spec(embedding: float, k: int = 2) -> EditSpec:
    """Two directions per layer, a tent on attention and a flat 0.9 on the MLPs: every writer its own basis/scale."""
    return EditSpec(k=k, attn=Kernel(1.0, 1.2, 0.3, 1.5), mlp=Kernel(0.0, 0.9, 0.9, math.inf), embedding=embedding)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits.float()


def load_adapter(family: str, folder, *, untie: bool = False) -> torch.nn.Module:
    """``base + adapter``; ``untie``: the base given its own LM head first (how to merge on tied embeddings)."""
    base = tiny_model(family)
    if untie:
        base.config.tie_word_embeddings = False
        head, emb = base.get_output_embeddings(), base.get_input_embeddings()
        head.weight = torch.nn.Parameter(emb.weight.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(folder)).eval()


# mistral/qwen2_moe/gemma2 edit the embeddings too (gemma2's are scaled; qwen2_moe has fused experts and a shared
# expert); gpt2 (Conv1D) and gpt_neox carry writer biases, which PEFT's lora_bias holds only without embeddings
CASES = [("mistral", 0.7), ("qwen2_moe", 0.5), ("gemma2", 1.0), ("gpt2", 0.0), ("gpt_neox", 0.0), ("phi3", 1.0)]


@pytest.mark.parametrize(("family", "embedding"), CASES)
def test_adapter_equals_weight_edit(family, embedding, tmp_path):
    lm = tiny_lm(family)
    plan = build_plan(lm, spec(embedding), random_directions(lm))
    base_logits = logits(lm.model)
    notes = adapter_notes(lm, plan)
    out = export_adapter(lm, plan, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 2 and config["peft_type"] == "LORA"
    assert config["lora_bias"] is (family in ("gpt2", "gpt_neox"))
    adapted = load_adapter(family, out)
    with_adapter = logits(adapted)
    apply_plan(lm, plan, mode="weights")
    edited = logits(lm.model)
    assert (with_adapter - edited).abs().max() < 1e-4
    assert (with_adapter - base_logits).abs().max() > 1e-2  # the adapter does something
    with adapted.disable_adapter():
        assert (logits(adapted) - base_logits).abs().max() < 1e-5  # and is revertible
    if notes:  # gemma2 ties its embeddings: merge on an untied base, as the note says
        assert family == "gemma2"
        adapted = load_adapter(family, out, untie=True)
    merged = adapted.merge_and_unload().state_dict()
    want = lm.model.state_dict()
    assert merged.keys() == want.keys()
    for name, tensor in want.items():
        assert (merged[name] - tensor).abs().max() < 1e-5, name


def test_tied_embeddings_exact_as_loaded_and_merge_after_untying(tmp_path):
    lm = tiny_lm("llama")  # ties its embeddings to the LM head
    plan = edit_plan(
        lm, torch.randn(2, lm.hidden_size, generator=torch.Generator().manual_seed(1)), None, 0.8, True, 0.5
    )
    notes = adapter_notes(lm, plan)
    assert len(notes) == 1 and "tie_word_embeddings=False" in notes[0]
    out = export_adapter(lm, plan, tmp_path / "adapter")
    with_adapter = logits(load_adapter("llama", out))
    apply_plan(lm, plan, mode="weights")
    assert (with_adapter - logits(lm.model)).abs().max() < 1e-4
    # merged into the tied base, the embedding update lands in the LM head too: not the weight edit
    merged_tied = load_adapter("llama", out).merge_and_unload()
    assert (logits(merged_tied) - logits(lm.model)).abs().max() > 1e-3
    # the note's recipe: an untied base (LM head = a copy of the embeddings), then merge_and_unload
    merged = load_adapter("llama", out, untie=True).merge_and_unload()
    assert (logits(merged) - logits(lm.model)).abs().max() < 1e-4
    assert adapter_notes(lm, edit_plan(lm, torch.randn(lm.hidden_size), None, 1.0, False, None)) == []


def test_single_direction_plan_has_rank_one(tmp_path):
    lm = tiny_lm("qwen3")
    plan = edit_plan(
        lm, torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(2)), [1, 2], 1.0, False, None
    )
    out = export_adapter(lm, plan, tmp_path / "a")
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["r"] == 1
    assert sorted(config["target_modules"]) == sorted(e.writer.name for e in plan.edits)
    with_adapter = logits(load_adapter("qwen3", out))
    apply_plan(lm, plan, mode="weights")
    assert (with_adapter - logits(lm.model)).abs().max() < 1e-4


# --- what has no exact LoRA form: one line each, nothing written ---------------------------------------------


def refused(lm, plan, tmp_path, *fragments: str) -> None:
    out = tmp_path / "refused"
    with pytest.raises(AdapterError) as info:
        export_adapter(lm, plan, out)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists() and not list(tmp_path.glob(".refused*"))


def test_norm_preserving_is_refused(tmp_path):
    lm = tiny_lm("llama")
    plan = build_plan(lm, EditSpec.full(1, norm_preserving=True), random_directions(lm))
    refused(lm, plan, tmp_path, "norm-preserving", "neither LoRA nor DoRA", "--adapter")


def test_biases_with_embeddings_are_refused(tmp_path):
    lm = tiny_lm("gpt2")
    plan = build_plan(lm, spec(1.0), random_directions(lm))
    refused(lm, plan, tmp_path, "bias of transformer.h.0.attn.c_proj", "lora_bias", "transformer.wte", "embedding")


def test_empty_plan_and_existing_output_are_refused(tmp_path):
    lm = tiny_lm("llama")
    refused(lm, EditPlan([]), tmp_path, "edits nothing")
    plan = build_plan(lm, EditSpec(mlp=FLAT), random_directions(lm))
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        export_adapter(lm, plan, tmp_path / "taken")
    assert export_adapter(lm, plan, tmp_path / "taken", overwrite=True) == (tmp_path / "taken").resolve()


def test_offloaded_model_is_refused(tmp_path):
    from test_loading import write_model
    from test_offload import split_map

    src = tmp_path / "model"
    write_model(src, "llama")
    plain = load_model(src)
    lm = load_model(src, device_map=split_map(plain, {1, 2}), offload_folder=tmp_path / "offload")
    plan = edit_plan(lm, torch.randn(lm.hidden_size), None, 1.0, False, None)
    refused(lm, plan, tmp_path, "offloaded by device_map", "without offload")
    from abliterate.run.config import RunConfig
    from abliterate.run.pipeline import restrict_run

    with pytest.raises(AdapterError, match="--as-adapter .* offloaded by device_map"):
        restrict_run(RunConfig(as_adapter=True), lm)
    # --adapter writes the edited weights (from the checkpoint) and exports later from a plain load: not refused
    assert restrict_run(RunConfig(adapter=True), lm).search.norm_preserving == [False]


def test_quantized_model_is_refused(tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from test_offload import write_quantizable

    src = tmp_path / "model"
    write_quantizable(src)
    lm = load_model(src, quantize="8bit")
    plan = edit_plan(lm, torch.randn(lm.hidden_size), [0], 1.0, False, None)
    refused(lm, plan, tmp_path, "quantized", "unquantized")


def test_missing_peft_is_one_line(tmp_path, monkeypatch):
    import sys

    lm = tiny_lm("llama")
    plan = edit_plan(lm, torch.randn(lm.hidden_size), [0], 1.0, False, None)
    monkeypatch.setitem(sys.modules, "peft", None)
    refused(lm, plan, tmp_path, "PEFT is not installed", "abliterate[adapter]")


def test_restrict_run_keeps_the_search_to_exportable_edits():
    from abliterate.run.config import RunConfig
    from abliterate.run.pipeline import restrict_run

    original = RunConfig()
    cfg = restrict_run(original, tiny_lm("llama"))
    assert cfg.search.norm_preserving == [False] and cfg.search.embedding is True
    assert original.search.norm_preserving != [False], "the caller's config is left as it was"
    cfg = restrict_run(RunConfig(), tiny_lm("gpt2"))  # writer biases: lora_bias, so no embedding edit
    assert cfg.search.norm_preserving == [False] and cfg.search.embedding is False
    cfg = RunConfig(norm_preserving=True)
    cfg.search.enabled = False
    with pytest.raises(AdapterError, match="norm-preserving"):
        restrict_run(cfg, tiny_lm("llama"))
