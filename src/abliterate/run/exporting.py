"""What ``abliterate export`` writes: a llama.cpp control vector (.gguf) of a direction set, or the ablation as a
PEFT LoRA adapter folder with its manifest. Nothing here prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from abliterate.errors import OptionError, OutputError


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
