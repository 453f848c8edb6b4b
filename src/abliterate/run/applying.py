"""Applying a saved direction (or a run's ``edit.json``) to a model: live through hooks, to the weights in memory
or shard by shard. What ``abliterate apply``, ``chat`` and ``export`` call; nothing here prints."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abliterate.errors import DirectionError, OptionError

ProgressFn = Callable[[str, int, int], None]


def load_direction(path: Path, layer: int | None, position: int | None) -> tuple[Any, float | None]:
    """The unit direction to use and, if recorded, the harmful prompts' mean projection on it."""
    from abliterate.measure.directions import DirectionSet

    ds = DirectionSet.load(path)
    if layer is None:
        chosen = ds.meta.get("chosen")
        if not chosen:
            raise DirectionError(f"{path} records no chosen layer; pass --layer N")
        layer, position = chosen["layer"], chosen["position"] if position is None else position
    direction = ds[layer, position if position is not None else ds.positions[-1]]
    projections = ds.meta.get("harmful_projection")
    return direction, (float(projections[direction.layer]) if projections else None)


def check_hidden(direction: Any, lm: Any, model: str) -> None:
    """Refuse a direction computed for a model of another width."""
    size = direction.vector.shape[-1]
    if size != lm.hidden_size:
        raise DirectionError(
            f"direction has hidden size {size} but {model} has {lm.hidden_size}; it was computed for another model"
        )


def load_edit(path: Path) -> tuple[Any, dict[str, Any]]:
    """The :class:`EditSpec` of an ``edit.json`` written by ``run`` (``{"spec": {...}, ...}``), and its content."""
    from abliterate.edit.spec import EditSpec

    try:
        data = json.loads(path.read_text())
        spec = EditSpec.from_dict(data["spec"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OptionError(
            f"{path} is not an edit.json written by run ({exc}); pass the edit.json of a run's output"
        ) from None
    return spec, data


def direction_record(direction: Any) -> dict[str, Any]:
    """Where a saved direction comes from, as manifests record it."""
    return {"layer": direction.layer, "position": direction.position, "method": direction.method}


def seal_apply(
    folder: str | Path, settings: dict[str, Any], directions_file: Path, edit: Path | None, direction: Any
) -> None:
    """Write the manifest of a finished ``apply`` output (the model written by ``lm.save`` or a streaming edit):
    ``settings`` are apply's options, the edit is ``edit.json``'s or ``direction`` with the settings' scale."""
    from abliterate.outputs.manifest import write_manifest
    from abliterate.run.pipeline import versions

    if edit is not None:
        chosen = json.loads(edit.read_text())
    else:
        chosen = {
            "direction": direction_record(direction),
            **{k: settings.get(k) for k in ("mode", "scale", "coefficient", "norm_preserving")},
        }
    write_manifest(
        Path(folder),
        "apply",
        config=settings,
        versions=versions(),
        model=str(settings["model"]),
        files={"directions": directions_file, "edit": edit},
        edit=chosen,
    )


@dataclass
class ApplyOptions:
    """What ``abliterate apply`` was asked to do (its flags; ``where`` are the load_model placement kwargs)."""

    model: str
    directions_file: Path | None
    out_dir: str | None = None
    layer: int | None = None
    position: int | None = None
    mode: str = "ablate"
    scale: float = 1.0
    coefficient: float | None = None
    norm_preserving: bool = False
    runtime_check: list[str] | None = None
    stream: bool = False
    verify: bool = True
    residual_stream: bool = False
    force: bool = False
    edit: Path | None = None
    where: dict[str, Any] = field(default_factory=dict)
    gguf: bool = True
    gguf_type: str = "auto"

    def check(self) -> None:
        """Refuse options that do not fit together, before anything is read or loaded."""
        from abliterate.outputs.gguf_out import check_gguf_type

        check_gguf_type(self.gguf_type)
        if self.edit is not None and self.edit.is_dir():  # a run's folder: its edit.json and directions
            if self.directions_file is None:
                self.directions_file = self.edit / "directions.safetensors"
            self.edit = self.edit / "edit.json"
        if self.directions_file is None:
            raise OptionError("no directions: pass directions.safetensors, or --edit RUN_DIR (a run's output folder)")
        if self.mode not in ("ablate", "induce"):
            raise OptionError(f"unknown mode '{self.mode}'; use ablate or induce")
        if self.scale < 0:
            raise OptionError(f"scale must be >= 0, got {self.scale}")
        if not self.runtime_check and not self.out_dir:
            raise OptionError(
                "nothing to do: pass --out DIR to write edited weights or --runtime-check PROMPT to try it live"
            )
        if self.residual_stream and (self.out_dir or self.stream or self.edit is not None):
            raise OptionError(
                "--residual-stream acts at run time only: use it with --runtime-check, without --out, --stream or "
                "--edit"
            )
        if not self.verify and not self.stream:
            raise OptionError("--no-verify applies to --stream only (a model loaded in memory is always checked)")

    def settings(self) -> dict[str, Any]:
        """The options recorded in the output's manifest."""
        return {
            "model": self.model,
            "directions": str(self.directions_file),
            "mode": self.mode,
            "layer": self.layer,
            "position": self.position,
            "scale": self.scale,
            "coefficient": self.coefficient,
            "norm_preserving": self.norm_preserving,
            "stream": self.stream,
            "edit": None if self.edit is None else str(self.edit),
        }

    def target(self) -> Path | None:
        """The checked output folder (None without --out)."""
        from abliterate.lm.saving import check_output

        if not self.out_dir:
            return None
        model = Path(self.model)
        return check_output(self.out_dir, overwrite=self.force, inputs=(model if model.exists() else None,))


@dataclass
class Applied:
    """What an apply did: the folder written (with the tensors a streaming edit changed and its seconds), or the
    answers to the runtime-check prompts."""

    out: Path | None = None
    edited: int | None = None
    seconds: float | None = None
    responses: list[str] | None = None


def _stream_progress(progress: ProgressFn | None) -> Callable[[int, int], None] | None:
    return (lambda done, total: progress("stream edit", done, total)) if progress else None


def apply_saved(opts: ApplyOptions, progress: ProgressFn | None = None) -> Applied:
    """Carry out ``opts`` (checked with :meth:`ApplyOptions.check`): the recorded edit with ``--edit``, else one
    direction removed (or induced) at run time, in memory, or shard by shard with ``--stream``."""
    if opts.edit is not None:
        return apply_edit_file(opts, progress)
    if opts.stream:
        return _stream_direction(opts, progress)
    from abliterate.edit.interventions import ablate, induce
    from abliterate.edit.weights import bake_induction, orthogonalize
    from abliterate.lm.loading import load_model

    target = opts.target()
    direction, recorded = load_direction(opts.directions_file, opts.layer, opts.position)
    if opts.mode == "induce" and opts.coefficient is None and recorded is None:
        raise DirectionError(f"{opts.directions_file} records no harmful projection; pass --coefficient C for induce")
    lm = load_model(opts.model, residual_only=opts.residual_stream, **opts.where)
    check_hidden(direction, lm, opts.model)
    coeff = opts.scale * (opts.coefficient if opts.coefficient is not None else (recorded or 0.0))
    if opts.runtime_check:
        live = (
            ablate(lm, direction, scale=opts.scale)
            if opts.mode == "ablate"
            else induce(lm, direction, coeff, layers=range(lm.num_layers))
        )
        with live:
            return Applied(responses=lm.generate(opts.runtime_check, max_new_tokens=64))
    plan = None
    if opts.mode == "ablate":
        from abliterate.edit.direction_edit import DirectionEdit

        plan = DirectionEdit(direction, None, opts.scale, None, None, opts.norm_preserving).plan(lm)
        orthogonalize(lm, direction, scale=opts.scale, norm_preserving=opts.norm_preserving)
    else:
        last = direction.layer if direction.layer < lm.num_layers else lm.num_layers - 1
        bake_induction(lm, direction, coeff, through_layer=last)
    assert target is not None
    lm.save(target, overwrite=opts.force)
    record = {"direction": direction_record(direction), "scale": opts.scale, "norm_preserving": opts.norm_preserving}
    _gguf_beside(opts, target, lm, plan, record)
    seal_apply(target, opts.settings(), opts.directions_file, None, direction)
    return Applied(out=target)


def _gguf_beside(opts: ApplyOptions, target: Path, lm: Any, plan: Any, edit: dict[str, Any]) -> None:
    """``apply`` of a ``.gguf`` model: the edited model also as ``<name>-abliterated.gguf`` in the output folder."""
    from abliterate.outputs.gguf_out import is_gguf, write_run_gguf

    if opts.gguf and plan is not None and is_gguf(opts.model):
        write_run_gguf(target, Path(opts.model), plan, lm.hidden_size, gguf_type=opts.gguf_type, edit=edit)


def _stream_direction(opts: ApplyOptions, progress: ProgressFn | None) -> Applied:
    """``apply --stream``: one direction removed from a local safetensors checkpoint shard by shard."""
    from abliterate.checkpoint.stream_edit import stream_orthogonalize

    if opts.mode != "ablate" or opts.runtime_check:
        raise OptionError("--stream edits weights only (mode ablate, no --runtime-check)")
    direction, _ = load_direction(opts.directions_file, opts.layer, opts.position)
    report = stream_orthogonalize(
        opts.model,
        opts.out_dir,
        direction,
        scale=opts.scale,
        norm_preserving=opts.norm_preserving,
        overwrite=opts.force,
        progress=_stream_progress(progress),
        verify=opts.verify,
    )
    seal_apply(report.out_dir, opts.settings(), opts.directions_file, None, direction)
    return Applied(out=report.out_dir, edited=len(report.edited), seconds=report.seconds)


def apply_edit_file(opts: ApplyOptions, progress: ProgressFn | None = None) -> Applied:
    """``apply --edit``: the edit ``run`` chose (edit.json), built from the saved direction set."""
    from abliterate.edit.plan import Directions, applied, apply_plan, build_plan
    from abliterate.lm.loading import load_model
    from abliterate.measure.directions import DirectionSet

    assert opts.edit is not None
    as_given = (opts.mode, opts.layer, opts.position, opts.scale, opts.norm_preserving)
    if as_given != ("ablate", None, None, 1.0, False):
        raise OptionError(
            "--edit applies the recorded edit as it is; drop --mode/--layer/--position/--scale/--norm-preserving"
        )
    spec, recorded = load_edit(opts.edit)
    assert opts.directions_file is not None
    source = Directions.from_sets(DirectionSet.load(opts.directions_file))
    settings = {"model": opts.model, "edit": str(opts.edit), "stream": opts.stream}
    if opts.stream and opts.model.lower().endswith(".gguf"):
        return _stream_gguf(opts, spec, source, recorded, progress)
    if opts.stream:
        from abliterate.checkpoint.stream_edit import stream_edit

        report = stream_edit(
            opts.model,
            opts.out_dir,
            spec,
            source,
            overwrite=opts.force,
            progress=_stream_progress(progress),
            verify=opts.verify,
        )
        seal_apply(report.out_dir, settings, opts.directions_file, opts.edit, None)
        return Applied(out=report.out_dir, edited=len(report.edited), seconds=report.seconds)
    target = opts.target()
    lm = load_model(opts.model, **opts.where)
    if opts.runtime_check:
        with applied(lm, spec, source, mode="hooks"):
            return Applied(responses=lm.generate(opts.runtime_check, max_new_tokens=64))
    plan = build_plan(lm, spec, source)
    apply_plan(lm, plan, mode="weights")
    assert target is not None
    lm.save(target, overwrite=opts.force)
    _gguf_beside(opts, target, lm, plan, recorded)
    seal_apply(target, settings, opts.directions_file, opts.edit, None)
    return Applied(out=target)


def _stream_gguf(opts: ApplyOptions, spec: Any, source: Any, recorded: dict[str, Any], progress: Any) -> Applied:
    """``apply --stream model.gguf --edit RUN_DIR --out x.gguf``: the run's edit written into a copy of the GGUF,
    tensor by tensor; a run folder's config.json names the architecture the GGUF must have."""
    from abliterate.checkpoint.gguf_stream import stream_gguf_edit

    assert opts.edit is not None and opts.out_dir is not None
    started = time.perf_counter()
    config = opts.edit.parent / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    written = stream_gguf_edit(
        opts.model,
        opts.out_dir,
        spec,
        source,
        gguf_type=opts.gguf_type,
        edit=recorded,
        overwrite=opts.force,
        verify=opts.verify,
        model_type=model_type,
        progress=_stream_progress(progress),
    )
    return Applied(out=written.path, edited=len(written.edited), seconds=time.perf_counter() - started)
