"""Shared pieces of the command line: the typer app, consoles, progress bars and error handling."""

import contextlib
import functools
import inspect
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperGroup, TyperOption

from abliterate.errors import AbliterateError
from abliterate.lm.model import CapabilityWarning
from abliterate.run import config as config_mod

T = TypeVar("T")

# The commands in the order a user meets them: --help lists them so (the registration order is the import order).
COMMAND_ORDER = ("demo", "run", "eval", "chat", "measure", "apply", "export", "verify", "reproduce", "push", "config")


def no_flag_metavars(params: list[T]) -> list[T]:
    """typer's help shows ``<bool>`` beside every plain flag (``--quiet``, ``--help``, ...); a flag takes no value,
    so it shows none."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


class CommandGroup(TyperGroup):
    """A command group whose --help lists its commands in :data:`COMMAND_ORDER` (any other after them) and shows no
    ``<bool>`` beside a flag, its own or a command's. (Types are typer's vendored click's, hence inferred here.)"""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        ranked = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(super().list_commands(ctx), key=lambda name: ranked.get(name, len(COMMAND_ORDER)))

    def get_command(self, ctx: typer.Context, cmd_name: str):
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            no_flag_metavars(command.get_params(ctx))  # its options and its --help
        return command

    def get_params(self, ctx: typer.Context):
        return no_flag_metavars(super().get_params(ctx))


app = typer.Typer(
    cls=CommandGroup,
    help="Find and remove (or induce) the refusal direction of a Hugging Face causal LM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(cls=CommandGroup, help="Inspect the effective configuration.", no_args_is_help=True)
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


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


_clock = time.monotonic  # tests swap it for a fake clock


class PlainProgress:
    """``progress(stage, done, total)`` as plain stderr lines for logs (stderr not a terminal).

    One line when a stage starts, then one whenever another 1/``steps`` of it is done or ``every_s``
    seconds have passed since the last line (with elapsed time and ETA), and one when it completes.
    """

    def __init__(self, write: Callable[[str], None], steps: int = 10, every_s: float = 10.0) -> None:
        self.write, self.steps, self.every_s = write, steps, every_s
        self.stages: dict[str, dict[str, float]] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        now, total = _clock(), max(total, 1)
        st = self.stages.get(stage)
        if st is None:
            st = self.stages[stage] = {"start": now, "last": now, "bucket": done * self.steps // total, "ended": 0}
            self.write(f"{stage}: {done}/{total}")
            if done < total:
                return
        if st["ended"]:
            return
        elapsed = now - st["start"]
        if done >= total:
            st["ended"] = 1
            self.write(f"{stage}: {total}/{total} (100%) done in {_duration(elapsed)}")
            return
        bucket = done * self.steps // total
        if bucket > st["bucket"] or now - st["last"] >= self.every_s:
            eta = _duration(elapsed / done * (total - done)) if done else "?"
            self.write(f"{stage}: {done}/{total} ({done / total:.0%}) elapsed {_duration(elapsed)} eta {eta}")
            st.update(last=now, bucket=bucket)


@contextlib.contextmanager
def progress_bars() -> Iterator[Any]:
    """A ``progress(stage, done, total)`` callback on stderr: one rich bar per stage on a terminal,
    plain log lines (:class:`PlainProgress`) otherwise; None when quiet or printing JSON."""
    if STATE["quiet"] or STATE["json"]:
        yield None
        return
    console = err()
    if not console.is_terminal:
        yield PlainProgress(lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
        return
    bars = Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=max(total, 1))
        bars.update(tasks[stage], completed=done, total=max(total, 1))

    with bars:
        _LIVE.append(bars)
        try:
            yield update
        finally:
            _LIVE.remove(bars)


_LIVE: list[Any] = []  # the rich progress display while one is shown (paused_bars stops it for a prompt)


@contextlib.contextmanager
def paused_bars() -> Iterator[None]:
    """Stop the live progress bars (if any) while the user is asked something, and show them again after."""
    live = list(_LIVE)
    for bars in live:
        bars.stop()
    try:
        yield
    finally:
        for bars in live:
            bars.start()


def wrote(path: Any) -> None:
    """Record that a command's output is complete, so a later Ctrl-C does not claim nothing was written."""
    STATE["wrote"] = path


def _show_warning(message: Any, category: type, *_: Any, **__: Any) -> None:
    err().print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def guarded(fn: Any) -> Any:
    """Turn library errors into one clear line and a non-zero exit; Ctrl-C exits 130."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        STATE["wrote"] = None
        try:
            with warnings.catch_warnings():
                # what a model's forward lacks is in metrics.json; shown here with -v
                warnings.simplefilter("always" if STATE["verbose"] else "ignore", CapabilityWarning)
                warnings.showwarning = _show_warning
                return fn(*args, **kwargs)
        except AbliterateError as exc:
            fail(escape(str(exc)))  # a message is plain text: "abliterate[bench]" is not markup
        except KeyboardInterrupt:
            what = f"{escape(str(STATE['wrote']))} was already written" if STATE["wrote"] else "nothing was written"
            err().print(f"[yellow]interrupted; {what}[/]", highlight=False, soft_wrap=True)
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
RUN_HELP = config_mod.RUN_HELP  # each RunConfig option's help, defined once on its config field
CONFIG_OPT = Annotated[Path | None, Opt("--config", "-c", help="TOML file; keys mirror the flags.")]
# Where and how the model is loaded: shared by every command that loads one.
DTYPE_OPT = Annotated[str | None, Opt("--dtype", help=RUN_HELP["dtype"])]
DEVICE_OPT = Annotated[str | None, Opt("--device", help=RUN_HELP["device"])]
DEVICE_MAP_OPT = Annotated[
    str | None,
    Opt("--device-map", help=RUN_HELP["device_map"]),
]
MAX_MEMORY_OPT = Annotated[str | None, Opt("--max-memory", help=RUN_HELP["max_memory"])]
OFFLOAD_OPT = Annotated[str | None, Opt("--offload-folder", help=RUN_HELP["offload_folder"])]
QUANTIZE_OPT = Annotated[str | None, Opt("--quantize", help=RUN_HELP["quantize"])]
RESIDUAL_OPT = Annotated[
    bool,
    Opt(
        "--residual-stream",
        help="Ablate by projecting the residual stream itself at every layer's input and output (run-time hooks "
        "only, nothing written): for models no weight edit is exact for (post-LN, sinusoidal positions, ...).",
    ),
]
# How prompts are formatted: shared by every command that captures, scores or generates.
THINKING_OPT = Annotated[
    bool | None,
    Opt(
        "--disable-thinking/--enable-thinking",
        help=RUN_HELP["disable_thinking"],
    ),
]
PREFIX_OPT = Annotated[str | None, Opt("--response-prefix", help=RUN_HELP["response_prefix"])]


# The final evaluation's judge: shared by run and eval.
JUDGE_OPT = Annotated[
    str | None,
    Opt("--judge", help=RUN_HELP["judge"]),
]
JUDGE_LABELS_OPT = Annotated[str | None, Opt("--judge-labels", help=RUN_HELP["judge_labels"])]
# The behaviour profile: shared by run, measure and eval.
BEHAVIOUR_OPT = Annotated[
    str | None,
    Opt(
        "--behaviour",
        help=RUN_HELP["behaviour"],
    ),
]

DEFAULTS = config_mod.RunConfig()  # option defaults of commands that take flags only (eval)


# The model-loading options, defined once: every command that loads a model takes them through loads_model.
PLACEMENT_OPTS: dict[str, Any] = {
    "dtype": DTYPE_OPT,
    "device": DEVICE_OPT,
    "device_map": DEVICE_MAP_OPT,
    "max_memory": MAX_MEMORY_OPT,
    "offload_folder": OFFLOAD_OPT,
    "quantize": QUANTIZE_OPT,
}


def loads_model(fn: Any) -> Any:
    """Give a command the model-loading options (:data:`PLACEMENT_OPTS`, each defaulting to None), listed where
    its ``where`` parameter stands; the command receives them as ``where``: the :func:`abliterate.load_model` keyword
    arguments of those given."""
    signature = inspect.signature(fn)
    params = list(signature.parameters.values())
    at = [p.name for p in params].index("where")
    options = [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=annotation)
        for name, annotation in PLACEMENT_OPTS.items()
    ]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {name: kwargs.pop(name, None) for name in PLACEMENT_OPTS}
        return fn(*args, where=_flags(**given), **kwargs)

    # typer reads a command's options from its signature and type hints: show the six instead of ``where``
    shown = signature.replace(parameters=[*params[:at], *options, *params[at + 1 :]])
    wrapper.__signature__ = shown  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**{k: v for k, v in fn.__annotations__.items() if k != "where"}, **PLACEMENT_OPTS}
    return wrapper


def _flags(**given: Any) -> dict[str, Any]:
    """Only flags the user actually gave (None means 'not given'), for the precedence rules."""
    return {k: v for k, v in given.items() if v is not None and v != []}


def config_from_flags(config: Path | None, **given: Any) -> config_mod.RunConfig:
    """The effective config; a flag named ``<section>_<key>`` (``search_trials``) sets ``section.key``."""
    flags = {}
    for key, value in _flags(**given).items():
        section = next((s for s in config_mod.SECTIONS if f"{s}.{key[len(s) + 1 :]}" in config_mod.KEYS), None)
        flags[f"{section}.{key[len(section) + 1 :]}" if section and key.startswith(section + "_") else key] = value
    return config_mod.load(config, flags)


RATE_LABELS = {
    "refusal_rate": "refusals (harmful)",
    "compliance_rate": "compliance (harmful)",
    "degenerate_rate": "degenerate (harmful)",
    "unparsed_rate": "unparsed (harmful)",
    "over_refusal": "over-refusal (harmless)",
    "harmless_degenerate_rate": "degenerate (harmless)",
    "harmless_unparsed_rate": "unparsed (harmless)",
}


def rate_rows(conditions: list[Any]) -> list[tuple[str, list[str]]]:
    """Rows ``(label, cells)`` of verdict rates with 95 % Wilson intervals, one cell per measured condition;
    "unparsed" rows only when a judge could not be read somewhere."""
    from abliterate.evaluate.evaluation import behaviour_label, format_rate

    rows = []
    behaviour = conditions[0].behaviour
    for key, label in RATE_LABELS.items():
        if "unparsed" in key and not any(m.rate(key) for m in conditions):
            continue
        label = label if behaviour == "refusal" else behaviour_label(key, behaviour)
        rows.append((label, [format_rate(m, key) for m in conditions]))
    return rows


def damage_rows(conditions: list[Any]) -> list[tuple[str, list[str]]]:
    """Rows of KL (first token and along the base model's answers) and perplexity, one cell per condition."""
    k = conditions[0].kl_tokens
    return [
        ("KL vs base (first token, harmless)", [f"{m.kl:.4f}" for m in conditions]),
        (f"KL vs base (first {k} answer tokens)", [f"{m.kl_answer:.4f}" for m in conditions]),
        ("perplexity (harmless texts)", [f"{m.perplexity:.2f}" for m in conditions]),
    ]


def agreement_rows(conditions: list[Any]) -> list[tuple[str, list[str]]]:
    """Per other judge run on the same answers: how often it agreed with the main judge (non-degenerate answers)."""
    names = sorted({name for m in conditions for name in m.agreement()})
    return [
        (
            f"agreement with the {name} judge",
            [f"{a['rate']:.0%} of {a['n']}" if (a := m.agreement().get(name)) else "-" for m in conditions],
        )
        for name in names
    ]


def metrics_table(title: str, caption: str, columns: dict[str, Any]) -> Table:
    """One right-aligned column per measured condition (``columns``: its name and metrics): verdict rates with
    intervals, agreement with other judges, and damage (KL, perplexity)."""
    table = Table(title=title, caption=caption)
    table.add_column("")
    for name in columns:
        table.add_column(name, justify="right")
    conditions = list(columns.values())
    for label, cells in [*rate_rows(conditions), *agreement_rows(conditions), *damage_rows(conditions)]:
        table.add_row(label, *cells)
    return table


def capability_rows(conditions: list[Any]) -> list[tuple[str, list[str]]]:
    """Rows of lm-eval scores (value ± stderr, documents), one cell per scored condition (none without --tasks)."""
    pairs = list(dict.fromkeys(pair for c in conditions for pair in c.rows()))
    return [(f"{task} {metric}", [c.format(task, metric) for c in conditions]) for task, metric in pairs]
