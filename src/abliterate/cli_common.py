"""Shared pieces of the command line: the typer app, consoles, progress bars and error handling."""

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import config as config_mod
from .errors import AbliterateError

app = typer.Typer(
    help="Find and remove (or induce) the refusal direction of a Hugging Face causal LM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

STATE: dict[str, Any] = {"quiet": False, "verbose": False, "json": False}


def out() -> Console:
    """Console on the current stdout (rebound at each invocation: test runners swap streams)."""
    return STATE.setdefault("out", Console(stderr=False))


def err() -> Console:
    return STATE.setdefault("err", Console(stderr=True))


def fail(message: str, code: int = 2) -> None:
    err().print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def progress_bars() -> Iterator[Any]:
    """A ``progress(stage, done, total)`` callback drawing one rich bar per stage (stderr)."""
    if STATE["quiet"] or STATE["json"]:
        yield None
        return
    bars = Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err(),
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=max(total, 1))
        bars.update(tasks[stage], completed=done, total=max(total, 1))

    with bars:
        yield update


def guarded(fn: Any) -> Any:
    """Turn library errors into one clear line and a non-zero exit; Ctrl-C exits 130."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AbliterateError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            err().print("[yellow]interrupted; nothing was written[/]")
            raise typer.Exit(130) from None

    return functools.wraps(fn)(wrapper)


@app.callback()
def _global(
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only errors and the final result.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Also show the candidate table.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")] = False,
) -> None:
    STATE.update(quiet=quiet, verbose=verbose, json=json_out)
    STATE.update(out=Console(stderr=False), err=Console(stderr=True))
    if quiet or json_out:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


Opt = typer.Option
CONFIG_OPT = Annotated[Path | None, Opt("--config", "-c", help="TOML file; keys mirror the flags.")]


def _flags(**given: Any) -> dict[str, Any]:
    """Only flags the user actually gave (None means 'not given'), for the precedence rules."""
    return {k: v for k, v in given.items() if v is not None and v != []}


def _cfg(config: Path | None, **given: Any) -> config_mod.RunConfig:
    return config_mod.load(config, _flags(**given))
