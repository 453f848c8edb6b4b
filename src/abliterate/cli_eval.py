"""``abliterate eval``: verdicts with intervals, KL and perplexity of a model against its base."""

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .cli_common import (
    BEHAVIOUR_OPT,
    DEFAULTS,
    DEVICE_MAP_OPT,
    DEVICE_OPT,
    DTYPE_OPT,
    JUDGE_LABELS_OPT,
    JUDGE_OPT,
    MAX_MEMORY_OPT,
    OFFLOAD_OPT,
    PREFIX_OPT,
    QUANTIZE_OPT,
    STATE,
    THINKING_OPT,
    Opt,
    agreement_rows,
    app,
    capability_rows,
    damage_rows,
    err,
    fail,
    guarded,
    out,
    placement,
    prompt_format,
    rate_rows,
)


@app.command("eval")
@guarded
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
    dtype: DTYPE_OPT = None,
    device: DEVICE_OPT = None,
    device_map: DEVICE_MAP_OPT = None,
    max_memory: MAX_MEMORY_OPT = None,
    offload_folder: OFFLOAD_OPT = None,
    quantize: QUANTIZE_OPT = None,
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
    from .capability import Harness
    from .config import profile_defaults
    from .evaluation import Evaluator, baseline_note, check_lengths
    from .judges import judge_from_spec
    from .loading import load_model
    from .profiles import load_profile, profile_splits
    from .prompts import bundled

    for path, flag in ((out_file, "--out"), (report, "--report")):
        if path is not None and path.exists():
            fail(f"{flag} {path} already exists; choose another path")
    if (task_path or limit is not None) and not tasks:
        fail("--task-path and --limit apply to --tasks; name the lm-eval tasks to run with --tasks")
    profile, defaults = load_profile(behaviour or "refusal"), profile_defaults(behaviour or "refusal")
    n_test = n_test if n_test is not None else defaults.get("n_test", DEFAULTS.n_test)
    check_lengths(min_new_tokens, max_new_tokens)
    if min(n_test, batch_size, kl_tokens) < 1:
        fail(f"--n-test, --batch-size and --kl-tokens must be at least 1, got {n_test}, {batch_size}, {kl_tokens}")
    if profile.name == "refusal":
        harmful, harmless = bundled("harmful", "test", limit=n_test), bundled("harmless", "test", limit=n_test)
    else:  # the profile's own held-out prompts, split as run splits them
        counts = {k: defaults.get(k, getattr(DEFAULTS, k)) for k in ("n_train", "n_val")}
        sides = profile_splits(profile, **counts, n_test=n_test, seed=defaults.get("seed", DEFAULTS.seed))
        harmful, harmless = sides[0].test, sides[1].test
    if min(len(harmful), len(harmless)) < n_test:
        fail(f"the bundled test split has {len(harmful)} harmful and {len(harmless)} harmless prompts; lower --n-test")
    harness = None
    if tasks is not None:  # task names are checked before any model is loaded
        harness = Harness([tasks], task_paths=task_path or [], limit=limit, batch_size=batch_size)
    where = placement(dtype, device, device_map, max_memory, offload_folder, quantize)
    reference = prompt_format(load_model(base or model, **where), disable_thinking, response_prefix)
    target = prompt_format(load_model(model, **where), disable_thinking, response_prefix) if base else reference
    if target.tokenizer.get_vocab() != reference.tokenizer.get_vocab():
        fail("the model and --base use different tokenizers; KL needs the same vocabulary")
    where_judge = {k: v for k, v in where.items() if k in ("device", "dtype")}
    spec, others = judge or profile.judge, {}
    if profile.name == "refusal":
        the_judge = judge_from_spec(spec, labels=judge_labels, batch_size=batch_size, **where_judge)
    else:
        settings = profile.judge_settings()
        labels = judge_labels or settings.pop("labels", None)
        settings.pop("labels", None)
        the_judge = (
            profile.marker_judge()
            if spec == "marker"
            else judge_from_spec(spec, labels=labels, batch_size=batch_size, **settings, **where_judge)
        )
        others = {"compare": [] if spec == "marker" else [profile.marker_judge()]}
    ev = Evaluator(
        reference,
        harmful,
        harmless,
        system=system,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        kl_tokens=kl_tokens,
        judge=the_judge,
        batch_size=batch_size,
        **others,
    )
    rows = {"base": ev.measure("base")} if base else {}
    rows["model"] = ev.measure("model", model=target)
    for metrics in rows.values():
        metrics.behaviour = profile.name
    payload: dict[str, Any] = {k: v.to_dict() for k, v in rows.items()}
    scores = {}
    if harness is not None:  # after the refusal metrics: the harness may leave the model in its own settings
        scores = {name: harness.score(reference if name == "base" else target, name) for name in rows}
        for name, cap in scores.items():
            payload[name]["capability"] = cap.to_dict()
    payload["settings"] = {
        "n_test": n_test,
        "min_new_tokens": min_new_tokens,
        "max_new_tokens": max_new_tokens,
        "kl_tokens": kl_tokens,
        "judge": spec,
        "behaviour": profile.name,
        "judge_labels": judge_labels,
        "system": system,
        "template_kwargs": reference.template_kwargs,
        "response_prefix": reference.response_prefix,
        "capability": harness.settings() if harness else None,
    }
    if base:
        payload["note"] = baseline_note(rows["base"]) if profile.name == "refusal" else ""
    if out_file is not None:
        _write(out_file, json.dumps(payload, indent=2) + "\n")
    if report is not None:
        from .report import eval_report

        _write(report, eval_report(model, base, rows, scores, payload.get("note", "")))
    if STATE["json"]:
        out().print_json(json.dumps(payload))
        return
    first = next(iter(rows.values()))
    table = Table(
        title="eval",
        caption=f"{first.n_harmful} harmful / {first.n_harmless} harmless held-out prompts, judge {first.judge}; "
        "rates with 95% Wilson intervals",
    )
    table.add_column("")
    for name in rows:
        table.add_column(name, justify="right")
    for label, cells in rate_rows(list(rows.values())):
        table.add_row(label, *cells)
    for label, cells in agreement_rows(list(rows.values())):
        table.add_row(label, *cells)
    for label, cells in damage_rows(list(rows.values())):
        table.add_row(label, *cells)
    for label, cells in capability_rows(list(scores.values())):
        table.add_row(label, *cells)
    out().print(table)
    if base and payload["note"]:
        err().print(f"[yellow]note:[/] {payload['note']}")


def _write(path: Path, text: str) -> None:
    """Write through a hidden temporary file: a Ctrl-C or a full disk never leaves half a file behind."""
    partial = path.with_name(f".{path.name}.tmp")
    try:
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
