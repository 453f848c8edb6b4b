"""Safetensors files read and written as bytes: headers parsed by hand, tensors read with plain reads into a
reused buffer, untouched byte ranges copied in the kernel. Used by the streaming edit, which must never hold
a whole shard in memory (an mmap would keep it in RSS)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import threading
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch

from abliterate.errors import ModelLoadError
from abliterate.ops.kernel import WORK_ELEMENTS

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class Entry(NamedTuple):
    """One stored tensor; ``start``/``end`` are absolute offsets in its file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class Shard(NamedTuple):
    path: Path
    raw_header: bytes  # the 8-byte length and the JSON header, as stored
    entries: dict[str, Entry]
    size: int


def read_shard(path: Path) -> Shard:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, 100 << 20):
            raise ModelLoadError(f"{path} is not a safetensors file (bad header length); re-download or re-save it")
        raw = fh.read(n)
    try:
        entries = {
            k: Entry(v["dtype"], tuple(v["shape"]), 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in json.loads(raw).items()
            if k != "__metadata__"
        }
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ModelLoadError(f"{path} has a corrupt safetensors header ({exc}); re-download or re-save it") from exc
    if any(e.end > size or e.start > e.end for e in entries.values()):
        raise ModelLoadError(f"{path} is truncated (tensor data past the end of the file); re-download it")
    return Shard(path, head + raw, entries, size)


def find_shards(src: Path) -> tuple[list[str], dict[str, Any] | None]:
    """Shard file names (from the index, or the single file) and the index itself."""
    if (src / INDEX).is_file():
        try:
            index = json.loads((src / INDEX).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as exc:
            raise ModelLoadError(f"{src / INDEX} is not a valid index ({exc}); re-download or re-save it") from exc
        if missing := [n for n in names if not (src / n).is_file()]:
            raise ModelLoadError(f"{src / INDEX} names missing shard(s) {', '.join(missing)}; re-download them")
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


def read_into(fin: BinaryIO, view: memoryview, offset: int) -> None:
    fin.seek(offset)
    while len(view):
        if not (n := fin.readinto(view)):
            raise ModelLoadError(f"{fin.name} ends early: the shard is truncated; re-download it")
        view = view[n:]


class Workspace:
    """Buffers reused from tensor to tensor: page-faulting fresh memory costs more than the arithmetic."""

    def __init__(self, work_elements: int = WORK_ELEMENTS) -> None:
        self.raw = torch.empty(0, dtype=torch.uint8)
        self.work = torch.empty(work_elements)
        self.work64: torch.Tensor | None = None

    def buffer(self, dtype: torch.dtype) -> torch.Tensor:
        """The float work buffer for a stored dtype: float32, or float64 for float64 tensors."""
        if dtype != torch.float64:
            return self.work
        if self.work64 is None:
            self.work64 = torch.empty(self.work.numel(), dtype=torch.float64)
        return self.work64

    def block(self, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of the byte buffer, grown when needed."""
        if self.raw.numel() < nbytes:
            self.raw = torch.empty(0, dtype=torch.uint8)  # free the old buffer before allocating the new one
            self.raw = torch.empty(nbytes, dtype=torch.uint8)
        return self.raw[:nbytes]

    def read(self, fin: BinaryIO, entry: Entry) -> tuple[torch.Tensor, torch.Tensor]:
        """A stored tensor, read with plain reads (an mmap would keep the shard in RSS): (bytes, typed view)."""
        raw = self.block(entry.end - entry.start)
        read_into(fin, memoryview(raw.numpy()), entry.start)
        return raw, raw.view(FLOAT_DTYPES[entry.dtype]).reshape(entry.shape)


class FileRows:
    """:class:`abliterate.ops.kernel.Rows` over a 2-D tensor stored at ``offset`` of ``fin``: row blocks are read
    with plain reads into the workspace's byte buffer, and stored (cast back) by appending them to ``fout``, so
    stores must come in order. Memory: one block, never the tensor."""

    def __init__(
        self, fin: BinaryIO, fout: BinaryIO, offset: int, shape: tuple[int, int], dtype: torch.dtype, ws: Workspace
    ) -> None:
        self.fin, self.fout, self.offset, self.shape, self.dtype, self.ws = fin, fout, offset, shape, dtype, ws
        self.row_bytes = shape[1] * dtype.itemsize
        self.written = 0

    def _typed(self, raw: torch.Tensor, rows: int) -> torch.Tensor:
        return raw.view(self.dtype).view(rows, self.shape[1])

    def load(self, start: int, out: torch.Tensor) -> torch.Tensor:
        raw = self.ws.block(len(out) * self.row_bytes)
        read_into(self.fin, memoryview(raw.numpy()), self.offset + start * self.row_bytes)
        return out.copy_(self._typed(raw, len(out)))

    def store(self, start: int, values: torch.Tensor) -> None:
        if start != self.written:
            raise RuntimeError(f"row blocks must be stored in order: got row {start}, expected {self.written}")
        raw = self.ws.block(len(values) * self.row_bytes)
        self._typed(raw, len(values)).copy_(values)
        write_all(self.fout, memoryview(raw.numpy()))
        self.written += len(values)


def write_all(fout: BinaryIO, view: memoryview) -> None:
    """Write everything, 1 MiB per call: on Linux, writes of several MiB at once are up to 10x slower."""
    while len(view):
        view = view[fout.write(view[: 1 << 20]) :]


def copy_range(fin: BinaryIO, fout: BinaryIO, offset: int, count: int, stop: threading.Event | None = None) -> None:
    """Append ``count`` bytes at ``offset`` of ``fin`` to ``fout``: in the kernel where the OS can, else buffered;
    in 64 MiB steps, giving up quietly between two steps once ``stop`` is set."""
    kernel = hasattr(os, "copy_file_range")
    while count > 0 and not (stop and stop.is_set()):
        try:
            n = os.copy_file_range(fin.fileno(), fout.fileno(), min(count, 64 << 20), offset) if kernel else 0
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            kernel, n = False, 0
        if not n:  # no kernel copy here, or the input ended early (then read_into says so)
            chunk = memoryview(bytearray(n := min(count, 16 << 20)))
            read_into(fin, chunk, offset)
            write_all(fout, chunk)
        offset, count = offset + n, count - n


class BackgroundCopy:
    """Copy byte ranges ``(source offset, destination offset, count)`` of ``src`` into the existing file ``dst``
    on a thread, while the caller writes the other ranges of ``dst`` through its own handle: the kernel copy of
    untouched bytes overlaps the caller's arithmetic. As a context manager: waits for the copy on a clean exit
    (re-raising its error), stops it between two steps on an exception."""

    def __init__(self, src: Path, dst: Path, ranges: list[tuple[int, int, int]]) -> None:
        self.src, self.dst, self.ranges = src, dst, ranges
        self.stop, self.error = threading.Event(), None
        self.thread = threading.Thread(target=self._run, name="abliterate-copy", daemon=True)

    def _run(self) -> None:
        try:
            with open(self.src, "rb", buffering=0) as fin, open(self.dst, "r+b", buffering=0) as fout:
                for offset, at, count in self.ranges:
                    fout.seek(at)
                    copy_range(fin, fout, offset, count, self.stop)
        except BaseException as exc:  # handed to the caller's thread by __exit__
            self.error = exc

    def __enter__(self) -> BackgroundCopy:
        self.thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:
            self.stop.set()
        self.thread.join()
        if kind is None and self.error is not None:
            raise self.error


def free_space(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free
