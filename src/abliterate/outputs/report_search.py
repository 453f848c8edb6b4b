"""The search's part of ``run``'s report: the refusal / KL front with the chosen trial, and the trial table."""

from __future__ import annotations

import html
from pathlib import Path

from abliterate.outputs.plots import img_tag, pyplot, save_figure
from abliterate.select.search import SearchResult


def front_plot(folder: Path, result: SearchResult) -> Path:
    """front.png: every trial's validation refusal score against its first-token KL, the Pareto front joined,
    trials checked by generation ringed, the chosen one starred, the unedited model at KL 0."""
    fig, ax = pyplot().subplots(figsize=(6.4, 3.8))
    ax.scatter([t.kl for t in result.trials], [t.refusal for t in result.trials], s=12, c="#9aa", label="trials")
    front = sorted((t for t in result.trials if t.on_front), key=lambda t: t.kl)
    ax.plot([t.kl for t in front], [t.refusal for t in front], "-o", ms=4, color="#1f77b4", label="Pareto front")
    judged = [t for t in result.trials if t.refused is not None]
    if judged:
        ax.scatter(
            [t.kl for t in judged],
            [t.refusal for t in judged],
            s=70,
            facecolors="none",
            edgecolors="#555",
            label="checked by generation",
        )
    if "refusal" in result.base:
        ax.scatter([0.0], [result.base["refusal"]], marker="s", s=40, color="#d62728", label="unedited")
    if result.chosen is not None:
        ax.scatter(
            [result.chosen.kl],
            [result.chosen.refusal],
            marker="*",
            s=220,
            color="#ff7f0e",
            zorder=5,
            label=f"chosen (trial {result.chosen.number})",
        )
    ax.axvline(result.kl_budget, ls=":", color="#888", lw=1)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("first-token KL on harmless validation prompts (KL budget dotted)", fontsize=8)
    ax.set_ylabel("refusal score (harmful validation)", fontsize=8)
    ax.set_title(f"search: {len(result.trials)} trials, {len(front)} on the front", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, folder / "front.png")


def search_section(folder: Path, result: SearchResult) -> str:
    """HTML: the front plot, the policy's note and the front's trials (every trial is in metrics.json)."""
    rows = []
    for t in sorted((t for t in result.trials if t.on_front), key=lambda t: t.refusal):
        spec = t.spec
        judged = (
            "-" if t.failures is None else f"{t.failures}/{t.judged} ({t.refused} refused, {t.degenerate} degenerate)"
        )
        damage = (
            "<td>-</td>" * 3
            if t.answer_kl is None
            else (
                f"<td>{t.answer_kl:.4f}</td><td>{t.harmless_degenerate}/{t.harmless_judged}</td><td>{t.perplexity:.2f}</td>"
            )
        )
        star = ' class="pass"' if result.chosen is not None and t.number == result.chosen.number else ""
        where = "own layer" if spec["direction_index"] is None else f"{spec['direction_index']:.2f}"
        emb = "on" if spec["embedding"] else "off"
        rows.append(
            f"<tr{star}><td>{t.number}</td><td>{t.refusal:.2f}</td><td>{t.kl:.4f}</td><td>{judged}</td>{damage}"
            f"<td>{html.escape(str(spec['method']))}</td><td>{where}</td>"
            f"<td>{spec['k']}</td><td>{emb}</td><td>{spec['norm_preserving']}</td></tr>"
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
        "<table><tr><th>trial</th><th>refusal score</th><th>KL</th><th>judged failures</th><th>answer KL</th>"
        "<th>degenerate harmless</th><th>perplexity</th><th>method</th>"
        "<th>direction</th><th>k</th><th>embedding</th><th>norm-preserving</th></tr>\n" + "\n".join(rows) + "</table>"
    )
