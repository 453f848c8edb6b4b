"""One shard of a streaming edit: a safetensors file copied to its output with the residual writers' bytes
replaced by their edited values, block by block (see :mod:`abliterate.checkpoint.stream_edit` for the whole
checkpoint)."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch

from abliterate.checkpoint.shards import FLOAT_DTYPES, BackgroundCopy, Entry, FileRows, Shard, Workspace, write_all
from abliterate.errors import ArchitectureError
from abliterate.ops.kernel import project_out, project_rows


class ShardEdit(NamedTuple):
    """How one stored tensor is edited."""

    axis: int | None  # residual axis of the stored tensor; None for a bias (its last axis)
    basis: torch.Tensor
    scale: float
    norm_preserving: bool


@torch.no_grad()
def edit_in_blocks(fin: BinaryIO, fout: BinaryIO, entry: Entry, edit: ShardEdit, work: Workspace) -> None:
    """Edit one stored 2-D tensor (or each expert of a 3-D one) from ``fin`` into ``fout``, block by block."""
    dtype, shape = FLOAT_DTYPES[entry.dtype], entry.shape
    buffer = work.buffer(dtype)
    u = edit.basis.to(buffer.dtype)
    assert edit.axis is not None
    if len(shape) == 2:
        mats = [(entry.start, (shape[0], shape[1]), edit.axis)]
    elif len(shape) == 3 and edit.axis > 0:
        per = shape[1] * shape[2] * dtype.itemsize
        mats = [(entry.start + e * per, (shape[1], shape[2]), edit.axis - 1) for e in range(shape[0])]
    else:
        raise ArchitectureError(f"cannot stream-edit a {list(shape)} tensor along axis {edit.axis}")
    for offset, matrix, axis in mats:
        rows = FileRows(fin, fout, offset, matrix, dtype, work)
        project_rows(rows, axis, u, edit.scale, edit.norm_preserving, buffer)


def write_shard(shard: Shard, dst: Path, edits: Mapping[str, ShardEdit], extra: list, work: Workspace) -> None:
    """Write ``shard`` to ``dst`` with ``edits`` applied and ``extra`` [(name, stored entry)] copies appended.
    Untouched bytes are copied by a background thread while this one edits the writers in place."""
    raw = shard.raw_header
    if extra:
        header, end = json.loads(raw[8:]), shard.size - len(raw)
        for name, e in extra:
            header[name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [end, end + e.end - e.start]}
            end += e.end - e.start
        text = json.dumps(header, separators=(",", ":")).encode()
        raw = struct.pack("<Q", len(text) + -len(text) % 8) + text + b" " * (-len(text) % 8)
    shift = len(raw) - len(shard.raw_header)  # where input byte i lands in the output: i + shift
    keys = sorted((k for k in edits if k in shard.entries), key=lambda k: shard.entries[k].start)
    gaps, pos = [], len(shard.raw_header)
    for key in keys:
        gaps.append((pos, pos + shift, shard.entries[key].start - pos))
        pos = shard.entries[key].end
    gaps.append((pos, pos + shift, shard.size - pos))
    end = shard.size + shift
    for _, entry in extra:
        gaps.append((entry.start, end, entry.end - entry.start))
        end += entry.end - entry.start
    with open(shard.path, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        write_all(fout, memoryview(raw))
        with BackgroundCopy(shard.path, dst, [g for g in gaps if g[2] > 0]):
            for key in keys:
                entry, edit = shard.entries[key], edits[key]
                fout.seek(entry.start + shift)
                if edit.axis is None or entry.end == entry.start:  # a bias (small) or an empty tensor
                    buf, tensor = work.read(fin, entry)
                    if edit.axis is None:
                        tensor.copy_(project_out(tensor, edit.basis, edit.scale))
                    write_all(fout, memoryview(buf.numpy()))
                else:
                    edit_in_blocks(fin, fout, entry, edit, work)
