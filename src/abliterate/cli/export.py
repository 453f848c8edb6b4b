"""``abliterate export``: a llama.cpp control vector, or the ablation as a PEFT LoRA adapter folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from abliterate.cli.common import Opt, app, err, fail, guarded, out, wrote
from abliterate.cli.share import ENDPOINT_OPT, PUBLIC_OPT, PUSH_OPT, hub_destination, upload


# Long only for its option list and help text (typer reads both from the signature and docstring); the body is thin.
@app.command()
@guarded
def export(
    directions_file: Annotated[
        Path,
        typer.Argument(help="directions.safetensors from measure or run (--format peft: or the run's output folder)."),
    ],
    out_file: Annotated[
        Path, Opt("--out", "-o", help="The control-vector .gguf to write (--format peft: the adapter folder).")
    ],
    model: Annotated[
        str | None,
        Opt(help="Model the directions came from (gguf: its config gives the architecture; peft: the base to adapt)."),
    ] = None,
    model_hint: Annotated[
        str | None, Opt(help="llama.cpp architecture name, e.g. llama, qwen2 (instead of --model).")
    ] = None,
    layers: Annotated[
        list[int] | None,
        Opt(
            "--layer",
            help="gguf: residual points to export (default: every one llama.cpp can steer); "
            "peft: the direction's layer (default: the chosen one).",
        ),
    ] = None,
    position: Annotated[int | None, Opt(help="Captured position to export (default: the chosen or first one).")] = None,
    scale: Annotated[float, Opt(help="gguf: multiplier of each unit direction; peft: fraction removed.")] = 1.0,
    fmt: Annotated[
        str, Opt("--format", help="gguf (llama.cpp control vector) or peft (LoRA adapter of the ablation).")
    ] = "gguf",
    edit: Annotated[
        Path | None,
        Opt("--edit", help="peft: edit.json from run: export its searched edit instead of --layer/--position/--scale."),
    ] = None,
    gguf_type: Annotated[
        str,
        Opt("--gguf-type", help="gguf of a run folder: the edited tensors' type (auto, F32, F16, BF16, Q8_0, ...)."),
    ] = "auto",
    force: Annotated[bool, Opt("--force", help="Replace an existing file.")] = False,
    push_to_hub: PUSH_OPT = None,
    public: PUBLIC_OPT = False,
    endpoint: ENDPOINT_OPT = None,
) -> None:
    """Export a direction set as a llama.cpp control vector, or the ablation as a PEFT LoRA adapter.

    --format gguf: point p (input of layer p) is written as llama.cpp's direction.(p-1), for --control-vector /
    --control-vector-scaled. Given a run's folder instead of a direction file, --format gguf writes the run's edit
    into a copy of the GGUF the run was made on (or --model GGUF), tensor by tensor: the abliterated model for
    llama.cpp and Ollama (--gguf-type: the edited tensors' type).

    --format peft: the edit is a rank-k update of each edited module, written exactly as a LoRA adapter
    (adapter_config.json + adapter_model.safetensors, with manifest.json) that peft.PeftModel.from_pretrained(base,
    OUT) loads. Given a run's folder (or a direction file beside its edit.json) it exports the edit the run wrote,
    for the base model the folder records (--model overrides); --edit names another edit.json; --layer/--position/
    --scale export one direction removed as `apply` does (with a warning when the run wrote another edit). Edits
    PEFT cannot hold exactly are refused (norm-preserving: run with --adapter; writer biases next to embedding
    edits; quantized or offloaded models). --push-to-hub REPO_ID uploads that folder once it is written (see
    abliterate push).

    Examples:
      abliterate export run-out/directions.safetensors --model Qwen/Qwen2.5-0.5B-Instruct --out refusal.gguf
      abliterate export run-out --format peft -o adapter
      abliterate export run-out --format gguf --out model-abliterated.gguf
    """
    from abliterate.run.applying import load_direction
    from abliterate.run.exporting import peft_source, write_control_vector

    if fmt not in ("gguf", "peft"):
        fail(f"unknown --format '{fmt}'; use gguf or peft")
    if push_to_hub is not None and fmt != "peft":
        fail("--push-to-hub uploads a folder: use it with --format peft (or upload the .gguf yourself)")
    hub = hub_destination(push_to_hub, public, endpoint)
    if fmt == "peft":
        if model_hint is not None:
            fail("--format peft adapts --model (or the model the run folder records); drop --model-hint")
        one_direction = bool(layers) or position is not None or scale != 1.0
        if edit is not None and one_direction:
            fail("--edit exports the recorded edit as it is; drop --layer/--position/--scale")
        if layers and len(layers) > 1:
            fail("--format peft removes one direction: pass at most one --layer")
        src = peft_source(directions_file, model=model, edit=edit, one_direction=one_direction)
        if src.note:
            err().print(f"[yellow]warning:[/] {src.note}", highlight=False, soft_wrap=True)
        direction = (
            None if src.edit is not None else load_direction(src.directions, layers[0] if layers else None, position)[0]
        )
        export_peft(src.model, src.directions, out_file, edit=src.edit, direction=direction, scale=scale, force=force)
        if hub is not None:
            upload(out_file, hub)
        return
    if edit is not None:
        fail("--edit applies to --format peft only")
    if directions_file.is_dir():  # a finished run's folder: its edit written into the GGUF it was found on
        export_model_gguf(directions_file, out_file, model=model, gguf_type=gguf_type, force=force)
        return
    path, hint = write_control_vector(
        directions_file,
        out_file,
        model=model,
        model_hint=model_hint,
        layers=layers,
        position=position,
        scale=scale,
        force=force,
    )
    out().print(f"wrote [bold]{path}[/] (model hint {hint})")


def export_peft(
    model: str, directions_file: Path, out_dir: Path, *, edit: Path | None, direction: Any, scale: float, force: bool
) -> None:
    """``export --format peft``: write the adapter folder
    (:func:`abliterate.run.exporting.write_peft_adapter`) and say what it holds."""
    from abliterate.run.exporting import write_peft_adapter

    target, adapter = write_peft_adapter(
        model, directions_file, out_dir, edit=edit, direction=direction, scale=scale, force=force
    )
    wrote(target)
    for note in adapter.notes:
        err().print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    targets = len(adapter.config["target_modules"]) + len(adapter.config["target_parameters"] or [])
    out().print(
        f"wrote [bold]{target}[/] (LoRA rank {adapter.config['r']} on {targets} modules; load it with PEFT)",
        soft_wrap=True,
    )


def export_model_gguf(run_dir: Path, out_file: Path, *, model: str | None, gguf_type: str, force: bool) -> None:
    """``export RUN_DIR --format gguf``: write the run's edit into its GGUF and say how to run it."""
    from abliterate.outputs.gguf_out import run_lines
    from abliterate.run.exporting import write_model_gguf

    written = write_model_gguf(run_dir, out_file, model=model, gguf_type=gguf_type, force=force)
    wrote(written.path)
    out().print(
        f"wrote [bold]{written.path}[/] ({len(written.edited)} tensors edited, {written.bytes / 2**20:.0f} MiB); "
        f"run it: {run_lines(written.path)[0]}",
        soft_wrap=True,
        highlight=False,
    )
