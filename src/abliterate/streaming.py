"""Streaming weight edit: orthogonalize a safetensors checkpoint on disk, shard by shard, never loading the model.

The module tree is built on the meta device from ``config.json`` and :func:`abliterate.find_anatomy` names the
residual writers, their residual axis and their post-norms; transformers' own checkpoint conversion mapping
(the one ``from_pretrained`` applies) ties each writer parameter to its checkpoint tensors, e.g. the fused
3-D ``mlp.experts.down_proj`` to the per-expert ``mlp.experts.<e>.down_proj.weight`` (or Mixtral's
``block_sparse_moe.experts.<e>.w2.weight``) tensors of the file. Each output shard is written byte for byte
from its input: the header and every untouched tensor are copied (``copy_file_range``), and only the writers
are read, edited in float32 with :func:`abliterate.weights.project_tensor` and cast back to their stored
dtype, so peak memory is about one writer tensor and the output keeps the input's file names, index and key
names. The edit equals :func:`abliterate.orthogonalize` with the same arguments followed by ``save``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .anatomy import Writer, find_anatomy
from .directions import Direction
from .errors import ArchitectureError, ModelLoadError, OutputError
from .interventions import edit_plan
from .model import LoadedModel, Progress
from .projection import Scale, project_out
from .saving import atomic_directory, check_output
from .weights import project_tensor

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}
# Weights in other formats are not copied: an unedited duplicate of the model would be a trap.
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".safetensors", ".index.json")
NO_STREAM = "dequantize first, or load through transformers (abliterate apply without --stream)"


@dataclass
class StreamReport:
    """What a streaming edit did. ``edited`` are checkpoint tensor names; ``copied`` the non-weight files;
    ``skipped`` weight files in other formats that were left out of the output."""

    out_dir: Path
    edited: list[str] = field(default_factory=list)
    untied: bool = False
    shards: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class _Entry:
    """One tensor of a safetensors file: absolute byte range in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass
class _Shard:
    name: str
    path: Path
    raw_header: bytes  # the 8-byte length and the JSON header, as stored
    header: dict[str, Any]
    entries: dict[str, _Entry]
    size: int


@dataclass(frozen=True)
class _Edit:
    axis: int | None  # residual axis of the stored tensor; None for a bias (last axis)
    basis: torch.Tensor
    scale: float
    norm_preserving: bool


def _read_shard(path: Path) -> _Shard:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, 100 << 20):
            raise ModelLoadError(f"{path} is not a safetensors file (bad header length); re-download or re-save it")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
        entries = {
            k: _Entry(v["dtype"], tuple(v["shape"]), 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in header.items()
            if k != "__metadata__"
        }
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ModelLoadError(f"{path} has a corrupt safetensors header ({exc}); re-download or re-save it") from exc
    if any(e.end > size or e.start > e.end for e in entries.values()):
        raise ModelLoadError(f"{path} is truncated (tensor data past the end of the file); re-download it")
    return _Shard(path.name, path, head + raw, header, entries, size)


def _find_shards(src: Path) -> tuple[list[str], dict[str, Any] | None]:
    """Shard file names (from the index, or the single file) and the index itself."""
    if (src / INDEX).is_file():
        try:
            index = json.loads((src / INDEX).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as exc:
            raise ModelLoadError(
                f"{src / INDEX} is not a valid index ({exc}); re-download or re-save the model"
            ) from exc
        missing = [n for n in names if not (src / n).is_file()]
        if missing:
            raise ModelLoadError(
                f"{src / INDEX} names shard(s) {', '.join(missing)} that are missing; re-download them"
            )
        return names, index
    if (src / SINGLE).is_file():
        return [SINGLE], None
    found = sorted(p.name for p in src.glob("*.safetensors"))
    if len(found) > 1:
        raise ModelLoadError(
            f"{src} has {len(found)} .safetensors shards but no {INDEX}; restore the index file "
            "(it says which tensor lives in which shard) or re-save the model with save_pretrained"
        )
    hint = f"only {found[0]}" if found else "no .safetensors weights"
    raise ModelLoadError(f"{src} has {hint}, not {SINGLE} or {INDEX}; convert it with save_pretrained first")


def _load_config(src: Path, trust_remote_code: bool) -> tuple[Any, dict[str, Any]]:
    if not (src / "config.json").is_file():
        raise ModelLoadError(f"{src} has no config.json: it is not a transformers model directory")
    raw = json.loads((src / "config.json").read_text())
    for part in (raw, raw.get("text_config") or {}):
        quant = part.get("quantization_config")
        if quant:
            method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
            raise ModelLoadError(f"{src} is a quantized checkpoint ({method}); {NO_STREAM}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(src), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read {src / 'config.json'}: {str(exc).strip().splitlines()[0]}") from exc
    return config, raw


def _meta_model(config: Any, trust_remote_code: bool) -> nn.Module:
    """The module tree without weights (parameters on the meta device), tied like the real model."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, ImportError) as exc:
        raise ModelLoadError(f"cannot build a causal LM from this config.json: {str(exc).splitlines()[0]}") from exc
    model.tie_weights()  # init_empty_weights re-creates parameters, which drops the tie
    return model.eval()


def _sources(model: nn.Module, keys: Sequence[str]) -> dict[str, list[tuple[str, list[Any]]]]:
    """Model parameter name -> [(checkpoint key, conversion ops)], by the rules ``from_pretrained`` applies
    (renamings, per-expert -> fused converters, a missing or extra base-model prefix)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = model.state_dict()
    prefix = model.base_model_prefix
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
        if kind == "MergeModulelist":
            labels.insert(op.dim, None)
            shape.insert(op.dim, target[op.dim] if op.dim < len(target) else None)
        elif kind == "Transpose":
            d0, d1 = op.dim0 % len(labels), op.dim1 % len(labels)
            if not (op.check_dims and tuple(shape) == target):
                labels[d0], labels[d1] = labels[d1], labels[d0]
                shape[d0], shape[d1] = shape[d1], shape[d0]
        elif kind == "Concatenate":
            shape[op.dim] = None
        else:
            raise ArchitectureError(
                f"the checkpoint stores {name} through a {kind} conversion that a streaming edit cannot follow; "
                "load through transformers instead (abliterate apply without --stream)"
            )
    found = labels[axis] if len(labels) == len(target) else None
    if found is None:
        raise ArchitectureError(
            f"cannot locate the residual axis of {name} in the checkpoint; load through transformers"
        )
    return found


def _module_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def _param_names(writer: Writer) -> tuple[str, str | None]:
    """Model parameter names of a writer's weight and bias."""
    if writer.param == "weight":
        return f"{writer.name}.weight", f"{writer.name}.{writer.bias}" if writer.bias else None
    owner = writer.name.rsplit(".", 1)[0]
    return writer.name, f"{owner}.{writer.bias}" if writer.bias else None


def _read_tensor(fd: int, entry: _Entry) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one tensor with plain ``pread`` (no mmap, so nothing lingers in RSS): (bytes, typed view)."""
    buf = torch.empty(entry.end - entry.start, dtype=torch.uint8)
    view, done = memoryview(buf.numpy()), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], entry.start + done)
        if n <= 0:
            raise ModelLoadError(f"unexpected end of file reading a tensor (fd {fd}); the shard is truncated")
        done += n
    return buf, buf.view(FLOAT_DTYPES[entry.dtype]).reshape(entry.shape)


def _materialize_post_norms(
    model: nn.Module, writers: list[Writer], sources: Mapping[str, list[tuple[str, list[Any]]]], where: dict
) -> None:
    """Give each post-norm (Gemma 2/3, OLMo 2) its real weights, in float32, so its gain can be probed."""
    done: set[int] = set()
    for writer in writers:
        norm = writer.post_norm
        if norm is None or id(norm) in done:
            continue
        done.add(id(norm))
        prefix = _module_name(model, norm)
        for pname, param in list(norm.named_parameters()):
            found = sources.get(f"{prefix}.{pname}", [])
            if len(found) != 1 or found[0][1] or found[0][0] not in where:
                raise ArchitectureError(f"the checkpoint has no tensor for {prefix}.{pname}; it does not match config")
            shard, entry = where[found[0][0]]
            if entry.dtype not in FLOAT_DTYPES or entry.shape != tuple(param.shape):
                raise ModelLoadError(f"{found[0][0]} is stored as {entry.dtype} {list(entry.shape)}; {NO_STREAM}")
            fd = os.open(shard.path, os.O_RDONLY)
            try:
                value = _read_tensor(fd, entry)[1].float().clone()
            finally:
                os.close(fd)
            owner = norm.get_submodule(pname.rpartition(".")[0]) if "." in pname else norm
            setattr(owner, pname.rpartition(".")[2], nn.Parameter(value, requires_grad=False))


def _plan_edits(
    plan: list[tuple[Writer, torch.Tensor, float]],
    sources: Mapping[str, list[tuple[str, list[Any]]]],
    where: dict[str, tuple[_Shard, _Entry]],
    hidden: int,
    norm_preserving: bool,
) -> dict[str, _Edit]:
    """Checkpoint key -> edit, with the dtype and shape of every writer tensor checked."""
    edits: dict[str, _Edit] = {}
    for writer, basis, s in plan:
        weight, bias = _param_names(writer)
        for pname, is_bias in ((weight, False), (bias, True)):
            if pname is None:
                continue
            found = sources.get(pname, [])
            if not found:
                raise ArchitectureError(f"the checkpoint has no tensor for {pname}; config.json and weights disagree")
            target = tuple(getattr(writer.module, writer.bias if is_bias else writer.param).shape)
            for key, ops in found:
                entry = where[key][1]
                if entry.dtype not in FLOAT_DTYPES:
                    raise ModelLoadError(f"{key} is stored as {entry.dtype}, not a float type; {NO_STREAM}")
                axis = None if is_bias else _source_axis(ops, writer.out_axis, entry.shape, target, key)
                if entry.shape[-1 if axis is None else axis] != hidden or (not ops and entry.shape != target):
                    raise ArchitectureError(
                        f"{key} has shape {list(entry.shape)}, which does not fit {pname} {list(target)} "
                        f"of this config.json (hidden size {hidden}); config and weights disagree"
                    )
                edits[key] = _Edit(axis, basis, s, norm_preserving and not is_bias)
    return edits


def _copy_range(fd_in: int, fd_out: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes at ``offset`` of ``fd_in`` to the current position of ``fd_out``, in the kernel."""
    while count > 0:
        try:
            n = os.copy_file_range(fd_in, fd_out, min(count, 1 << 30), offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            n = _write_all(fd_out, memoryview(os.pread(fd_in, min(count, 64 << 20), offset)))
        if n <= 0:
            raise ModelLoadError("unexpected end of file while copying a shard; the input is truncated")
        offset, count = offset + n, count - n


def _write_all(fd: int, data: memoryview) -> int:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])
    return done


def _write_shard(shard: _Shard, dst: Path, edits: Mapping[str, _Edit], extra: Sequence[tuple[str, _Entry]]) -> None:
    """Write ``shard`` to ``dst`` with ``edits`` applied and ``extra`` tensors (copies of stored ones) appended."""
    raw = shard.raw_header
    if extra:
        header = dict(shard.header)
        end = shard.size - len(raw)
        for name, entry in extra:
            header[name] = {
                "dtype": entry.dtype,
                "shape": list(entry.shape),
                "data_offsets": [end, end + entry.end - entry.start],
            }
            end += entry.end - entry.start
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        raw = struct.pack("<Q", len(text)) + text
    fd_in = os.open(shard.path, os.O_RDONLY)
    fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd_out, memoryview(raw))
        pos = len(shard.raw_header)
        for key, entry in sorted(
            ((k, shard.entries[k]) for k in edits if k in shard.entries), key=lambda x: x[1].start
        ):
            _copy_range(fd_in, fd_out, pos, entry.start - pos)
            buf, tensor = _read_tensor(fd_in, entry)
            edit = edits[key]
            with torch.no_grad():
                if edit.axis is None:
                    tensor.copy_(project_out(tensor, edit.basis, edit.scale))
                elif tensor.numel():
                    project_tensor(tensor, edit.axis, edit.basis, edit.scale, edit.norm_preserving)
            _write_all(fd_out, memoryview(buf.numpy()))
            del buf, tensor
            pos = entry.end
        _copy_range(fd_in, fd_out, pos, shard.size - pos)
        for _, entry in extra:
            _copy_range(fd_in, fd_out, entry.start, entry.end - entry.start)
        os.fsync(fd_out)
    finally:
        os.close(fd_in)
        os.close(fd_out)


def _output_embedding_key(model: nn.Module) -> str:
    """The checkpoint name ``save_pretrained`` gives the LM head once it is untied."""
    from transformers.core_model_loading import revert_weight_conversion

    name = f"{_module_name(model, model.get_output_embeddings())}.weight"
    renamed = revert_weight_conversion(model, {name: model.get_output_embeddings().weight})
    return next(iter(renamed)) if len(renamed) == 1 else name


def _free_space(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


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
) -> StreamReport:
    """Orthogonalize the safetensors checkpoint in ``src_dir`` against ``direction`` into ``out_dir``.

    Arguments mean what they mean for :func:`abliterate.orthogonalize`; the result equals loading the model,
    orthogonalizing it and saving it, but peak memory is about one writer tensor and the output keeps the
    input's shard names and index. Tied embeddings, when the embedding is edited, are untied as
    :func:`abliterate.untie_embeddings` does: an ``lm_head`` copy of the original embedding is stored next to
    it and ``tie_word_embeddings`` is set false in ``config.json``. Every non-weight file is copied. The output
    is written to a temporary sibling directory that is renamed into place at the end, so a failed or killed
    run never leaves a partial ``out_dir``. ``progress(bytes_done, bytes_total)`` is called after each shard.
    """
    started = time.perf_counter()
    src = Path(src_dir).expanduser().resolve()
    if not src.is_dir():
        raise ModelLoadError(f"{src} is not a directory; pass the model directory (with config.json)")
    target = check_output(out_dir, overwrite=overwrite, inputs=(src,))
    if src in target.parents:
        raise OutputError(f"output {target} is inside the input model {src}; choose a directory outside it")
    config, raw_config = _load_config(src, trust_remote_code)
    names, index = _find_shards(src)
    shards = [_read_shard(src / n) for n in names]
    where = {k: (s, e) for s in shards for k, e in s.entries.items()}

    model = _meta_model(config, trust_remote_code)
    anatomy = find_anatomy(model, layers_path=layers_path, writer_patterns=writer_patterns)
    sources = _sources(model, list(where))
    all_writers = anatomy.all_writers() + anatomy.embeddings
    _materialize_post_norms(model, all_writers, sources, where)
    lm = LoadedModel(model, None, anatomy, str(src), src)
    plan = edit_plan(lm, direction, layers, scale, embeddings, embedding_scale)
    edits = _plan_edits(plan, sources, where, anatomy.hidden_size, norm_preserving)

    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = out_emb is not None and out_emb.weight is in_emb.weight
    untie = tied and any(w.layer is None for w, _, _ in plan)
    extra: dict[str, list[tuple[str, _Entry]]] = defaultdict(list)
    lm_key = _output_embedding_key(model) if untie else ""
    if untie and lm_key not in where:
        emb_key = sources[f"{_module_name(model, in_emb)}.weight"][0][0]
        extra[where[emb_key][0].name].append((lm_key, where[emb_key][1]))

    others = [
        p
        for p in sorted(src.rglob("*"))
        if p.is_file() and not any(x.startswith(".") for x in p.relative_to(src).parts)
    ]
    skipped = [p for p in others if p.name.endswith(OTHER_WEIGHTS)]
    others = [p for p in others if p not in skipped]
    total = sum(s.size for s in shards) + sum(e.end - e.start for xs in extra.values() for _, e in xs)
    need = total + sum(p.stat().st_size for p in others)
    if need > _free_space(target.parent):
        raise OutputError(
            f"not enough disk space at {target.parent}: {need / 2**30:.2f} GiB needed; free some or choose another output"
        )

    report = StreamReport(
        target,
        sorted(edits),
        untie,
        names,
        [],
        [str(p.relative_to(src)) for p in skipped if p.name not in names and p.name != INDEX],
    )
    try:
        with atomic_directory(target) as tmp:
            done = 0
            if progress:
                progress(0, total)
            for shard in shards:
                _write_shard(shard, tmp / shard.name, edits, extra.get(shard.name, []))
                done += shard.size + sum(e.end - e.start for _, e in extra.get(shard.name, []))
                if progress:
                    progress(done, total)
            if index is not None:
                index = json.loads(json.dumps(index))
                for shard_name, xs in extra.items():
                    for key, entry in xs:
                        index["weight_map"][key] = shard_name
                        meta = index.setdefault("metadata", {})
                        if isinstance(meta.get("total_size"), int):
                            meta["total_size"] += entry.end - entry.start
                (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
            for path in others:
                dest = tmp / path.relative_to(src)
                dest.parent.mkdir(parents=True, exist_ok=True)
                if untie and path == src / "config.json":
                    raw_config["tie_word_embeddings"] = False
                    if isinstance(raw_config.get("text_config"), dict):
                        raw_config["text_config"]["tie_word_embeddings"] = False
                    dest.write_text(json.dumps(raw_config, indent=2) + "\n")
                else:
                    shutil.copyfile(path, dest)
                report.copied.append(str(path.relative_to(src)))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(
                f"ran out of disk space writing {target}; nothing was written, free space and retry"
            ) from exc
        raise
    report.bytes_written = total
    report.seconds = time.perf_counter() - started
    return report
