"""``abliterate measure`` and ``apply``."""

import contextlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from abliterate.cli.common import (
    BEHAVIOUR_OPT,
    CONFIG_OPT,
    PREFIX_OPT,
    RESIDUAL_OPT,
    STATE,
    THINKING_OPT,
    Opt,
    app,
    config_from_flags,
    guarded,
    loads_model,
    out,
    progress_bars,
    wrote,
)
from abliterate.cli.share import ENDPOINT_OPT, PUBLIC_OPT, PUSH_OPT, pushes_output


@app.command()
@guarded
@loads_model
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
    where: dict[str, Any] | None = None,
    residual_stream: RESIDUAL_OPT = False,
    force: Annotated[bool | None, Opt("--force", help="Replace an existing output directory.")] = None,
) -> None:
    """Compute directions and the candidate table only (no edit, no generation).

    Writes directions.safetensors (+ .json, with the chosen candidate), candidates.json, abliterate_config.json
    and report.html (candidate and direction plots, also as candidates.png and directions.png).

    Example: abliterate measure Qwen/Qwen2.5-0.5B-Instruct --out qwen-directions --position -1 --position -2
    """
    from abliterate.lm.saving import check_output
    from abliterate.run.pipeline import load_for, resolve, write_measurement
    from abliterate.run.pipeline import measure as run_measure

    cfg = config_from_flags(
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
        **(where or {}),
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
    out().print(candidate_table(sel, everything=STATE["verbose"]))
    out().print(sel.note)
    out().print(f"wrote [bold]{target}[/]")


def candidate_table(sel: Any, everything: bool) -> Table:
    """The sweep's candidates: all of them (-v), else the first ten that passed the filters."""
    table = Table(title=f"candidates ({sel.seconds:.0f} s)")
    for col in ("method", "layer", "pos", "bypass", "induce", "KL", "filtered because"):
        table.add_column(col)
    for c in sel.candidates if everything else [c for c in sel.candidates if c.passed][:10]:
        table.add_row(
            c.method, str(c.layer), str(c.position), f"{c.bypass:.2f}", f"{c.induce:.2f}", f"{c.kl:.4f}", c.reason
        )
    return table


# Long only for its option list and help text (typer reads both from the signature and docstring); the body is thin.
@app.command()
@guarded
@pushes_output
@loads_model
def apply(
    model: Annotated[str, typer.Argument(help="Model to edit (hub id, directory or .gguf).")],
    directions_file: Annotated[
        Path | None, typer.Argument(help="directions.safetensors from measure or run (optional with --edit RUN_DIR).")
    ] = None,
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
    where: dict[str, Any] | None = None,
    residual_stream: RESIDUAL_OPT = False,
    force: Annotated[bool, Opt("--force", help="Replace an existing output directory.")] = False,
    edit: Annotated[
        Path | None,
        Opt(
            "--edit",
            help="edit.json from run, or the run's folder: apply its searched edit (kernels, k, embedding, norm "
            "preservation) instead of --layer/--position/--scale/--norm-preserving.",
        ),
    ] = None,
    gguf: Annotated[
        bool,
        Opt("--gguf/--no-gguf", help="A .gguf model: also write DIR/<name>-abliterated.gguf (+ Modelfile)."),
    ] = True,
    gguf_type: Annotated[
        str,
        Opt(
            "--gguf-type",
            help="Type of the edited GGUF tensors: auto (the source's where gguf can write it, else Q8_0), F32, "
            "F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1 or Q4_0.",
        ),
    ] = "auto",
    push_to_hub: PUSH_OPT = None,
    public: PUBLIC_OPT = False,
    endpoint: ENDPOINT_OPT = None,
) -> None:
    """Apply a saved direction to a model: at run time (--runtime-check) or to the weights (--out).

    --push-to-hub REPO_ID uploads the --out folder once it is written (see abliterate push).

    Examples:
      abliterate apply Qwen/Qwen2.5-0.5B-Instruct run-out/directions.safetensors --out edited
      abliterate apply ./Llama-3.1-70B-Instruct dirs.safetensors --stream --out llama-70b-abliterated
      abliterate apply --stream Llama-3.1-70B-Instruct-Q4_K_M.gguf --edit run-out --out l70-abliterated.gguf
      abliterate apply Qwen/Qwen2.5-0.5B-Instruct dirs.safetensors --layer 14 --runtime-check "How do I pick a lock?"
    """
    from abliterate.run.applying import ApplyOptions, apply_saved

    opts = ApplyOptions(
        model,
        directions_file,
        out_dir=out_dir,
        layer=layer,
        position=position,
        mode=mode,
        scale=scale,
        coefficient=coefficient,
        norm_preserving=norm_preserving,
        runtime_check=runtime_check,
        stream=stream,
        verify=not no_verify,
        residual_stream=residual_stream,
        force=force,
        edit=edit,
        where=where or {},
        gguf=gguf,
        gguf_type=gguf_type,
    )
    opts.check()
    with progress_bars() if stream else contextlib.nullcontext() as progress:
        done = apply_saved(opts, progress)
    if done.responses is not None:
        for prompt, response in zip(runtime_check or [], done.responses, strict=True):
            out().print(f"[bold]> {prompt}[/]\n{response}\n")
        return
    wrote(done.out)
    if done.edited is not None:
        out().print(f"wrote [bold]{done.out}[/] ({done.edited} tensors edited, {done.seconds:.0f} s)")
    else:
        out().print(f"wrote [bold]{done.out}[/]")
