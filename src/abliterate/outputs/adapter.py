"""An ablation as a PEFT LoRA adapter: small, loadable next to the base model, revertible.

Removing ``s`` times the component along a ``[k, hidden]`` basis ``U`` from everything a writer writes changes its
weight by a rank-``k`` update, ``W' = W + B A`` with ``A = U W`` and ``B = -s U^T`` (``W`` read as ``[hidden, in]``),
so the edit *is* a LoRA adapter of rank ``k`` with ``lora_alpha = r`` (scaling 1):

* Linear writers (``o_proj``, ``down_proj``...) and GPT-2's ``Conv1D`` (``fan_in_fan_out``) are LoRA ``target_modules``;
* fused MoE experts (one 3-D parameter) are LoRA ``target_parameters`` (one ``A_e = U W_e`` per expert, same ``B``);
* embeddings (token and learned position) are LoRA embedding targets (``A = U E^T``, ``B = -s U^T``);
* writer biases (``b' = b - s U^T U b``) ride on PEFT's ``lora_bias`` (a bias on ``lora_B``), which PEFT allows
  only when every target is a Linear/Conv1D layer with a bias of its own.

What PEFT cannot carry exactly is refused with one line: norm-preserving edits (a per-input-unit rescaling, full rank;
DoRA's magnitude rescales output features, the other axis: see :func:`check_spec`), biased writers next to embedding
or expert targets, biased fused experts, quantized or offloaded weights. With tied input/output embeddings
the adapter is exact as loaded; :func:`adapter_notes` says how to merge it (PEFT merges into the shared weight).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abliterate.arch.anatomy import Writer
from abliterate.edit.plan import AppliedEdit, EditPlan, WriterEdit
from abliterate.edit.spec import EditSpec
from abliterate.errors import AbliterateError
from abliterate.lm.model import LoadedModel
from abliterate.lm.saving import atomic_directory, check_output
from abliterate.ops.kernel import tied_embeddings
from abliterate.ops.placement import is_offloaded

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's key prefix of a causal LM's modules


class AdapterError(AbliterateError):
    """The edit has no exact LoRA form, or the adapter cannot be written."""


@dataclass
class _Target:
    kind: str  # "linear", "conv1d", "embedding" or "experts"
    name: str  # the module (for experts: the parameter's full name)
    edit: WriterEdit


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise AdapterError(
            "PEFT is not installed, so no adapter can be written; pip install 'abliterate[adapter]' (peft>=0.19)"
        ) from exc
    return peft


def _kind(w: Writer) -> str:
    if w.is_bias:
        raise AdapterError(
            f"{w.name} is a bias added to the residual outside any Linear layer, which a LoRA adapter cannot change; "
            "write the full weights"
        )
    if w.weight.dim() == 3:
        return "experts"
    if w.layer is None:
        if not isinstance(w.module, nn.Embedding):
            raise AdapterError(f"{w.name} is a {type(w.module).__name__}, not an nn.Embedding; PEFT cannot adapt it")
        return "embedding"
    if isinstance(w.module, nn.Linear):
        return "linear"
    if type(w.module).__name__ == "Conv1D":
        return "conv1d"
    raise AdapterError(f"{w.name} is a {type(w.module).__name__}; PEFT's LoRA adapts Linear, Conv1D and Embedding")


def check_spec(spec: EditSpec) -> None:
    """Refuse, before any work, an edit spec that no adapter can hold: a norm-preserving one. It rescales each
    *input* unit's output vector (every token's embedding row; every input column of a Linear writer) by its own
    factor, a full-rank change; DoRA's magnitude rescales *output* features instead (the rows of a Linear's
    ``W + BA``; the hidden columns of an embedding), so neither LoRA nor DoRA holds it exactly."""
    if spec.norm_preserving:
        raise AdapterError(
            "the edit is norm-preserving: it rescales each input unit of every edited writer (each token's embedding "
            "row, each input column of the others), a full-rank change that neither LoRA nor DoRA (which rescales "
            "output features) holds exactly; run with --adapter to keep the search to edits an adapter holds, "
            "or share the full weights"
        )


def _bias_conflict(targets: list[_Target]) -> str | None:
    """Why the writer biases of ``targets`` cannot ride on PEFT's ``lora_bias`` (None when they can, or there are
    none): it is one setting for every target and exists only for Linear/Conv1D layers with a bias."""
    biased = [t for t in targets if t.edit.writer.bias is not None]
    if not biased:
        return None
    if any(t.kind == "experts" for t in biased):
        return (
            f"{biased[0].name} has a bias next to its fused expert weights, and PEFT's expert LoRA has no bias, "
            "so this edit has no exact adapter"
        )
    other = next((t for t in targets if t.edit.writer.bias is None), None)
    if other is None:
        return None
    return (
        f"the edit changes the bias of {biased[0].name}, which needs PEFT's lora_bias, but PEFT applies it to every "
        f"target and {other.name} ({other.kind}) cannot take one"
    )


def _inner_norm(writers: list[Writer]) -> str | None:
    """An embedding whose module normalizes its own lookup: PEFT adds the LoRA update after that norm."""
    inner = next((w for w in writers if w.hook_input), None)
    if inner is None:
        return None
    return (
        f"{inner.name} normalizes its lookup inside the module, and PEFT adds a LoRA update to the module's output, "
        "after that norm, so the embedding edit has no exact adapter"
    )


def _targets(lm: LoadedModel, plan: EditPlan) -> list[_Target]:
    """The plan's writers as LoRA targets, after every check that can refuse the export."""
    if not plan.edits:
        raise AdapterError("the plan edits nothing, so there is no adapter to write; build a plan with some edit")
    check_spec(EditSpec(norm_preserving=plan.norm_preserving))
    for e in plan.edits:
        w = e.writer
        if lm.quantized or not w.weight.dtype.is_floating_point:
            raise AdapterError(
                "the model is loaded quantized, so the adapter's A = U W cannot be read off its weights exactly; "
                "load it unquantized to export the adapter"
            )
        if is_offloaded(w.module) or w.weight.device.type == "meta":
            raise AdapterError(
                f"{w.name} is offloaded by device_map, so its weight is not in memory; load the model without "
                "offload to export the adapter (it is small), or write the full weights with apply --stream"
            )
    targets = [_Target(_kind(e.writer), e.writer.name, e) for e in plan.edits]
    if len({t.name for t in targets}) != len(targets):
        raise AdapterError("the plan edits one writer twice; LoRA has one update per module, so merge the edits first")
    conflict = _bias_conflict(targets) or _inner_norm([e.writer for e in plan.edits])
    if conflict:
        raise AdapterError(
            f"{conflict}; export an edit without the embeddings (embedding scale 0), or write the full weights"
        )
    _check_kinds(targets)
    return targets


def _check_kinds(targets: list[_Target]) -> None:
    two_d = {t.kind for t in targets if t.kind in ("linear", "conv1d")}
    if len(two_d) > 1:
        raise AdapterError(
            "the edited writers mix Linear and Conv1D layers, and PEFT's fan_in_fan_out is one setting for all "
            "targets; write the full weights instead"
        )


@torch.no_grad()
def _factors(t: _Target, r: int) -> Iterator[tuple[str, torch.Tensor]]:
    """PEFT's state-dict entries for one target: ``A = U W`` and ``B = -s U^T``, padded with zeros to rank ``r``."""
    w, u, s = t.edit.writer, t.edit.basis.detach().double().cpu(), t.edit.scale
    pad = r - u.shape[0]
    weight = w.weight.detach().double().cpu()
    if t.kind == "experts":
        # [experts, hidden, in] (or [experts, in, hidden] when the module is transposed)
        per_expert = weight if w.out_axis == 1 else weight.transpose(1, 2)
        a = torch.einsum("kh,ehi->eki", u, per_expert)  # [experts, k, in]
        a = torch.cat([a, a.new_zeros(a.shape[0], pad, a.shape[2])], dim=1).reshape(-1, a.shape[2])
        b = torch.cat([-s * u.T, u.new_zeros(u.shape[1], pad)], dim=1)  # [hidden, r]
        experts = weight.shape[0]
        # PEFT reads lora_B as [out, r, experts]: column j * experts + e is rank j of expert e
        b = b[:, :, None].expand(-1, -1, experts).reshape(b.shape[0], -1)
        base = PREFIX + w.name.rsplit(".", 1)[0]
        yield f"{base}.lora_A.weight", a
        yield f"{base}.lora_B.weight", b
        return
    matrix = weight if w.out_axis == 0 else weight.T  # [hidden, in]; an embedding's "in" is its vocabulary
    a = torch.cat([u @ matrix, matrix.new_zeros(pad, matrix.shape[1])])  # [r, in]
    b = torch.cat([-s * u.T, u.new_zeros(u.shape[1], pad)], dim=1)  # [hidden, r]
    base = PREFIX + t.name
    if t.kind == "embedding":
        yield f"{base}.lora_embedding_A", a
        yield f"{base}.lora_embedding_B", b
        return
    yield f"{base}.lora_A.weight", a
    yield f"{base}.lora_B.weight", b
    if w.bias is not None:
        bias = w.bias_tensor.detach().double().cpu()
        yield f"{base}.lora_B.bias", -s * (u.T @ (u @ bias))


@dataclass
class Adapter:
    """An edit in PEFT's form, read off the weights it edits: take it *before* the edit is applied (``A = U W``
    needs the original ``W``). ``config``: LoraConfig keyword arguments; ``tensors``: float32, PEFT's key naming."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    notes: list[str]

    @classmethod
    def of(cls, lm: LoadedModel, plan: EditPlan) -> Adapter:
        """The adapter of ``plan`` applied to ``lm``'s current weights; :class:`AdapterError` when it has no exact
        LoRA form (or PEFT is missing)."""
        _peft()
        targets = _targets(lm, plan)
        r = max(t.edit.basis.shape[0] for t in targets)
        tensors = {k: v.float().contiguous() for t in targets for k, v in _factors(t, r)}
        config = {
            "r": r,
            "lora_alpha": r,
            "lora_dropout": 0.0,
            "bias": "none",
            "lora_bias": any(t.edit.writer.bias is not None for t in targets),
            "fan_in_fan_out": any(t.kind == "conv1d" for t in targets),
            "target_modules": sorted(t.name for t in targets if t.kind != "experts"),
            "target_parameters": sorted(t.name for t in targets if t.kind == "experts") or None,
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(lm.local_path or lm.source),
        }
        return cls(config, tensors, adapter_notes(lm, plan))

    def write(self, folder: str | Path) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into the existing ``folder``."""
        from safetensors.torch import save_file

        config = _peft().LoraConfig(**self.config)
        config.inference_mode = True
        config.save_pretrained(str(folder))
        save_file(self.tensors, str(Path(folder) / WEIGHTS_FILE), metadata={"format": "pt"})


def adapter_notes(lm: LoadedModel, plan: EditPlan) -> list[str]:
    """What a user of the adapter should know beyond "load it": today, how to merge it on a model with tied
    input/output embeddings (PEFT would merge the embedding update into the shared LM head too)."""
    if tied_embeddings(lm.model) and any(e.writer.layer is None and e.scale for e in plan.edits):
        return [
            "the base ties its input and output embeddings: the adapter is exact as loaded, but merge_and_unload "
            "would also change the LM head; to merge, load the base with tie_word_embeddings=False and the LM head "
            "set to a copy of the embeddings (as PEFT's warning shows), or use the full-weights output"
        ]
    return []


def export_adapter(lm: LoadedModel, plan: EditPlan, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``plan`` (applied to ``lm``'s current weights) as a PEFT LoRA adapter folder: ``adapter_config.json`` and
    ``adapter_model.safetensors``, which ``peft.PeftModel.from_pretrained(base, out_dir)`` loads. Atomic: on any error
    nothing is written. Raises :class:`AdapterError` (one line) when the edit has no exact LoRA form."""
    target = check_output(out_dir, overwrite=overwrite, inputs=(lm.local_path,))
    adapter = Adapter.of(lm, plan)
    with atomic_directory(target) as tmp:
        adapter.write(tmp)
    return target


def adapter_search_limits(
    lm: LoadedModel, *, norm_preserving: bool, search: bool, flag: str = "--as-adapter", weights: bool = False
) -> bool:
    """``run --as-adapter`` (or ``--adapter``: ``flag``), right after loading: refuse what no adapter of this model
    can hold, before the long part. ``norm_preserving``/``search``: the run's settings; ``weights``: the run writes
    the edited weights too (``--adapter``), which a quantized or offloaded model gets from its checkpoint, so only
    ``--as-adapter`` refuses it. Returns whether the search may still edit the embeddings (not where writer biases
    need PEFT's lora_bias); it never preserves norms."""
    lm.anatomy.require_weights()
    if (lm.quantized or lm.offloaded) and not weights:
        raise AdapterError(
            f"{flag} reads the adapter off the weights, but {lm.source} is loaded "
            f"{'quantized' if lm.quantized else 'offloaded by device_map'}; load it plainly (the adapter is small)"
        )
    if norm_preserving and not search:
        raise AdapterError(
            f"{flag} with --no-search --norm-preserving: a norm-preserving edit rescales each input unit of every "
            "writer, which neither LoRA nor DoRA holds exactly; drop --norm-preserving (or the search keeps to edits "
            "an adapter holds)"
        )
    probe = torch.zeros(1, lm.hidden_size)
    writers = [_Target(_kind(w), w.name, WriterEdit(w, probe, 1.0)) for w in lm.anatomy.all_writers()]
    conflict = _bias_conflict(writers)
    if conflict:
        raise AdapterError(f"{conflict}; drop {flag} to write the full weights")
    _check_kinds(writers)
    embeddings = [_Target(_kind(w), w.name, WriterEdit(w, probe, 1.0)) for w in lm.anatomy.embeddings]
    conflict = _bias_conflict(writers + embeddings) or _inner_norm(lm.anatomy.embeddings)
    if conflict and not search:
        raise AdapterError(
            f"{conflict}; --no-search edits the embeddings: use the search with {flag} (it then leaves them "
            f"alone), or drop {flag}"
        )
    return not conflict


def write_run_adapter(folder: Path, lm: LoadedModel, edit: AppliedEdit) -> list[str]:
    """``run --as-adapter``'s save step: revert the run's weight edit (exactly, leaving ``lm`` unedited), read the
    adapter of its plan off the original weights and write it into ``folder``; returns the notes for the user."""
    edit.revert()
    adapter = Adapter.of(lm, edit.plan)
    adapter.write(folder)
    return adapter.notes
