"""``manifest.json``: what an output folder was made from and what it holds, to check it and to rebuild it.

Every output folder (``run``, ``apply --out``, ``export --format peft``) carries one: the sha256 of the input
model's files (the safetensors, config and tokenizer files of its local directory, a hub id's cache snapshot or
the ``.gguf`` file), of every prompt source used (the bundled sets included), of other input files (a direction
set, an ``edit.json``), the seed, the full effective config, the versions, the chosen edit spec and the sha256 of
every file written. :func:`verify_folder` checks a folder against its own manifest; :func:`check_inputs` finds the
inputs again by path and checks them by hash (what ``abliterate reproduce`` does before re-running); and
:func:`first_tensor_difference` compares the tensor files of two folders.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from abliterate.errors import AbliterateError

MANIFEST = "manifest.json"
FORMAT = "abliterate-manifest/1"
MODEL_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".jinja", ".tiktoken", ".gguf", ".py", ".bin")


class ManifestError(AbliterateError):
    """A manifest is missing or malformed, or an input it names is gone or has changed."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def model_dir(source: str) -> Path | None:
    """The local files of a model: its directory or ``.gguf`` file, or the cache snapshot of a hub id (None if
    it is not cached)."""
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve()
    try:
        from transformers.utils import cached_file

        config = cached_file(source, "config.json", _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError):
        return None
    return Path(config).parent.resolve() if config else None


def _model_files(path: Path) -> dict[str, str]:
    if path.is_file():
        return {path.name: sha256_file(path)}
    return {
        p.name: sha256_file(p)
        for p in sorted(path.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in MODEL_SUFFIXES
    }


def model_inputs(source: str) -> dict[str, Any]:
    """``{"source", "path", "files": {name: sha256}}`` of the model ``source`` names."""
    path = model_dir(source)
    return {
        "source": source,
        "local": Path(source).expanduser().exists(),  # else a hub id, found again through the cache
        "path": None if path is None else str(path),
        "files": {} if path is None else _model_files(path),
    }


def _bundled(name: str) -> Any:
    return resources.files("abliterate").joinpath("data", f"{name}.jsonl")


def _source_path(spec: str) -> Path:
    """The file of a prompt source spec (``FILE[:COLUMN]``), parsed as
    :func:`abliterate.behaviours.prompts.load_source` does."""
    return Path(spec if Path(spec).exists() else spec.partition(":")[0])


def prompt_inputs(sources: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """One entry per prompt source (``{"kind": [specs]}``): its spec and the sha256 of its file (bundled: the
    packaged file; ``hf:`` datasets: of the prompts' text as loaded)."""
    entries = []
    for kind, specs in sources.items():
        for spec in specs:
            entry: dict[str, Any] = {"kind": kind, "spec": spec}
            if spec == "bundled" or spec.startswith("bundled:"):
                name = kind if spec == "bundled" else spec.split(":", 1)[1]
                entry.update(
                    bundled=f"data/{name}.jsonl", sha256=hashlib.sha256(_bundled(name).read_bytes()).hexdigest()
                )
            elif spec.startswith("hf:"):
                entry["content_sha256"] = _content_hash(spec)
            else:
                path = _source_path(spec)
                entry.update(path=str(path.resolve()), sha256=sha256_file(path))
            entries.append(entry)
    return entries


def _content_hash(spec: str) -> str:
    from abliterate.behaviours.prompts import load_source

    return hashlib.sha256(json.dumps(load_source(spec)).encode()).hexdigest()


# What the hub adds to a repository and ``hf download --local-dir`` to a copy of it: not the folder's content
HUB_ADDED = (".gitattributes", ".cache/huggingface/")


def _ours(name: str) -> bool:
    return name != MANIFEST and not any(name == h or (h.endswith("/") and name.startswith(h)) for h in HUB_ADDED)


def output_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` except the manifest (and what the hub adds to a downloaded copy:
    ``.gitattributes``, ``.cache/huggingface/``), by POSIX path relative to it."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and _ours(p.relative_to(folder).as_posix())
    }


def write_manifest(
    folder: Path,
    command: str,
    *,
    config: Mapping[str, Any],
    versions: Mapping[str, str],
    model: str | None,
    prompts: Sequence[Mapping[str, Any]] = (),
    files: Mapping[str, Path | None] | None = None,
    edit: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> Path:
    """Write ``folder/manifest.json`` for the files now in ``folder`` (call it last). ``files``: other input files
    by role (``{"directions": path}``); ``edit``: the chosen edit (edit.json's content), read from
    ``folder/edit.json`` when not given."""
    if edit is None and (folder / "edit.json").is_file():
        edit = json.loads((folder / "edit.json").read_text())
    manifest = {
        "format": FORMAT,
        "command": command,
        "seed": seed,
        "config": dict(config),
        "versions": dict(versions),
        "edit": None if edit is None else dict(edit),
        "inputs": {
            "model": None if model is None else model_inputs(model),
            "prompts": [dict(p) for p in prompts],
            "files": {
                role: {"path": str(p.resolve()), "sha256": sha256_file(p)}
                for role, p in (files or {}).items()
                if p is not None
            },
        },
        "outputs": output_hashes(folder),
    }
    path = folder / MANIFEST
    partial = folder / f".{MANIFEST}.tmp"
    try:  # never half a manifest, even when written into a finished folder
        partial.write_text(json.dumps(manifest, indent=2) + "\n")
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise ManifestError(f"{folder} is not a directory; pass an output folder of abliterate")
    if not path.is_file():
        raise ManifestError(f"{folder} has no {MANIFEST}; only folders written by abliterate run/apply/export have one")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); it was damaged, restore it from the original") from exc
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("outputs"), dict)
    ):
        raise ManifestError(f"{path} is not an abliterate manifest ({FORMAT}); restore it from the original")
    return manifest


def verify_folder(folder: str | Path) -> list[str]:
    """One line per difference between ``folder`` and its manifest (missing, changed or unexpected files);
    empty when the folder is exactly what was written."""
    folder = Path(folder)
    recorded: dict[str, str] = read_manifest(folder)["outputs"]
    found = output_hashes(folder)
    problems = []
    for name, digest in recorded.items():
        if name not in found:
            problems.append(f"missing: {name}")
        elif found[name] != digest:
            problems.append(f"changed: {name} (sha256 {found[name][:12]}…, recorded {digest[:12]}…)")
    problems += [f"unexpected: {name} (not in the manifest)" for name in found if name not in recorded]
    return problems


def _differs(what: str, path: str, name: str | None = None) -> ManifestError:
    where = f"{path}/{name}" if name else path
    return ManifestError(f"input {what} {where} has changed (its sha256 differs from the manifest's); restore it")


def check_inputs(manifest: Mapping[str, Any]) -> None:
    """Find every input of ``manifest`` again by its recorded path and check it by hash; raises
    :class:`ManifestError` naming the first one that is missing or differs."""
    inputs = manifest.get("inputs") or {}
    model = inputs.get("model")
    if model:
        path = Path(model["path"]) if model.get("path") else model_dir(model["source"])
        if path is None or not path.exists():
            raise ManifestError(f"input model {model.get('path') or model['source']} is not found; put it back there")
        for name, digest in model["files"].items():
            file = path if path.is_file() else path / name
            if not file.is_file():
                raise ManifestError(f"input model file {file} is not found; restore it")
            if sha256_file(file) != digest:
                raise _differs("model file", str(path), None if path.is_file() else name)
    for p in inputs.get("prompts", []):
        if "bundled" in p:
            name = Path(p["bundled"]).stem
            if hashlib.sha256(_bundled(name).read_bytes()).hexdigest() != p["sha256"]:
                raise ManifestError(
                    f"input prompt set {p['spec']} ({p['kind']}) differs from the manifest's: this abliterate bundles "
                    "other prompts; install the version the manifest records"
                )
        elif "content_sha256" in p:
            if _content_hash(p["spec"]) != p["content_sha256"]:
                raise ManifestError(f"input prompt source {p['spec']} ({p['kind']}) has changed since the run")
        else:
            _check_file(f"prompt file ({p['kind']})", p)
    for role, entry in (inputs.get("files") or {}).items():
        _check_file(role, entry)


def _check_file(what: str, entry: Mapping[str, Any]) -> None:
    path = Path(entry["path"])
    if not path.is_file():
        raise ManifestError(f"input {what} {path} is not found; put it back there")
    if sha256_file(path) != entry["sha256"]:
        raise _differs(what, str(path))


def _tensor_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))


def first_tensor_difference(expected: Path, actual: Path) -> tuple[str | None, int]:
    """``(None, tensors compared)`` when every tensor file of ``expected`` is in ``actual`` with bit-identical
    tensors, else ``(one line naming the first difference, tensors compared)``."""
    from safetensors import safe_open

    want, have = _tensor_files(expected), _tensor_files(actual)
    for name in want:
        if name not in have:
            return f"{name} was not written by the re-run", 0
    count = 0
    for name in want:
        with safe_open(expected / name, "pt") as a, safe_open(actual / name, "pt") as b:
            keys_a, keys_b = list(a.keys()), set(b.keys())
            for key in keys_a:
                if key not in keys_b:
                    return f"{name}: tensor {key} is missing from the re-run", count
                x, y = a.get_tensor(key), b.get_tensor(key)
                count += 1
                if x.shape != y.shape or x.dtype != y.dtype:
                    return f"{name}: tensor {key} is {y.dtype} {tuple(y.shape)}, was {x.dtype} {tuple(x.shape)}", count
                if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
                    delta = (x.double() - y.double()).abs().max().item()
                    return f"{name}: tensor {key} differs (max |difference| {delta:.3g})", count
            extra = sorted(keys_b - set(keys_a))
            if extra:
                return f"{name}: the re-run wrote an extra tensor {extra[0]}", count
    extra_files = [n for n in have if n not in want]
    if extra_files:
        return f"the re-run wrote an extra tensor file {extra_files[0]}", count
    return None, count


def edit_difference(expected: Path, actual: Path) -> str | None:
    """One line when the two folders' ``edit.json`` specs differ (the search chose another edit), else None."""
    a, b = expected / "edit.json", actual / "edit.json"
    if not a.is_file() and not b.is_file():
        return None
    if a.is_file() != b.is_file():
        return "edit.json is in only one of the two folders"
    spec_a, spec_b = json.loads(a.read_text()).get("spec"), json.loads(b.read_text()).get("spec")
    if spec_a != spec_b:
        return "the re-run chose another edit (edit.json's spec differs)"
    return None
