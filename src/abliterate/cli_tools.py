"""``abliterate measure``, ``apply`` and ``export``."""

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .cli_common import (
    BEHAVIOUR_OPT,
    CONFIG_OPT,
    DEVICE_MAP_OPT,
    DEVICE_OPT,
    DTYPE_OPT,
    MAX_MEMORY_OPT,
    OFFLOAD_OPT,
    PREFIX_OPT,
    QUANTIZE_OPT,
    RESIDUAL_OPT,
    STATE,
    THINKING_OPT,
    Opt,
    _cfg,
    app,
    fail,
    guarded,
    out,
    placement,
    progress_bars,
    wrote,
)
from .cli_share import ENDPOINT_OPT, PUBLIC_OPT, PUSH_OPT, pushes_output, seal_apply


def _direction(path: Path, layer: int | None, position: int | None) -> tuple[Any, float | None]:
    """The unit direction to use and, if recorded, the harmful prompts' mean projection on it."""
    from .directions import DirectionSet

    ds = DirectionSet.load(path)
    if layer is None:
        chosen = ds.meta.get("chosen")
        if not chosen:
            fail(f"{path} records no chosen layer; pass --layer N")
        layer, position = chosen["layer"], chosen["position"] if position is None else position
    direction = ds[layer, position if position is not None else ds.positions[-1]]
    projections = ds.meta.get("harmful_projection")
    return direction, (float(projections[direction.layer]) if projections else None)


def _check_hidden(direction: Any, lm: Any, model: str) -> None:
    size = direction.vector.shape[-1]
    if size != lm.hidden_size:
        fail(f"direction has hidden size {size} but {model} has {lm.hidden_size}; it was computed for another model")


@app.command()
@guarded
def measure(
    model: Annotated[str, typer.Argument(help="Hub id, local model directory or .gguf file.")],
    out_dir: Annotated[str, Opt("--out", "-o", help="Output directory for directions and the candidate table.")],
    config: CONFIG_OPT = None,
    methods: Annotated[list[str] | None, Opt("--method", help="mean_diff, slerp or projected (repeatable).")] = None,
    layers: Annotated[list[int] | None, Opt("--layer", help="Restrict candidate layers (repeatable).")] = None,
    positions: Annotated[
        list[int] | None, Opt("--position", help="Token offsets from the prompt end (repeatable).")
    ] = None,
    n_train: Annotated[int | None, Opt(help="Prompts per side that build the direction.")] = None,
    n_val: Annotated[int | None, Opt(help="Validation prompts per side.")] = None,
    behaviour: BEHAVIOUR_OPT = None,
    disable_thinking: THINKING_OPT = None,
    response_prefix: PREFIX_OPT = None,
    dtype: DTYPE_OPT = None,
    device: DEVICE_OPT = None,
    device_map: DEVICE_MAP_OPT = None,
    max_memory: MAX_MEMORY_OPT = None,
    offload_folder: OFFLOAD_OPT = None,
    quantize: QUANTIZE_OPT = None,
    residual_stream: RESIDUAL_OPT = False,
    force: Annotated[bool | None, Opt("--force", help="Replace an existing output directory.")] = None,
) -> None:
    """Compute directions and the candidate table only (no edit, no generation).

    Writes directions.safetensors (+ .json, with the chosen candidate), candidates.json, abliterate_config.json
    and report.html (candidate and direction plots, also as candidates.png and directions.png).

    Example: abliterate measure Qwen/Qwen2.5-0.5B-Instruct --out qwen-directions --position -1 --position -2
    """
    from .pipeline import load_for, resolve, write_measurement
    from .pipeline import measure as run_measure
    from .saving import check_output

    cfg = _cfg(
        config,
        model=model,
        out=out_dir,
        methods=methods,
        layers=layers,
        positions=positions,
        n_train=n_train,
        n_val=n_val,
        behaviour=behaviour,
        disable_thinking=disable_thinking,
        response_prefix=response_prefix,
        force=force,
        dtype=dtype,
        device=device,
        device_map=device_map,
        max_memory=max_memory,
        offload_folder=offload_folder,
        quantize=quantize,
    )
    target = check_output(cfg.out, overwrite=cfg.force, inputs=(Path(cfg.model) if Path(cfg.model).exists() else None,))
    lm = load_for(cfg, residual_only=residual_stream)
    ctx = resolve(cfg)
    with progress_bars() as progress:
        acts, sel = run_measure(ctx, lm, progress)
    wrote(write_measurement(target, ctx, acts, sel))
    if STATE["json"]:
        out().print_json(json.dumps(sel.to_dict()))
        return
    table = Table(title=f"candidates ({sel.seconds:.0f} s)")
    for col in ("method", "layer", "pos", "bypass", "induce", "KL", "filtered because"):
        table.add_column(col)
    for c in sel.candidates if STATE["verbose"] else [c for c in sel.candidates if c.passed][:10]:
        table.add_row(
            c.method, str(c.layer), str(c.position), f"{c.bypass:.2f}", f"{c.induce:.2f}", f"{c.kl:.4f}", c.reason
        )
    out().print(table)
    out().print(sel.note)
    out().print(f"wrote [bold]{target}[/]")


@app.command()
@guarded
@pushes_output
def apply(
    model: Annotated[str, typer.Argument(help="Model to edit (hub id, directory or .gguf).")],
    directions_file: Annotated[Path, typer.Argument(help="directions.safetensors from measure or run.")],
    out_dir: Annotated[str | None, Opt("--out", "-o", help="Where to write the edited model.")] = None,
    layer: Annotated[int | None, Opt(help="Direction layer (default: the chosen one recorded in the file).")] = None,
    position: Annotated[int | None, Opt(help="Direction position (default: the recorded/last one).")] = None,
    mode: Annotated[
        str, Opt(help="ablate (remove refusal) or induce (add it, through the embedding bias).")
    ] = "ablate",
    scale: Annotated[float, Opt(help="Fraction removed (ablate) or multiplier of the induce coefficient.")] = 1.0,
    coefficient: Annotated[
        float | None,
        Opt(help="Induce: the component to pin (default: the harmful mean projection recorded in the file)."),
    ] = None,
    norm_preserving: Annotated[bool, Opt("--norm-preserving", help="Keep each writer's per-input norm.")] = False,
    runtime_check: Annotated[
        list[str] | None,
        Opt(
            "--runtime-check",
            help="Print responses to this prompt with runtime hooks instead of writing weights (repeatable).",
        ),
    ] = None,
    stream: Annotated[
        bool, Opt("--stream", help="Edit a local safetensors checkpoint shard by shard (peak RSS ~ one shard).")
    ] = False,
    no_verify: Annotated[
        bool,
        Opt(
            "--no-verify",
            help="With --stream: skip the anatomy check on a small copy of the checkpoint's architecture and edit "
            "the writers the name patterns find.",
        ),
    ] = False,
    dtype: DTYPE_OPT = None,
    device: DEVICE_OPT = None,
    device_map: DEVICE_MAP_OPT = None,
    max_memory: MAX_MEMORY_OPT = None,
    offload_folder: OFFLOAD_OPT = None,
    quantize: QUANTIZE_OPT = None,
    residual_stream: RESIDUAL_OPT = False,
    force: Annotated[bool, Opt("--force", help="Replace an existing output directory.")] = False,
    edit: Annotated[
        Path | None,
        Opt(
            "--edit",
            help="edit.json from run: apply its searched edit (kernels, k, embedding, norm preservation) "
            "instead of --layer/--position/--scale/--norm-preserving.",
        ),
    ] = None,
    push_to_hub: PUSH_OPT = None,
    public: PUBLIC_OPT = False,
    endpoint: ENDPOINT_OPT = None,
) -> None:
    """Apply a saved direction to a model: at run time (--runtime-check) or to the weights (--out).

    --push-to-hub REPO_ID uploads the --out folder once it is written (see abliterate push).

    Examples:
      abliterate apply Qwen/Qwen2.5-0.5B-Instruct run-out/directions.safetensors --out edited
      abliterate apply ./Llama-3.1-70B-Instruct dirs.safetensors --stream --out llama-70b-abliterated
      abliterate apply Qwen/Qwen2.5-0.5B-Instruct dirs.safetensors --layer 14 --runtime-check "How do I pick a lock?"
    """
    from .interventions import ablate, induce
    from .loading import load_model
    from .saving import check_output
    from .weights import bake_induction, orthogonalize

    if mode not in ("ablate", "induce"):
        fail(f"unknown mode '{mode}'; use ablate or induce")
    if scale < 0:
        fail(f"scale must be >= 0, got {scale}")
    if not runtime_check and not out_dir:
        fail("nothing to do: pass --out DIR to write edited weights or --runtime-check PROMPT to try it live")
    if residual_stream and (out_dir or stream or edit is not None):
        fail("--residual-stream acts at run time only: use it with --runtime-check, without --out, --stream or --edit")
    settings = {
        "model": model,
        "directions": str(directions_file),
        "mode": mode,
        "layer": layer,
        "position": position,
        "scale": scale,
        "coefficient": coefficient,
        "norm_preserving": norm_preserving,
        "stream": stream,
        "edit": None if edit is None else str(edit),
    }
    if no_verify and not stream:
        fail("--no-verify applies to --stream only (a model loaded in memory is always checked)")
    if edit is not None:
        _apply_edit(
            model,
            directions_file,
            edit,
            out_dir,
            runtime_check,
            stream,
            mode,
            force,
            layer,
            position,
            scale,
            norm_preserving,
            placement(dtype, device, device_map, max_memory, offload_folder, quantize),
            verify=not no_verify,
        )
        return
    if stream:
        if mode != "ablate" or runtime_check:
            fail("--stream edits weights only (mode ablate, no --runtime-check)")
        from .streaming import stream_orthogonalize

        direction, _ = _direction(directions_file, layer, position)
        with progress_bars() as progress:
            report = stream_orthogonalize(
                model,
                out_dir,
                direction,
                scale=scale,
                norm_preserving=norm_preserving,
                overwrite=force,
                progress=(lambda done, total: progress("stream edit", done, total)) if progress else None,
                verify=not no_verify,
            )
        seal_apply(report.out_dir, settings, directions_file, None, direction)
        wrote(report.out_dir)
        out().print(f"wrote [bold]{report.out_dir}[/] ({len(report.edited)} tensors edited, {report.seconds:.0f} s)")
        return
    target = (
        check_output(out_dir, overwrite=force, inputs=(Path(model) if Path(model).exists() else None,))
        if out_dir
        else None
    )
    direction, recorded = _direction(directions_file, layer, position)
    if mode == "induce" and coefficient is None and recorded is None:
        fail(f"{directions_file} records no harmful projection; pass --coefficient C for induce")
    lm = load_model(
        model,
        residual_only=residual_stream,
        **placement(dtype, device, device_map, max_memory, offload_folder, quantize),
    )
    _check_hidden(direction, lm, model)
    coeff = scale * (coefficient if coefficient is not None else (recorded or 0.0))
    if runtime_check:
        ctx = (
            ablate(lm, direction, scale=scale)
            if mode == "ablate"
            else induce(lm, direction, coeff, layers=range(lm.num_layers))
        )
        with ctx:
            responses = lm.generate(runtime_check, max_new_tokens=64)
        for prompt, response in zip(runtime_check, responses, strict=True):
            out().print(f"[bold]> {prompt}[/]\n{response}\n")
        return
    if mode == "ablate":
        orthogonalize(lm, direction, scale=scale, norm_preserving=norm_preserving)
    else:
        bake_induction(
            lm,
            direction,
            coeff,
            through_layer=direction.layer if direction.layer < lm.num_layers else lm.num_layers - 1,
        )
    assert target is not None
    lm.save(target, overwrite=force)
    seal_apply(target, settings, directions_file, None, direction)
    wrote(target)
    out().print(f"wrote [bold]{target}[/]")


def _apply_edit(
    model: str,
    directions_file: Path,
    edit: Path,
    out_dir: str | None,
    runtime_check: list[str] | None,
    stream: bool,
    mode: str,
    force: bool,
    layer: int | None,
    position: int | None,
    scale: float,
    norm_preserving: bool,
    where: dict[str, Any],
    verify: bool = True,
) -> None:
    """``apply --edit``: the edit ``run`` chose (edit.json), built from the saved direction set."""
    from .directions import DirectionSet
    from .loading import load_model
    from .plan import Directions, applied, apply_plan, build_plan
    from .saving import check_output
    from .space import EditSpec

    if mode != "ablate" or layer is not None or position is not None or scale != 1.0 or norm_preserving:
        fail("--edit applies the recorded edit as it is; drop --mode/--layer/--position/--scale/--norm-preserving")
    try:
        spec = EditSpec.from_dict(json.loads(edit.read_text())["spec"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        fail(f"{edit} is not an edit.json written by run ({exc}); pass the edit.json of a run's output")
    source = Directions.from_sets(DirectionSet.load(directions_file))
    if stream:
        from .streaming import stream_edit

        with progress_bars() as progress:
            report = stream_edit(
                model,
                out_dir,
                spec,
                source,
                overwrite=force,
                progress=(lambda done, total: progress("stream edit", done, total)) if progress else None,
                verify=verify,
            )
        seal_apply(report.out_dir, {"model": model, "edit": str(edit), "stream": True}, directions_file, edit, None)
        wrote(report.out_dir)
        out().print(f"wrote [bold]{report.out_dir}[/] ({len(report.edited)} tensors edited, {report.seconds:.0f} s)")
        return
    target = (
        check_output(out_dir, overwrite=force, inputs=(Path(model) if Path(model).exists() else None,))
        if out_dir
        else None
    )
    lm = load_model(model, **where)
    if runtime_check:
        with applied(lm, spec, source, mode="hooks"):
            responses = lm.generate(runtime_check, max_new_tokens=64)
        for prompt, response in zip(runtime_check, responses, strict=True):
            out().print(f"[bold]> {prompt}[/]\n{response}\n")
        return
    apply_plan(lm, build_plan(lm, spec, source), mode="weights")
    assert target is not None
    lm.save(target, overwrite=force)
    seal_apply(target, {"model": model, "edit": str(edit), "stream": False}, directions_file, edit, None)
    wrote(target)
    out().print(f"wrote [bold]{target}[/]")
