"""Atomic output directories and saving an edited model that plain transformers loads."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from abliterate.errors import OutputError

if TYPE_CHECKING:  # saving is below the model: LoadedModel.save calls save_model
    from abliterate.lm.model import LoadedModel


def check_output(out: str | Path, *, overwrite: bool = False, inputs: tuple[Path | None, ...] = ()) -> Path:
    """Validate an output directory: never an input or a parent of one; existing only with overwrite."""
    target = Path(out).expanduser().resolve()
    for inp in inputs:
        if inp is None:
            continue
        inp = inp.resolve()
        if target == inp or target in inp.parents or (inp.is_file() and target == inp.parent):
            raise OutputError(f"output {target} would overwrite the input model {inp}; choose another directory")
    if target.exists() and not overwrite:
        raise OutputError(f"output {target} already exists; choose a new directory or ask to overwrite it")
    if target.exists() and not target.is_dir():
        raise OutputError(f"output {target} exists and is not a directory; remove it or choose another path")
    return target


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``target``.

    On any error or interrupt (Ctrl-C), even one that lands between or just after the final renames,
    the temporary directory vanishes and ``target`` is left as it was (absent, or the old directory).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(target)
    tag = f"{_owner()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    old = target.parent / f".{target.name}.old-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException as exc:
        _roll_back(target, tmp, old)
        if isinstance(exc, OSError):  # disk full, permissions...: one clear line, nothing left behind
            raise OutputError(f"could not write {target}: {exc.strerror or exc}; nothing was written") from exc
        raise
    shutil.rmtree(old, ignore_errors=True)


def _owner() -> str:
    """This process, as written into temporary names: ``<host>.<pid>`` (dots and dashes out of the host)."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32]
    return f"{host}.{os.getpid()}"


def _sweep_stale(target: Path) -> None:
    """Remove temporary siblings of ``target`` left by a killed run (SIGKILL, power loss): those whose owner
    process on this host is gone. Directories of live processes, of other hosts (a shared file system) and
    the ``.old-*`` backups of a replaced output (they may hold the only copy of it) are left alone."""
    if os.name != "posix":  # elsewhere os.kill(pid, 0) is no liveness probe
        return
    host, _ = _owner().split(".")
    for path in target.parent.glob(f".{target.name}.tmp-*"):
        owner = path.name[len(f".{target.name}.tmp-") :].split("-")[0]
        name, _, pid = owner.rpartition(".")
        if name != host or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:  # alive but not ours (EPERM): keep it
            continue


def _roll_back(target: Path, tmp: Path, old: Path) -> None:
    """Undo whatever part of :func:`atomic_directory`'s write and renames happened."""
    if not tmp.exists() and target.exists():  # the new directory was already renamed into place
        os.replace(target, tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    if old.exists() and not target.exists():
        os.replace(old, target)


def save_model(lm: LoadedModel, out: str | Path, *, overwrite: bool = False) -> Path:
    """Save model weights (safetensors), config, generation config and tokenizer to ``out``.

    The write goes to a temporary directory renamed into place, so an interrupted save leaves
    nothing behind. Refuses the input directory and any parent of it.
    """
    target = check_output(out, overwrite=overwrite, inputs=(lm.local_path,))
    with atomic_directory(target) as tmp:
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
    return target
