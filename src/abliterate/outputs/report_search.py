"""The search's part of ``run``'s report: the refusal / KL front with the chosen trial, the trials checked by
generation (with what the check measured of each) and the front's trials."""

from __future__ import annotations

import html
from dataclasses import asdict
from pathlib import Path
from typing import Any

from abliterate.edit.spec import EditSpec
from abliterate.outputs.plots import img_tag, pyplot, save_figure
from abliterate.select.search import SearchResult, TrialRecord


def front_plot(folder: Path, result: SearchResult) -> Path:
    """front.png: every trial's validation refusal score against its first-token KL, the Pareto front joined,
    trials checked by generation ringed, the chosen one starred, the unedited model at KL 0."""
    return save_figure(front_figure(result), folder / "front.png")


def front_figure(result: SearchResult) -> Any:
    """The figure of :func:`front_plot` (open: the caller saves or closes it). KL is never negative: the axis
    starts at 0, linear up to 10⁻³ and logarithmic beyond."""
    fig, ax = pyplot().subplots(figsize=(6.4, 3.8))

    def kl(ts: list[TrialRecord]) -> list[float]:
        return [max(t.kl, 0.0) for t in ts]  # a rounding error below 0 is drawn at 0

    ax.scatter(kl(result.trials), [t.refusal for t in result.trials], s=12, c="#9aa", label="trials")
    front = sorted((t for t in result.trials if t.on_front), key=lambda t: t.kl)
    ax.plot(kl(front), [t.refusal for t in front], "-o", ms=4, color="#1f77b4", label="Pareto front")
    judged = [t for t in result.trials if t.refused is not None]
    if judged:
        ax.scatter(
            kl(judged),
            [t.refusal for t in judged],
            s=70,
            facecolors="none",
            edgecolors="#555",
            label="checked by generation",
        )
    if "refusal" in result.base:
        ax.scatter([0.0], [result.base["refusal"]], marker="s", s=40, color="#d62728", label="unedited", clip_on=False)
    if result.chosen is not None:
        ax.scatter(
            kl([result.chosen]),
            [result.chosen.refusal],
            marker="*",
            s=220,
            color="#ff7f0e",
            zorder=5,
            label=f"chosen (trial {result.chosen.number})",
        )
    ax.axvline(result.kl_budget, ls=":", color="#888", lw=1)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlim(left=0.0)  # KL >= 0: no negative half (symlog is symmetric, so it would draw a -10⁻³ tick)
    ax.set_xlabel("first-token KL on harmless validation prompts (KL budget dotted)", fontsize=8)
    ax.set_ylabel("refusal score (harmful validation)", fontsize=8)
    ax.set_title(f"search: {len(result.trials)} trials, {len(front)} on the front", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return fig


# what the front check measured of each checked trial, where the search result has it: (column, key, kind)
CHECKS = (
    ("answer KL", "answer_kl", "kl"),
    ("perplexity", "perplexity", "float"),
    ("degenerate answers, harmful", "degenerate", "count"),
    ("degenerate answers, harmless", "harmless_degenerate", "count"),
)


def measured(trial: dict[str, Any], key: str) -> Any:
    """A trial's value of ``key`` from ``SearchResult.to_dict()``: a field of the trial, or one of its scores."""
    if trial.get(key) is not None:
        return trial[key]
    scores = trial.get("scores")
    return scores.get(key) if isinstance(scores, dict) else None


def _value(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "count":
        return str(int(value)) if float(value).is_integer() else f"{value:.1f}"
    return f"{value:.4f}" if kind == "kl" else f"{value:.2f}"


def _judged(t: dict[str, Any]) -> str:
    """A checked trial's judged failures ("3/32 (2 refused, 1 degenerate)"), or refusals where that is all it has."""
    if t.get("refused") is None:
        return "-"
    if t.get("failures") is not None:
        return f"{t['failures']}/{t['judged']} ({t['refused']} refused, {t.get('degenerate', 0)} degenerate)"
    return f"{t['refused']}/{t['judged']}" if t.get("judged") is not None else str(t["refused"])


def checked_table(result: dict[str, Any]) -> str:
    """HTML: every trial checked by generation (``SearchResult.to_dict()``), with judged refusals, first-token KL
    and, where the check measured them, answer KL, perplexity and degenerate counts; empty when none was checked."""
    trials = [t for t in result.get("trials", []) if t.get("refused") is not None]
    if not trials:
        return ""
    columns = [c for c in CHECKS if any(measured(t, c[1]) is not None for t in trials)]
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _, _ in columns)
    rows = []
    for t in sorted(trials, key=lambda t: t["number"]):
        chosen = t["number"] == result.get("chosen")
        judged = _judged(t)
        cells = "".join(f"<td>{_value(measured(t, key), kind)}</td>" for _, key, kind in columns)
        star, mark = (' class="pass"', " (chosen)") if chosen else ("", "")
        rows.append(
            f"<tr{star}><td>{t['number']}{mark}</td><td>{judged}</td><td>{_value(t['kl'], 'kl')}</td>{cells}</tr>"
        )
    base = result.get("base_refused")
    unedited = "" if base is None else f" The unedited model: {base} judged refusals on the same prompts."
    what = "judged failures (refusals + degenerate)" if trials[0].get("failures") is not None else "judged refusals"
    return (
        f"<h3>Trials checked by generation ({len(trials)})</h3><p>Greedy answers judged by the run's judge.{unedited}"
        f"</p>\n<table class='checked'><tr><th>trial</th><th>{what}</th><th>first-token KL</th>"
        f"{head}</tr>\n" + "\n".join(rows) + "</table>"
    )


def search_section(folder: Path, result: SearchResult) -> str:
    """HTML: the front plot, the policy's note, the trials checked by generation and the front's trials (every
    trial is in metrics.json)."""
    rows = []
    for t in sorted((t for t in result.trials if t.on_front), key=lambda t: t.refusal):
        judged = _judged(asdict(t))
        chosen = result.chosen is not None and t.number == result.chosen.number
        star, mark = (' class="pass"', " (chosen)") if chosen else ("", "")
        rows.append(
            f"<tr{star}><td>{t.number}{mark}</td><td>{t.refusal:.2f}</td><td>{t.kl:.4f}</td><td>{judged}</td>"
            f"<td>{html.escape(EditSpec.from_dict(t.spec).label())}</td></tr>"
        )
    base = result.base.get("refusal")
    b = result.base_check
    judged_base = (
        ""
        if b is None
        else (
            f"; unedited, on the held-out check: {b['failures']}/{b['judged']} failures ({b['refused']} refused, "
            f"{b['degenerate']} degenerate), {b['harmless_degenerate']}/{b['harmless_judged']} degenerate harmless "
            f"answers, perplexity {b['perplexity']:.2f}"
        )
    )
    return (
        f"<h2>Search</h2><p>{html.escape(result.note)} ({result.seconds:.0f} s; unedited refusal score "
        f"{base if base is None else f'{base:.2f}'}{judged_base})</p>{img_tag(front_plot(folder, result))}\n"
        f"{checked_table(result.to_dict())}\n<h3>The Pareto front</h3>"
        "<table><tr><th>trial</th><th>refusal score</th><th>first-token KL</th>"
        "<th>judged failures (refusals + degenerate)</th><th>edit</th></tr>\n" + "\n".join(rows) + "</table>"
    )
