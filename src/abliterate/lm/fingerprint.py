"""Which weights a loaded model holds, cheaply: the revision it came from and a content hash of its checkpoint.

A search journal records both (:func:`abliterate.run.choosing.search_identity`), so that a resume on other
weights (a re-downloaded revision, a fine-tune saved over the same folder) is refused instead of mixing scores.

The content hash reads the checkpoint's settings files (config, tokenizer, index, chat template, code; not a
README) whole up to 1 MiB, and of each weight file (or larger settings file) its size, its header (a safetensors
file's JSON header: every tensor's name, dtype, shape and offsets) and ``SAMPLES`` evenly spaced blocks of its
data: about 1 MiB per file, whatever the model's size, so a change to any tensor that touches most of its values
(any fine-tune, re-quantization or edit) changes the hash; copying the folder does not. A model built from
objects in memory (no checkpoint on disk) is hashed from a strided sample of every parameter.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any

import torch

from abliterate.lm.model import LoadedModel

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
SMALL_FILES = 1 << 20  # files up to this size are hashed whole
SETTINGS_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken", ".py")  # config, tokenizer, template, code
SAMPLES = 16  # blocks read from each larger file
BLOCK = 1 << 16
PER_TENSOR = 256  # values sampled from each in-memory parameter


def checkpoint_of(lm: LoadedModel) -> Path | None:
    """The local folder or ``.gguf`` file ``lm`` was loaded from (a hub id: its cached snapshot, offline), if any."""
    if lm.local_path is not None:
        return lm.local_path
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(lm.source, "config.json")  # never touches the network
    except Exception:  # noqa: BLE001 - a source that is not a hub id (objects built in memory) has no cache entry
        return None
    return Path(config).parent if isinstance(config, str) else None


def revision_of(lm: LoadedModel) -> str | None:
    """The hub commit of a model loaded from the hub cache (its snapshot folder's name), else None."""
    folder = checkpoint_of(lm)
    if lm.local_path is None and folder is not None and folder.parent.name == "snapshots":
        return folder.name
    return None


def _file_digest(path: Path, h: Any) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with path.open("rb") as f:
        if size <= SMALL_FILES:
            h.update(f.read())
            return
        head = f.read(8)
        h.update(head)
        if path.suffix == ".safetensors" and len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            h.update(f.read(min(n, 1 << 26)))  # the header: names, dtypes, shapes, offsets
        for i in range(SAMPLES):
            f.seek(size * i // SAMPLES)
            h.update(f.read(BLOCK))


def _memory_digest(model: torch.nn.Module, h: Any) -> None:
    for name, p in sorted(model.state_dict(keep_vars=True).items(), key=lambda kv: kv[0]):
        h.update(f"{name}\0{tuple(p.shape)}\0{p.dtype}\0".encode())
        if p.device.type == "meta" or p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        step = max(flat.numel() // PER_TENSOR, 1)
        sample = flat[::step][:PER_TENSOR].to("cpu")
        if sample.dtype.is_floating_point:
            sample = sample.float()
        h.update(sample.numpy().tobytes())


def weights_digest(lm: LoadedModel) -> str:
    """A 16-hex-digit hash of the weights ``lm`` was loaded from (see the module docstring)."""
    h = hashlib.sha256()
    where = checkpoint_of(lm)
    files = [] if where is None else ([where] if where.is_file() else sorted(p for p in where.iterdir() if p.is_file()))
    files = [p for p in files if p.suffix in WEIGHT_SUFFIXES or p.suffix in SETTINGS_SUFFIXES]
    if any(p.suffix in WEIGHT_SUFFIXES for p in files):
        for path in files:
            _file_digest(path, h)
    else:
        _memory_digest(lm.model, h)
    return h.hexdigest()[:16]
