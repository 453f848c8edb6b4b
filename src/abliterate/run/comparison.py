"""What ``abliterate eval`` measures: verdicts with intervals, KL and perplexity (and, with tasks, lm-eval scores)
of a model against its base on held-out prompts, as the metrics payload it prints and writes. Nothing here prints."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abliterate.errors import OptionError, OutputError, PromptError
from abliterate.run.config import RunConfig


@dataclass
class EvalOptions:
    """The flags of ``abliterate eval`` (``where``: the load_model placement kwargs given)."""

    model: str
    base: str | None = None
    n_test: int | None = None
    behaviour: str | None = None
    max_new_tokens: int = 100
    min_new_tokens: int = 0
    judge: str | None = None
    judge_labels: str | None = None
    kl_tokens: int = 16
    system: str | None = None
    disable_thinking: bool | None = None
    response_prefix: str | None = None
    tasks: str | None = None
    task_path: list[Path] | None = None
    limit: int | None = None
    batch_size: int = 8
    out_file: Path | None = None
    report: Path | None = None
    where: dict[str, Any] = field(default_factory=dict)


@dataclass
class Comparison:
    """The measured conditions (``base`` when given, ``model``), their lm-eval scores and the metrics payload."""

    rows: dict[str, Any]
    scores: dict[str, Any]
    payload: dict[str, Any]


def held_out(opts: EvalOptions, defaults: Any) -> tuple[Any, int, list[str], list[str]]:
    """The behaviour profile, the number of test prompts per side and the two held-out prompt lists (checked)."""
    from abliterate.behaviours.profiles import load_profile, profile_splits
    from abliterate.behaviours.prompts import SplitSizes, bundled
    from abliterate.evaluate.evaluation import check_lengths
    from abliterate.run.config import profile_defaults

    profile, given = load_profile(opts.behaviour or "refusal"), profile_defaults(opts.behaviour or "refusal")
    n_test = opts.n_test if opts.n_test is not None else given.get("n_test", defaults.n_test)
    check_lengths(opts.min_new_tokens, opts.max_new_tokens)
    if min(n_test, opts.batch_size, opts.kl_tokens) < 1:
        raise OptionError(
            "--n-test, --batch-size and --kl-tokens must be at least 1, "
            f"got {n_test}, {opts.batch_size}, {opts.kl_tokens}"
        )
    if profile.name == "refusal":
        harmful, harmless = bundled("harmful", "test", limit=n_test), bundled("harmless", "test", limit=n_test)
    else:  # the profile's own held-out prompts, split as run splits them
        n_train, n_val = (given.get(k, getattr(defaults, k)) for k in ("n_train", "n_val"))
        sides = profile_splits(profile, SplitSizes(n_train, n_val, n_test, given.get("seed", defaults.seed)))
        harmful, harmless = sides[0].test, sides[1].test
    if min(len(harmful), len(harmless)) < n_test:
        raise PromptError(
            f"the bundled test split has {len(harmful)} harmful and {len(harmless)} harmless prompts; lower --n-test"
        )
    return profile, n_test, harmful, harmless


def eval_judge(opts: EvalOptions, profile: Any) -> tuple[Any, str, dict[str, Any]]:
    """The judge (``--judge``, else the profile's), its spec, and the Evaluator's extra judges to compare with."""
    from abliterate.evaluate.llm_judges import judge_from_spec

    where_judge = {k: v for k, v in opts.where.items() if k in ("device", "dtype")}
    spec, others = opts.judge or profile.judge, {}
    if profile.name == "refusal":
        return judge_from_spec(spec, labels=opts.judge_labels, batch_size=opts.batch_size, **where_judge), spec, {}
    settings = profile.judge_settings()
    labels = opts.judge_labels or settings.pop("labels", None)
    settings.pop("labels", None)
    the_judge = (
        profile.marker_judge()
        if spec == "marker"
        else judge_from_spec(spec, labels=labels, batch_size=opts.batch_size, **settings, **where_judge)
    )
    others = {"compare": [] if spec == "marker" else [profile.marker_judge()]}
    return the_judge, spec, others


def load_pair(opts: EvalOptions) -> tuple[Any, Any]:
    """The reference (``--base``, else the model itself) and the model, formatted as the flags say."""
    from abliterate.lm.loading import load_model

    fmt = (opts.disable_thinking, opts.response_prefix)
    reference = load_model(opts.base or opts.model, **opts.where).with_prompt_format(*fmt)
    target = load_model(opts.model, **opts.where).with_prompt_format(*fmt) if opts.base else reference
    if target.tokenizer.get_vocab() != reference.tokenizer.get_vocab():
        raise OptionError("the model and --base use different tokenizers; KL needs the same vocabulary")
    return reference, target


def compare(opts: EvalOptions, defaults: Any) -> Comparison:
    """Measure the model (and its base) as ``abliterate eval`` does; ``defaults`` is the RunConfig whose values
    stand in for what neither the flags nor the behaviour profile set."""
    from abliterate.evaluate.capability import Harness
    from abliterate.evaluate.evaluation import Evaluator, baseline_note

    for path, flag in ((opts.out_file, "--out"), (opts.report, "--report")):
        if path is not None and path.exists():
            raise OutputError(f"{flag} {path} already exists; choose another path")
    if (opts.task_path or opts.limit is not None) and not opts.tasks:
        raise OptionError("--task-path and --limit apply to --tasks; name the lm-eval tasks to run with --tasks")
    profile, n_test, harmful, harmless = held_out(opts, defaults)
    harness = None
    if opts.tasks is not None:  # task names are checked before any model is loaded
        harness = Harness([opts.tasks], task_paths=opts.task_path or [], limit=opts.limit, batch_size=opts.batch_size)
    reference, target = load_pair(opts)
    the_judge, spec, others = eval_judge(opts, profile)
    ev = Evaluator(
        reference,
        harmful,
        harmless,
        system=opts.system,
        max_new_tokens=opts.max_new_tokens,
        min_new_tokens=opts.min_new_tokens,
        kl_tokens=opts.kl_tokens,
        judge=the_judge,
        batch_size=opts.batch_size,
        **others,
    )
    rows = {"base": ev.measure("base")} if opts.base else {}
    rows["model"] = ev.measure("model", model=target)
    for metrics in rows.values():
        metrics.behaviour = profile.name
    payload: dict[str, Any] = {k: v.to_dict() for k, v in rows.items()}
    scores = {}
    if harness is not None:  # after the refusal metrics: the harness may leave the model in its own settings
        scores = {name: harness.score(reference if name == "base" else target, name) for name in rows}
        for name, cap in scores.items():
            payload[name]["capability"] = cap.to_dict()
    payload["settings"] = eval_settings(opts, n_test, spec, profile.name, reference, harness)
    if opts.base:
        payload["note"] = baseline_note(rows["base"]) if profile.name == "refusal" else ""
    return Comparison(rows, scores, payload)


def evaluate(options: EvalOptions, defaults: RunConfig | None = None) -> Comparison:
    """Measure a model, and its base when ``options.base`` names one, as ``abliterate eval`` does, and write the
    metrics JSON (``options.out_file``) and HTML report (``options.report``) that were asked for.

    Args:
        options: what to measure: ``model`` (hub id, local folder or ``.gguf``), ``base``, the behaviour profile,
            the number of held-out prompts, the judge, generation lengths, lm-eval ``tasks``, the output paths and
            ``where`` (``load_model`` placement keywords such as ``{"device": "cuda"}``).
        defaults: the run settings that stand in for what neither ``options`` nor the behaviour profile set
            (``RunConfig()`` when None).

    Returns:
        The :class:`Comparison`: per condition (``"base"``, ``"model"``) the metrics (verdicts with 95% intervals,
        KL, perplexity), the lm-eval scores, and the JSON payload ``abliterate eval --json`` prints.

    Example:
        >>> from abliterate import EvalOptions, evaluate
        >>> result = evaluate(EvalOptions("out/", base="Qwen/Qwen2.5-0.5B-Instruct", n_test=16))
        >>> result.rows["model"].refusal_rate, result.payload["model"]["kl"]
    """
    result = compare(options, defaults if defaults is not None else RunConfig())
    write_comparison(result, options)
    return result


def eval_settings(
    opts: EvalOptions, n_test: int, spec: str, behaviour: str, reference: Any, harness: Any
) -> dict[str, Any]:
    """The ``settings`` of eval's metrics payload."""
    return {
        "n_test": n_test,
        "min_new_tokens": opts.min_new_tokens,
        "max_new_tokens": opts.max_new_tokens,
        "kl_tokens": opts.kl_tokens,
        "judge": spec,
        "behaviour": behaviour,
        "judge_labels": opts.judge_labels,
        "system": opts.system,
        "template_kwargs": reference.template_kwargs,
        "response_prefix": reference.response_prefix,
        "capability": harness.settings() if harness else None,
    }


def write_comparison(result: Comparison, opts: EvalOptions) -> None:
    """Write the metrics JSON (``--out``) and the HTML report (``--report``) that were asked for."""
    if opts.out_file is not None:
        write_text(opts.out_file, json.dumps(result.payload, indent=2) + "\n")
    if opts.report is not None:
        from abliterate.outputs.report import eval_report

        html = eval_report(opts.model, opts.base, result.rows, result.scores, result.payload.get("note", ""))
        write_text(opts.report, html)


def write_text(path: Path, text: str) -> None:
    """Write through a hidden temporary file: a Ctrl-C or a full disk never leaves half a file behind."""
    partial = path.with_name(f".{path.name}.tmp")
    try:
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
