"""``abliterate chat``: talk to a model with a live toggle between base, ablated and induced."""

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from abliterate.cli.common import (
    PREFIX_OPT,
    RESIDUAL_OPT,
    THINKING_OPT,
    Opt,
    app,
    err,
    fail,
    guarded,
    loads_model,
    out,
)
from abliterate.errors import AbliterateError


@app.command()
@guarded
@loads_model
def chat(
    model: Annotated[str, typer.Argument(help="Model to chat with.")],
    directions_file: Annotated[Path, typer.Argument(help="directions.safetensors from measure or run.")],
    layer: Annotated[int | None, Opt(help="Direction layer (default: the chosen one recorded in the file).")] = None,
    max_new_tokens: Annotated[int, Opt(help="Tokens per reply.")] = 256,
    system: Annotated[str | None, Opt(help="System prompt for every message.")] = None,
    disable_thinking: THINKING_OPT = None,
    response_prefix: PREFIX_OPT = None,
    where: dict[str, Any] | None = None,
    residual_stream: RESIDUAL_OPT = False,
) -> None:
    """Interactive chat with a live toggle: type /base, /ablate or /induce to switch, /quit to leave.

    Each message is answered on its own (no history), formatted as run and eval format prompts
    (--system, --disable-thinking, --response-prefix; a prefix is part of the prompt, not of the shown reply).

    Example: abliterate chat Qwen/Qwen2.5-0.5B-Instruct run-out/directions.safetensors
    """
    from abliterate.edit.interventions import ablate, induce
    from abliterate.lm.loading import load_model
    from abliterate.run.applying import check_hidden, load_direction

    if not sys.stdin.isatty():
        fail("chat needs an interactive terminal; use 'abliterate apply --runtime-check PROMPT' in scripts")
    direction, recorded = load_direction(directions_file, layer, None)
    lm = load_model(model, residual_only=residual_stream, **(where or {}))
    lm = lm.with_prompt_format(disable_thinking, response_prefix)
    check_hidden(direction, lm, model)
    mode = "ablate"
    modes = {
        "base": contextlib.nullcontext,
        "ablate": lambda: ablate(lm, direction),
        "induce": lambda: induce(lm, direction, recorded if recorded is not None else 8.0, layers=range(lm.num_layers)),
    }
    err().print("[bold]/base /ablate /induce[/] switch mode, [bold]/quit[/] leaves. Mode: ablate")
    while True:
        try:
            line = input(f"[{mode}] you> ").strip()
        except EOFError:
            break
        if line in ("/quit", "/exit"):
            break
        if line.startswith("/"):
            if line[1:] in modes:
                mode = line[1:]
                err().print(f"mode: {mode}")
            else:
                err().print(f"unknown command {line}; use /base /ablate /induce /quit")
            continue
        if not line:
            continue
        try:
            with modes[mode]():
                reply = lm.generate([line], max_new_tokens=max_new_tokens, system=system)[0]
        except AbliterateError as exc:
            err().print(f"[red]{exc}[/]")
            continue
        out().print(reply)
