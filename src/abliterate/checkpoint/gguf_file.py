"""A GGUF file rewritten with some tensors replaced: the low-level half of the GGUF edit.

The output is the input's key-values (each copied as its raw bytes, so types, arrays and the tokenizer survive
exactly), plus or instead of the ``general.*`` keys given, then the input's tensor infos in their order (an edited
tensor with its new type; appended tensors last) and the data: every tensor that is not edited is copied byte for
byte, every edited one is dequantized with ``gguf.quants``, edited in float32 by a callback, and quantized again.
Rows are independent in every GGUF type (a quant block never crosses a row), so a tensor whose edit is row-wise
(the embeddings) is processed in row blocks; any other edit holds one tensor in float32 at a time. The file is
written sequentially to a temporary sibling, hashed as it goes, and renamed into place at the end: a failure leaves
nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from abliterate.checkpoint.shards import free_space
from abliterate.errors import ModelLoadError, OutputError

ALIGNMENT_KEY = "general.alignment"
ROW_BLOCK_ELEMENTS = 1 << 24  # float32 elements per row block of a row-wise edit (64 MiB)
COPY_CHUNK = 1 << 24  # bytes per read when a tensor is copied as it is
# The types the gguf package can write, in the order tried when choosing; anything else becomes FALLBACK.
WRITABLE = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
FALLBACK = "Q8_0"

Edit = Callable[[np.ndarray], np.ndarray]  # float32 values in, float32 values out (same shape)


@dataclass(frozen=True)
class TensorEdit:
    """How one stored tensor changes: ``edit`` maps its float32 values (numpy, PyTorch order: the GGUF shape
    reversed) to new ones; ``row_wise``: each row's result depends on that row only (so it runs in row blocks)."""

    edit: Edit
    row_wise: bool = False


@dataclass
class Written:
    """A GGUF written: its path, sha256 and size; each edited tensor's type before and after; appended tensors."""

    path: Path
    sha256: str
    bytes: int
    edited: dict[str, tuple[str, str]] = field(default_factory=dict)
    appended: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """What a manifest records of the file."""
        return {
            "file": self.path.name,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "edited": {name: {"before": b, "after": a} for name, (b, a) in self.edited.items()},
            "appended": list(self.appended),
        }


def read_gguf(path: Path) -> Any:
    """A :class:`gguf.GGUFReader` over ``path`` (memory-mapped: nothing is loaded); one line on a bad file."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}; check the path") from None
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic); pass a .gguf model")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises bare ValueError/KeyError/IndexError on a truncated or corrupt file
        raise ModelLoadError(f"{path} is truncated or corrupt, not a readable GGUF ({exc}); re-download it") from None
    if reader.endianess.name != "LITTLE":
        raise ModelLoadError(f"{path} is a big-endian GGUF; convert it to little-endian first")
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=reader.data_offset)
    if end > path.stat().st_size:
        raise ModelLoadError(f"{path} is truncated ({path.stat().st_size} of {end} bytes); re-download it")
    return reader


def type_name(qtype: Any) -> str:
    return str(qtype.name)


@cache
def can_write(name: str) -> bool:
    """Whether the installed gguf package quantizes to type ``name`` (tried on one block)."""
    if name not in gguf.GGMLQuantizationType.__members__:
        return False
    qtype = gguf.GGMLQuantizationType[name]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    try:
        gguf.quants.quantize(np.zeros((1, block), dtype=np.float32), qtype)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return True


def choose_type(source: str, wanted: str, ne0: int, name: str) -> str:
    """The type an edited tensor is written in: ``wanted`` ("auto": the source's type where gguf can write it,
    else :data:`FALLBACK`), checked to fit the tensor's row length."""
    chosen = wanted if wanted != "auto" else source if can_write(source) else FALLBACK
    if not can_write(chosen):
        raise OutputError(f"the gguf package cannot write type {chosen}; choose one of {', '.join(WRITABLE)}")
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[chosen]][0]
    if ne0 % block:
        raise OutputError(
            f"{name} has rows of {ne0} values, not a multiple of {chosen}'s block of {block}; choose another "
            "--gguf-type (F16 fits any row)"
        )
    return chosen


def _nbytes(qtype: Any, shape: Sequence[int]) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape, dtype=np.int64)) // block * size


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _kv_bytes(key: str, value: str) -> bytes:
    return _string(key) + struct.pack("<I", int(gguf.GGUFValueType.STRING)) + _string(value)


def _kv_section(reader: Any, extra: Mapping[str, str]) -> tuple[bytes, int]:
    """The raw bytes of every key-value of ``reader`` (those named in ``extra`` replaced), then ``extra``'s."""
    parts, count = [], 0
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name in extra:  # the header's pseudo-fields; keys written anew
            continue
        length = sum(int(p.nbytes) for p in f.parts)
        parts.append(bytes(reader.data[f.offset : f.offset + length]))
        count += 1
    for key, value in extra.items():
        parts.append(_kv_bytes(key, value))
        count += 1
    return b"".join(parts), count


@dataclass(frozen=True)
class _Out:
    """One tensor of the output: its name, GGUF dims (ne0 first), type, and the source tensor its bytes come from."""

    name: str
    dims: tuple[int, ...]
    qtype: Any
    source: Any
    edit: TensorEdit | None


def _layout(
    reader: Any, edits: Mapping[str, TensorEdit], types: Mapping[str, str], appended: Mapping[str, str]
) -> list[_Out]:
    by_name = {t.name: t for t in reader.tensors}
    outs = []
    for t in reader.tensors:
        qtype = gguf.GGMLQuantizationType[types[t.name]] if t.name in edits else t.tensor_type
        outs.append(_Out(t.name, tuple(int(d) for d in t.shape), qtype, t, edits.get(t.name)))
    for name, copy_of in appended.items():
        t = by_name[copy_of]
        outs.append(_Out(name, tuple(int(d) for d in t.shape), t.tensor_type, t, None))
    return outs


def _header(reader: Any, outs: list[_Out], extra: Mapping[str, str], alignment: int) -> tuple[bytes, list[int]]:
    """Header, key-values and tensor infos, padded to ``alignment``; and each tensor's offset in the data."""
    kv, count = _kv_section(reader, extra)
    head = [b"GGUF", struct.pack("<IQQ", 3, len(outs), count), kv]
    offsets, pos = [], 0
    for o in outs:
        offsets.append(pos)
        head += [_string(o.name), struct.pack("<I", len(o.dims)), struct.pack(f"<{len(o.dims)}Q", *o.dims)]
        head.append(struct.pack("<IQ", int(o.qtype), pos))
        pos += _nbytes(o.qtype, o.dims)
        pos += -pos % alignment
    raw = b"".join(head)
    return raw + bytes(-len(raw) % alignment), offsets


def _row_blocks(t: Any, row_wise: bool) -> Iterator[tuple[np.ndarray, Any]]:
    """The stored rows of ``t`` in blocks (one block unless ``row_wise``): (stored bytes or values, type)."""
    data = t.data.reshape(-1, t.data.shape[-1]) if row_wise else t.data
    per_row = int(t.shape[0]) if len(t.shape) else 1
    step = max(1, ROW_BLOCK_ELEMENTS // max(per_row, 1)) if row_wise else len(data)
    for i in range(0, len(data), max(step, 1)):
        yield data[i : i + step], t.tensor_type


def _edited_bytes(o: _Out) -> Iterator[bytes]:
    """The edited tensor ``o``, quantized to its output type, block by block."""
    assert o.edit is not None
    for stored, qtype in _row_blocks(o.source, o.edit.row_wise):
        values = np.ascontiguousarray(gguf.quants.dequantize(stored, qtype), dtype=np.float32)
        if not o.edit.row_wise:
            values = values.reshape(tuple(reversed(o.dims)))
        new = np.ascontiguousarray(o.edit.edit(values), dtype=np.float32)
        if new.shape != values.shape or not np.isfinite(new).all():
            what = "non-finite values" if new.shape == values.shape else "a new shape"
            raise OutputError(f"the edit of {o.name} gave {what}; nothing was written (a bug: please report it)")
        if int(o.qtype) == int(gguf.GGMLQuantizationType.F32):
            yield new.tobytes()
        else:
            yield np.ascontiguousarray(gguf.quants.quantize(new, o.qtype)).tobytes()


def _copied_bytes(reader: Any, t: Any) -> Iterator[bytes]:
    start = int(t.data_offset)  # absolute in the file
    for i in range(start, start + int(t.n_bytes), COPY_CHUNK):
        yield bytes(reader.data[i : min(i + COPY_CHUNK, start + int(t.n_bytes))])


def write_edited(
    src: Path,
    dst: Path,
    edits: Mapping[str, TensorEdit],
    *,
    gguf_type: str = "auto",
    extra: Mapping[str, str] | None = None,
    appended: Mapping[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    reader: Any = None,
) -> Written:
    """Write ``src`` to ``dst`` with the tensors named in ``edits`` edited and re-encoded (``gguf_type``: "auto"
    or a type name, see :func:`choose_type`), the ``extra`` string keys set (replacing same-named ones) and
    ``appended`` tensors ({new name: source tensor}) added as byte copies. ``progress(bytes, total)``."""
    reader = read_gguf(src) if reader is None else reader
    extra, appended = dict(extra or {}), dict(appended or {})
    names = {t.name: t for t in reader.tensors}
    types = {n: choose_type(type_name(names[n].tensor_type), gguf_type, int(names[n].shape[0]), n) for n in edits}
    alignment_field = reader.fields.get(ALIGNMENT_KEY)
    alignment = int(alignment_field.contents()) if alignment_field is not None else 32
    outs = _layout(reader, edits, types, appended)
    head, offsets = _header(reader, outs, extra, alignment)
    total = len(head) + offsets[-1] + _nbytes(outs[-1].qtype, outs[-1].dims) if outs else len(head)
    if total > free_space(dst.parent):
        raise OutputError(f"not enough disk space for {dst}: {total / 2**30:.2f} GiB needed; free some first")
    partial = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    digest, done = hashlib.sha256(), 0
    try:
        with open(partial, "wb") as fout:

            def put(chunk: bytes) -> None:
                nonlocal done
                fout.write(chunk)
                digest.update(chunk)
                done += len(chunk)

            put(head)
            for o, offset in zip(outs, offsets, strict=True):
                if done < len(head) + offset:
                    put(bytes(len(head) + offset - done))
                for chunk in _edited_bytes(o) if o.edit is not None else _copied_bytes(reader, o.source):
                    put(chunk)
                if progress:
                    progress(done, total)
        os.replace(partial, dst)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"could not write {dst}: {exc.strerror or exc}; nothing was written") from exc
        raise
    edited = {n: (type_name(names[n].tensor_type), types[n]) for n in edits}
    return Written(dst, digest.hexdigest(), done, edited, list(appended))
