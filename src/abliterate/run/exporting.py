"""What ``abliterate export`` writes: a llama.cpp control vector (.gguf) of a direction set, the ablation as a
PEFT LoRA adapter folder with its manifest, or a finished run's edit written into its GGUF. Nothing here prints."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abliterate.errors import OptionError, OutputError

DIRECTIONS = "directions.safetensors"
EDIT = "edit.json"


@dataclass
class PeftSource:
    """What ``export --format peft`` adapts: the base ``model``, the ``directions`` file, the ``edit`` (an
    ``edit.json``; None: one direction) and a ``note`` the CLI prints as a warning (None: nothing to say)."""

    model: str
    directions: Path
    edit: Path | None
    note: str | None = None


def peft_source(path: Path, *, model: str | None, edit: Path | None, one_direction: bool) -> PeftSource:
    """Resolve ``export PATH --format peft``. ``path`` is a direction file or an output folder of ``run``/``measure``.
    The edit the run wrote (``edit.json`` in that folder, or beside the direction file) is exported unless
    ``edit`` names another or ``one_direction`` (``--layer``/``--position``/``--scale`` given) asks for one
    direction, which then comes with a note that the adapter is not the written edit. ``model`` overrides the base
    model the folder records (its manifest, else its ``abliterate_config.json``)."""
    folder = path if path.is_dir() else path.parent
    directions = path / DIRECTIONS if path.is_dir() else path
    if not directions.is_file():
        raise OptionError(
            f"{path} has no {DIRECTIONS}; pass the output folder of a run (or measure) or its direction file"
        )
    written = folder / EDIT
    note = None
    if edit is None and written.is_file():
        if one_direction:
            note = (
                f"this adapter removes one direction (--layer/--position/--scale), not the edit the run wrote "
                f"({written}); base + adapter will differ from the run's model: drop those options to export that edit"
            )
        else:
            edit = written
    return PeftSource(model or recorded_model(folder), directions, edit, note)


def recorded_model(folder: Path) -> str:
    """The base model an output folder was made from, as its manifest records it (a local path while that path
    exists, else the hub id) or, without a manifest, as its ``abliterate_config.json`` names it."""
    from abliterate.outputs.manifest import MANIFEST, ManifestError, check_inputs, read_manifest

    if (folder / MANIFEST).is_file():
        model = read_manifest(folder).get("inputs", {}).get("model") or {}
        local = model.get("path") if model.get("local") else None
        if local and not Path(local).exists():
            raise OptionError(
                f"the base model {folder} was made from, {local}, is gone; pass --model (the same model) to export"
            )
        if local:  # the adapter is read off its weights: they must be the ones the run edited
            try:
                check_inputs({"inputs": {"model": model}})
            except ManifestError as exc:
                raise OptionError(f"{exc}, or pass --model to adapt another base") from None
        if local or model.get("source"):
            return str(local or model["source"])
    config = folder / "abliterate_config.json"
    try:
        name = json.loads(config.read_text())["config"]["model"] if config.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        name = None
    if not name:
        raise OptionError(f"--format peft needs --model (the base model the adapter is for): {folder} records none")
    return str(name)


def write_peft_adapter(
    model: str,
    directions_file: Path,
    out_dir: Path,
    *,
    edit: Path | None,
    direction: Any,
    scale: float,
    force: bool,
) -> tuple[Path, Any]:
    """The edit (``edit.json``'s, else ``direction`` removed from every writer and the embeddings at ``scale``, as
    ``apply`` does) as a PEFT LoRA adapter folder with its manifest; returns the folder and the :class:`Adapter`."""
    from abliterate.edit.direction_edit import edit_plan
    from abliterate.edit.plan import Directions, build_plan
    from abliterate.lm.loading import load_model
    from abliterate.lm.saving import atomic_directory, check_output
    from abliterate.measure.directions import DirectionSet
    from abliterate.outputs.adapter import Adapter, check_spec
    from abliterate.outputs.manifest import write_manifest
    from abliterate.run.applying import direction_record, load_edit
    from abliterate.run.pipeline import versions

    target = check_output(out_dir, overwrite=force, inputs=(Path(model) if Path(model).exists() else None,))
    spec, recorded = load_edit(edit) if edit is not None else (None, None)
    if spec is not None:
        check_spec(spec)  # before loading the model
    lm = load_model(model)
    if spec is not None and recorded is not None:
        plan = build_plan(lm, spec, Directions.from_sets(DirectionSet.load(directions_file)))
        chosen: dict[str, Any] = recorded
    else:
        plan = edit_plan(lm, direction, None, scale, None, None)
        chosen = {"direction": direction_record(direction), "scale": scale}
    adapter = Adapter.of(lm, plan)
    settings = {"format": "peft", "model": model, "directions": str(directions_file), "scale": scale}
    with atomic_directory(target) as tmp:
        adapter.write(tmp)
        write_manifest(
            tmp,
            "export",
            config={**settings, "edit": None if edit is None else str(edit)},
            versions=versions(),
            model=model,
            files={"directions": directions_file, "edit": edit},
            edit=chosen,
        )
    return target, adapter


def write_control_vector(
    directions_file: Path,
    out_file: Path,
    *,
    model: str | None,
    model_hint: str | None,
    layers: list[int] | None,
    position: int | None,
    scale: float,
    force: bool,
) -> tuple[Path, str]:
    """``export --format gguf``: the direction set as a llama.cpp control vector, for the architecture of ``model``
    (its config) or ``model_hint``; returns the file written and the architecture name."""
    from abliterate.measure.directions import DirectionSet
    from abliterate.outputs.control_vector import export_control_vector, model_hint_for

    if out_file.exists() and not force:
        raise OutputError(f"{out_file} already exists; pass --force to replace it")
    if (model is None) == (model_hint is None):
        raise OptionError("pass exactly one of --model (to read its architecture) or --model-hint")
    if model is not None:
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(model).model_type
        except (OSError, ValueError) as exc:
            raise OptionError(f"cannot read the config of {model}: {str(exc).splitlines()[0]}") from None
        model_hint = model_hint_for(model_type)
    ds = DirectionSet.load(directions_file)
    if position is None:
        position = (ds.meta.get("chosen") or {}).get("position", ds.positions[0])
    path = export_control_vector(
        ds, out_file, model_hint=str(model_hint), scale=scale, layers=layers, position=position
    )
    return path, str(model_hint)


def write_model_gguf(
    run_dir: Path, out_file: Path, *, model: str | None, gguf_type: str, force: bool, progress: Any = None
) -> Any:
    """``export RUN_DIR --format gguf``: the run's edit (edit.json + directions.safetensors) written into a copy of
    the GGUF it was found on (the run's model, or ``model``), tensor by tensor; returns the
    :class:`~abliterate.checkpoint.gguf_file.Written` file."""
    import json

    from abliterate.checkpoint.gguf_stream import stream_gguf_edit
    from abliterate.edit.plan import Directions
    from abliterate.measure.directions import DirectionSet
    from abliterate.outputs.gguf_out import check_gguf_type
    from abliterate.run.applying import load_edit

    check_gguf_type(gguf_type)
    edit_file, directions = run_dir / "edit.json", run_dir / "directions.safetensors"
    if not edit_file.is_file() or not directions.is_file():
        raise OptionError(f"{run_dir} is not a finished run's folder (no edit.json/directions.safetensors); pass one")
    if model is None:
        config = run_dir / "abliterate_config.json"
        model = json.loads(config.read_text())["config"]["model"] if config.is_file() else None
    if model is None or not str(model).lower().endswith(".gguf"):
        raise OptionError(f"the run in {run_dir} was not made on a .gguf model; pass the GGUF to write with --model")
    spec, recorded = load_edit(edit_file)
    model_config = run_dir / "config.json"
    model_type = json.loads(model_config.read_text()).get("model_type") if model_config.is_file() else None
    return stream_gguf_edit(
        model,
        out_file,
        spec,
        Directions.from_sets(DirectionSet.load(directions)),
        gguf_type=gguf_type,
        edit=recorded,
        overwrite=force,
        model_type=model_type,
        progress=progress,
    )
