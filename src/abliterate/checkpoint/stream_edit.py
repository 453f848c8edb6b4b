"""Streaming weight edit: orthogonalize a safetensors checkpoint on disk, shard by shard, without loading it.

The module tree is built on the meta device from ``config.json``; :func:`abliterate.arch.find_anatomy` names the
residual writers, and transformers' own checkpoint conversion mapping (the one ``from_pretrained`` applies)
ties each writer parameter to its checkpoint tensors, e.g. the fused 3-D ``mlp.experts.down_proj`` to the
per-expert ``mlp.experts.<e>.down_proj.weight`` (Mixtral: ``block_sparse_moe.experts.<e>.w2.weight``).
Each output shard is its input with the writers' bytes replaced: the header and the tensors between writers
are copied in the kernel (``copy_file_range``) by a background thread, while the calling thread reads each
writer in row blocks with plain reads (a Linear weight twice: once to sum ``U W``, once to write), edits it in
float32, casts it back to its stored dtype and writes it at its offset. Peak memory is a 16 MiB float32 work
buffer and one block of stored bytes, not a tensor, let alone a shard; file names, key names and the index
stay as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abliterate.arch.anatomy import Writer, find_anatomy
from abliterate.arch.miniature import check_on_miniature
from abliterate.arch.projection import Scale
from abliterate.checkpoint.shard_edit import ShardEdit, write_shard
from abliterate.checkpoint.shards import (
    FLOAT_DTYPES,
    INDEX,
    Workspace,
    find_shards,
    free_space,
    read_shard,
)
from abliterate.edit.direction_edit import DirectionEdit
from abliterate.edit.plan import Directions, EditPlan, plan_of
from abliterate.edit.spec import EditSpec
from abliterate.errors import ArchitectureError, ModelLoadError, OutputError
from abliterate.lm.model import LoadedModel, Progress
from abliterate.lm.saving import atomic_directory, check_output
from abliterate.measure.directions import Direction

# Weights in other formats are not copied: an unedited duplicate of the model would be a trap.
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".safetensors", ".index.json")
NO_STREAM = "dequantize first, or load through transformers (abliterate apply without --stream)"
Sources = Mapping[str, list[tuple[str, list[Any]]]]  # model parameter -> [(checkpoint key, conversion ops)]


@dataclass
class StreamReport:
    """What a streaming edit did: ``edited`` checkpoint tensors, ``copied`` non-weight files, ``skipped`` weight
    files in other formats left out of the output, and the bytes of safetensors written."""

    out_dir: Path
    edited: list[str]
    untied: bool
    shards: list[str]
    copied: list[str]
    skipped: list[str]
    bytes_written: int
    seconds: float = 0.0


def _meta_model(src: Path, trust_remote_code: bool) -> tuple[nn.Module, dict[str, Any]]:
    """The module tree on the meta device, tied like the real model, and the raw ``config.json``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (src / "config.json").is_file():
        raise ModelLoadError(f"{src} has no config.json: it is not a transformers model directory")
    raw = json.loads((src / "config.json").read_text())
    for quant in (raw.get("quantization_config"), (raw.get("text_config") or {}).get("quantization_config")):
        if quant:
            method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
            raise ModelLoadError(f"{src} is a quantized checkpoint ({method}); {NO_STREAM}")
    try:
        config = AutoConfig.from_pretrained(str(src), trust_remote_code=trust_remote_code)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelLoadError(
            f"cannot build a causal LM from {src / 'config.json'}: {str(exc).splitlines()[0]}"
        ) from exc
    model.tie_weights()  # init_empty_weights re-creates parameters, which drops the tie
    return model.eval(), raw


def _sources(model: nn.Module, keys: Sequence[str]) -> dict[str, list[tuple[str, list[Any]]]]:
    """Model parameter name -> [(checkpoint key, conversion ops)], by the rules ``from_pretrained`` applies
    (renamings, per-expert -> fused converters, a missing or extra base-model prefix)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta, prefix = model.state_dict(), model.base_model_prefix
    out: dict[str, list[tuple[str, list[Any]]]] = defaultdict(list)
    for key in sorted(keys, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if target not in meta and key in meta:
            target, pattern = rename_source_key(key, [], [], prefix, meta)
        out[target].append((key, list(by_pattern[pattern].operations) if pattern else []))
    return out


def _source_axis(ops: list[Any], axis: int, src: tuple[int, ...], target: tuple[int, ...], name: str) -> int:
    """The axis of a checkpoint tensor that becomes ``axis`` of the model parameter after ``ops``."""
    labels: list[int | None] = list(range(len(src)))
    shape: list[int | None] = list(src)
    for op in ops:
        kind = type(op).__name__
        if kind == "MergeModulelist":  # per-expert tensors stacked along op.dim
            labels.insert(op.dim, None)
            shape.insert(op.dim, target[op.dim] if op.dim < len(target) else None)
        elif kind == "Transpose":
            d0, d1 = op.dim0 % len(labels), op.dim1 % len(labels)
            if not (op.check_dims and tuple(shape) == target):
                labels[d0], labels[d1], shape[d0], shape[d1] = labels[d1], labels[d0], shape[d1], shape[d0]
        elif kind == "Concatenate":
            shape[op.dim] = None
        else:
            raise ArchitectureError(f"{name} is stored through a {kind} conversion; load through transformers")
    if len(labels) != len(target) or (found := labels[axis]) is None:
        raise ArchitectureError(f"cannot find the residual axis of {name}; load through transformers instead")
    return found


def _module_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def _materialize_post_norms(model: nn.Module, writers: list[Writer], sources: Sources, where: Mapping) -> None:
    """Give each post-norm (Gemma 2/3, OLMo 2) its real weights, in float32, so that its gain can be probed."""
    for norm in {id(w.post_norm): w.post_norm for w in writers if w.post_norm is not None}.values():
        prefix, values = _module_name(model, norm), {}
        for pname, param in norm.named_parameters():
            found = [key for key, ops in sources.get(f"{prefix}.{pname}", []) if not ops]
            shard, entry = where[found[0]] if len(found) == 1 else (None, None)
            if shard is None or entry.dtype not in FLOAT_DTYPES or entry.shape != tuple(param.shape):
                raise ArchitectureError(
                    f"no float tensor for {prefix}.{pname} in the checkpoint; config.json disagrees"
                )
            with open(shard.path, "rb", buffering=0) as fin:
                values[pname] = Workspace(0).read(fin, entry)[1].float().clone()
        norm.load_state_dict(values, strict=False, assign=True)


def _plan_edits(plan: EditPlan, sources: Sources, where: Mapping, hidden: int) -> dict[str, ShardEdit]:
    """Checkpoint key -> edit, with the dtype and shape of every writer tensor checked."""
    edits: dict[str, ShardEdit] = {}
    for e in plan.edits:
        writer, basis, s = e.writer, e.basis, e.scale
        owner = writer.name if writer.param == "weight" else writer.name.rsplit(".", 1)[0]
        for attr, is_bias in ((writer.param, False), (writer.bias, True)):
            if attr is None:
                continue
            pname, target = f"{owner}.{attr}", tuple(getattr(writer.module, attr).shape)
            if not (found := sources.get(pname, [])):
                raise ArchitectureError(f"the checkpoint has no tensor for {pname}; config.json and weights disagree")
            for key, ops in found:
                entry = where[key][1]
                if entry.dtype not in FLOAT_DTYPES:
                    raise ModelLoadError(f"{key} is stored as {entry.dtype}, not a float type; {NO_STREAM}")
                constant = is_bias or len(target) == 1  # a bias, or a constant writer (1-D)
                axis = None if constant else _source_axis(ops, writer.out_axis, entry.shape, target, key)
                if entry.shape[-1 if axis is None else axis] != hidden or (not ops and entry.shape != target):
                    raise ArchitectureError(
                        f"{key} has shape {list(entry.shape)}, which does not fit {pname} {list(target)} "
                        f"of this config.json (hidden size {hidden}); config and weights disagree"
                    )
                edits[key] = ShardEdit(axis, basis, s, plan.norm_preserving and axis is not None)
    return edits


def _untie(model: nn.Module, plan: EditPlan, sources: Sources, where: Mapping) -> tuple[bool, dict[str, list]]:
    """Whether the LM head must be untied, and the copy of the original embedding to append as the LM head
    (named as ``save_pretrained`` names it), unless the checkpoint already stores one: {shard: [(key, entry)]}."""
    from transformers.core_model_loading import revert_weight_conversion

    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or out.weight is not emb.weight or not any(e.writer.layer is None for e in plan.edits):
        return False, {}
    renamed = list(revert_weight_conversion(model, {f"{_module_name(model, out)}.weight": out.weight}))
    key = renamed[0] if len(renamed) == 1 else f"{_module_name(model, out)}.weight"
    if key in where:
        return True, {}
    shard, entry = where[sources[f"{_module_name(model, emb)}.weight"][0][0]]
    return True, {shard.path.name: [(key, entry)]}


def _write_rest(src: Path, tmp: Path, index: dict | None, extra: dict, config: dict | None) -> tuple[list, list]:
    """Write the index (with the LM head copy, if any) and copy every non-weight file (``config.json`` rewritten
    untied when ``config`` is given); weight files in other formats are left out. Returns (copied, skipped)."""
    if index is not None:
        index = json.loads(json.dumps(index))
        for shard_name, items in extra.items():
            for key, entry in items:
                index["weight_map"][key] = shard_name
                if isinstance(index.get("metadata", {}).get("total_size"), int):
                    index["metadata"]["total_size"] += entry.end - entry.start
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    copied, skipped = [], []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or (tmp / rel).exists():
            continue
        if path.name.endswith(OTHER_WEIGHTS):
            skipped.append(str(rel))
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        if config is not None and rel == Path("config.json"):
            config["tie_word_embeddings"] = False
            if isinstance(config.get("text_config"), dict):
                config["text_config"]["tie_word_embeddings"] = False
            (tmp / rel).write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(path, tmp / rel)
        copied.append(str(rel))
    return copied, skipped


def stream_orthogonalize(
    src_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    direction: Direction | torch.Tensor,
    *,
    layers: Sequence[int] | None = None,
    scale: Scale = 1.0,
    embeddings: bool | None = None,
    embedding_scale: float | None = None,
    norm_preserving: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    trust_remote_code: bool = False,
    layers_path: str | None = None,
    writer_patterns: Sequence[str] | None = None,
    verify: bool = True,
) -> StreamReport:
    """Orthogonalize the safetensors checkpoint in ``src_dir`` against ``direction`` into ``out_dir``.

    Arguments mean what they mean for :func:`abliterate.orthogonalize`, and the output equals loading the
    model in float32, orthogonalizing it and saving it in the stored dtype; but memory stays at a 16 MiB
    work buffer and one row block, and the input's shard names, index and key names are kept. Tied
    embeddings, when the embedding is edited, are untied as :func:`abliterate.edit.untie_embeddings` does: an
    ``lm_head`` copy of the original embedding is appended to the embedding's shard and
    ``tie_word_embeddings`` is set false in ``config.json``. Every non-weight file is copied. The output is
    written to a temporary sibling directory renamed into place at the end, so a failed or killed run never
    leaves a partial ``out_dir`` (a killed run may leave the hidden ``.<out_dir>.tmp-*`` sibling, which the
    next write to ``out_dir`` removes). ``progress(bytes_done, bytes_total)`` follows each shard.

    No forward pass runs on the checkpoint, so the writers the name patterns find are checked (``verify``, on by
    default) on a miniature of the same architecture: the config with its widths shrunk, every layer and flag kept
    (:func:`abliterate.arch.miniature.check_on_miniature`). An architecture refused there (a post-LN residual, ...) or
    whose miniature cannot be built is refused in one line; ``verify=False`` edits by the patterns alone.
    """
    return stream_edit(
        src_dir,
        out_dir,
        DirectionEdit(direction, layers, scale, embeddings, embedding_scale, norm_preserving),
        overwrite=overwrite,
        progress=progress,
        trust_remote_code=trust_remote_code,
        layers_path=layers_path,
        writer_patterns=writer_patterns,
        verify=verify,
    )


def stream_edit(
    src_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    spec: EditSpec | DirectionEdit,
    source: Directions | None = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    trust_remote_code: bool = False,
    layers_path: str | None = None,
    writer_patterns: Sequence[str] | None = None,
    verify: bool = True,
) -> StreamReport:
    """The edit ``spec`` (e.g. the one ``run``'s search chose, from ``edit.json``, with the ``source`` of its
    directions; or a :class:`~abliterate.edit.direction_edit.DirectionEdit`) written shard by shard, as
    :func:`stream_orthogonalize` writes one direction: equal to ``apply_plan`` of the same plan in memory."""
    started = time.perf_counter()
    src = Path(src_dir).expanduser().resolve()
    if not src.is_dir():
        raise ModelLoadError(f"{src} is not a directory; pass the model directory (with config.json)")
    target = check_output(out_dir, overwrite=overwrite, inputs=(src,))
    if src in target.parents:
        raise OutputError(f"output {target} is inside the input model {src}; choose a directory outside it")
    model, raw_config = _meta_model(src, trust_remote_code)
    names, index = find_shards(src)
    shards = [read_shard(src / n) for n in names]
    where = {k: (s, e) for s in shards for k, e in s.entries.items()}
    anatomy = find_anatomy(model, layers_path=layers_path, writer_patterns=writer_patterns)
    if verify:
        check_on_miniature(model, anatomy, layers_path, writer_patterns)
    sources = _sources(model, list(where))
    _materialize_post_norms(model, [*anatomy.embeddings, *anatomy.all_writers()], sources, where)
    lm = LoadedModel(model, None, anatomy, str(src), src)
    plan = plan_of(lm, spec, source)
    edits = _plan_edits(plan, sources, where, anatomy.hidden_size)
    untie, extra = _untie(model, plan, sources, where)

    sizes = {s.path.name: s.size + sum(e.end - e.start for _, e in extra.get(s.path.name, [])) for s in shards}
    total = sum(sizes.values())
    if total > free_space(target.parent):
        raise OutputError(f"not enough disk space for {target}: {total / 2**30:.2f} GiB needed; free some first")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the edits are memory-bound: more threads only add stalls when cores are shared
    try:
        with atomic_directory(target) as tmp:  # an OSError (disk full...) becomes a one-line OutputError there
            done, work = 0, Workspace()
            for shard in shards:
                write_shard(shard, tmp / shard.path.name, edits, extra.get(shard.path.name, []), work)
                done += sizes[shard.path.name]
                if progress:
                    progress(done, total)
            copied, skipped = _write_rest(src, tmp, index, extra, raw_config if untie else None)
    finally:
        torch.set_num_threads(threads)
    report = StreamReport(target, sorted(edits), untie, names, copied, skipped, total)
    report.seconds = time.perf_counter() - started
    return report
