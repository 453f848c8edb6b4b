"""The edited model as a GGUF next to the safetensors one: ``<name>-abliterated.gguf``, its record (``gguf.json``: each
edited tensor's type before and after, the file's sha256) and an Ollama ``Modelfile``; and the one line that runs it."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from abliterate.checkpoint.gguf_file import WRITABLE, Written
from abliterate.checkpoint.gguf_stream import write_plan_gguf
from abliterate.edit.plan import EditPlan
from abliterate.errors import OptionError
from abliterate.lm.demo import demo_gguf

RECORD = "gguf.json"
MODELFILE = "Modelfile"
TYPES = ("auto", *WRITABLE)


def check_gguf_type(gguf_type: str) -> str:
    if gguf_type not in TYPES:
        raise OptionError(f"unknown --gguf-type '{gguf_type}'; use one of {', '.join(TYPES)}")
    return gguf_type


def is_gguf(model: str) -> bool:
    return model.lower().endswith(".gguf") and Path(model).is_file()


def gguf_source(model: str) -> Path | None:
    """The GGUF a run writes its edit into: the model itself, or the GGUF the demo model was converted from."""
    return Path(model) if is_gguf(model) else demo_gguf(model)


def gguf_name(source: Path) -> str:
    return f"{source.stem}-abliterated.gguf"


def run_lines(path: Path) -> list[str]:
    """The commands that run a written GGUF: llama.cpp's CLI, and Ollama through the Modelfile beside it."""
    name = path.stem.lower().replace("_", "-")
    return [
        f'llama-cli -m {path} -cnv -p "You are a helpful assistant."',
        f"ollama create {name} -f {path.parent / MODELFILE} && ollama run {name}",
    ]


def write_modelfile(folder: Path, gguf_file: str) -> Path:
    """An Ollama Modelfile that imports the GGUF beside it (its chat template is read from the GGUF)."""
    path = folder / MODELFILE
    path.write_text(f"FROM ./{gguf_file}\n")
    return path


def write_record(folder: Path, written: Written, source: Path, gguf_type: str) -> Path:
    path = folder / RECORD
    record = {"source": str(source), "gguf_type": gguf_type, **written.record()}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def write_run_gguf(
    folder: Path,
    source: Path,
    plan: EditPlan,
    hidden: int,
    *,
    gguf_type: str = "auto",
    edit: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Written:
    """``folder/<name>-abliterated.gguf``: the GGUF ``source`` with ``plan`` (made on the model loaded from it)
    written in, plus its record and a Modelfile."""
    written = write_plan_gguf(
        source, folder / gguf_name(source), plan, hidden, gguf_type=gguf_type, edit=edit, progress=progress
    )
    write_record(folder, written, source, gguf_type)
    write_modelfile(folder, written.path.name)
    return written
