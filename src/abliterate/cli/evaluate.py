"""``abliterate eval``: verdicts with intervals, KL and perplexity of a model against its base."""

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from abliterate.cli.common import (
    BEHAVIOUR_OPT,
    DEFAULTS,
    JUDGE_LABELS_OPT,
    JUDGE_OPT,
    PREFIX_OPT,
    STATE,
    THINKING_OPT,
    Opt,
    app,
    capability_rows,
    err,
    guarded,
    loads_model,
    metrics_table,
    out,
)


# Long only for its option list and help text (typer reads both from the signature and docstring); the body is thin.
@app.command("eval")
@guarded
@loads_model
def evaluate(
    model: Annotated[str, typer.Argument(help="Model to measure (e.g. a saved abliterated directory).")],
    base: Annotated[str | None, Opt(help="Base model for KL (default: the model itself).")] = None,
    n_test: Annotated[
        int | None, Opt(help="Held-out prompts per side (bundled test split; default 64 or the profile's).")
    ] = None,
    behaviour: BEHAVIOUR_OPT = None,
    max_new_tokens: Annotated[int, Opt(help="At most this many new tokens per answer.")] = DEFAULTS.max_new_tokens,
    min_new_tokens: Annotated[
        int, Opt(help="At least this many new tokens (0: the model may stop earlier).")
    ] = DEFAULTS.min_new_tokens,
    judge: JUDGE_OPT = None,
    judge_labels: JUDGE_LABELS_OPT = None,
    kl_tokens: Annotated[
        int, Opt(help="Multi-token KL over this many tokens of the base model's answers.")
    ] = DEFAULTS.kl_tokens,
    system: Annotated[str | None, Opt(help="System prompt for every conversation.")] = None,
    disable_thinking: THINKING_OPT = None,
    response_prefix: PREFIX_OPT = None,
    tasks: Annotated[
        str | None,
        Opt(help="lm-evaluation-harness tasks to score too, comma-separated (needs abliterate[bench])."),
    ] = None,
    task_path: Annotated[
        list[Path] | None, Opt(help="Folder of local lm-eval task YAMLs for --tasks (repeatable).")
    ] = None,
    limit: Annotated[int | None, Opt(help="--tasks: at most this many documents per task (default: all).")] = None,
    batch_size: Annotated[int, Opt(help="Prompts per forward pass.")] = DEFAULTS.batch_size,
    out_file: Annotated[Path | None, Opt("--out", "-o", help="Also write the metrics JSON here.")] = None,
    report: Annotated[
        Path | None, Opt(help="Also write an HTML report here (base vs model: verdicts, damage, capability).")
    ] = None,
    where: dict[str, Any] | None = None,
) -> None:
    """Verdicts with 95% intervals, KL and perplexity of a model against its base, on held-out prompts.

    Greedy answers of up to --max-new-tokens (default 100) new tokens to --n-test (default 64) bundled
    harmful and harmless test prompts, each judged refusal / compliance / degenerate (/ unparsed by a
    model judge); KL of the first token and along the base model's own answers; perplexity on harmless texts.

    With --tasks, each model is also scored on lm-evaluation-harness tasks (plain-text prompts, each task's
    own few-shot setting), with the harness registry plus --task-path folders; the scores go beside the
    refusal metrics (key "capability").

    Examples:
      abliterate eval qwen-abliterated --base Qwen/Qwen2.5-0.5B-Instruct
      abliterate eval qwen-abliterated --base Qwen/Qwen2.5-0.5B-Instruct --judge llm:./judge-model
      abliterate eval qwen-abliterated --base Qwen/Qwen2.5-0.5B-Instruct --tasks arc_easy,hellaswag --limit 200
      abliterate eval flowery-out --base Qwen/Qwen2.5-0.5B-Instruct --behaviour flowery
    """
    from abliterate.run.comparison import EvalOptions, compare, write_comparison

    opts = EvalOptions(
        model,
        base=base,
        n_test=n_test,
        behaviour=behaviour,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        judge=judge,
        judge_labels=judge_labels,
        kl_tokens=kl_tokens,
        system=system,
        disable_thinking=disable_thinking,
        response_prefix=response_prefix,
        tasks=tasks,
        task_path=task_path,
        limit=limit,
        batch_size=batch_size,
        out_file=out_file,
        report=report,
        where=where or {},
    )
    result = compare(opts, DEFAULTS)
    write_comparison(result, opts)
    if STATE["json"]:
        out().print_json(json.dumps(result.payload))
        return
    out().print(eval_table(result.rows, result.scores))
    if base and result.payload["note"]:
        err().print(f"[yellow]note:[/] {result.payload['note']}")


def eval_table(rows: dict[str, Any], scores: dict[str, Any]) -> Table:
    """One column per measured condition: verdict rates, judge agreement, damage and lm-eval scores."""
    first = next(iter(rows.values()))
    caption = (
        f"{first.n_harmful} harmful / {first.n_harmless} harmless held-out prompts, judge {first.judge}; "
        "rates with 95% Wilson intervals"
    )
    table = metrics_table("eval", caption, rows)
    for label, cells in capability_rows(list(scores.values())):
        table.add_row(label, *cells)
    return table
