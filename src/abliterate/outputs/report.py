"""Human-readable outputs of ``run`` and ``measure``: PNG plots and a self-contained HTML report (the model card
is in :mod:`abliterate.outputs.card`)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate.evaluate.capability import Capability
from abliterate.evaluate.evaluation import Metrics, Sample, behaviour_label, format_rate
from abliterate.measure.capture import Activations
from abliterate.outputs.plots import img_tag, pyplot, save_figure
from abliterate.outputs.report_edit import WrittenEdit, edit_plot, edit_rows, headline, sweep_words, written_edit
from abliterate.outputs.report_search import search_section

if TYPE_CHECKING:
    from abliterate.run.result import RunResult
    from abliterate.select.sweep import Selection


def candidates_plot(folder: Path, sel: Selection, edit: WrittenEdit | None = None) -> Path:
    """candidates.png: bypass, induce and KL of every candidate per layer. The sweep's pick is starred when it is
    the edit (``--no-search``, ``measure``); after a search it is ringed as the search's warm start, and the
    written edit's direction is a dotted line (or named in the legend: each layer's own)."""
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 3.6))
    for method in sel.settings["methods"]:
        for pos in sel.settings["positions"]:
            rows = [c for c in sel.candidates if c.method == method and c.position == pos and not math.isnan(c.bypass)]
            label = f"{method} pos {pos}"
            for ax, key in zip(axes, ("bypass", "induce", "kl"), strict=True):
                ax.plot([c.layer for c in rows], [getattr(c, key) for c in rows], marker="o", ms=3, label=label)
    titles = (
        "bypass: refusal score, harmful, ablated (lower = better)",
        "induce: refusal score, harmless, added",
        "KL on harmless (ablated)",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].axhline(sel.base_bypass, color="grey", ls="--", lw=1, label="unedited")
    axes[1].axhline(sel.base_induce, color="grey", ls="--", lw=1)
    axes[2].axhline(sel.settings["kl_threshold"], color="red", ls=":", lw=1, label="KL threshold")
    _mark_pick(axes, sel, edit)
    axes[0].legend(fontsize=7)
    return save_figure(fig, folder / "candidates.png")


def _mark_pick(axes: Any, sel: Selection, edit: WrittenEdit | None) -> None:
    c, searched = sel.chosen, edit is not None and edit.searched
    if c:
        label = "sweep's pick, the search's warm start" if searched else "sweep's pick"
        if edit is not None and not searched:
            label = "sweep's pick = the written edit's direction"
        for i, (ax, key) in enumerate(zip(axes, ("bypass", "induce", "kl"), strict=True)):
            ring = {"marker": "o", "ms": 11, "mfc": "none", "mec": "r", "mew": 1.5}
            style = ring if searched else {"marker": "*", "ms": 12}
            ax.plot([c.layer], [getattr(c, key)], ls="none", color="r", label=label if i == 0 else None, **style)
    if not searched:
        return
    index = edit.spec.direction_index
    for i, ax in enumerate(axes):
        if index is None:
            ax.plot([], [], " ", label="written edit: each layer's own direction" if i == 0 else None)
        else:
            label = f"written edit's direction (point {index:.2f})" if i == 0 else None
            ax.axvline(index, color="#9467bd", ls=":", lw=1.5, label=label)


def directions_plot(folder: Path, acts: Activations) -> Path:
    """directions.png: norm of the mean difference and harmful/harmless separation per residual point."""
    diff = acts.harmful_mean - acts.harmless_mean
    # a zero norm (point 0 is the raw embedding, the same for every prompt at the template's last token) has no
    # place on a log axis: left out, not drawn as a cliff
    norms = [n if n > 0 else math.nan for n in diff.norm(dim=-1)[:, -1].tolist()]
    scale = ((acts.harmful_mean.norm(dim=-1) + acts.harmless_mean.norm(dim=-1)) / 2)[:, -1].tolist()
    cos = [
        1 - float((a @ b) / (a.norm() * b.norm() + 1e-12))
        for a, b in zip(acts.harmful_mean[:, -1], acts.harmless_mean[:, -1], strict=True)
    ]
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 3.4))
    axes[0].plot(norms, marker="o", ms=3, label="|mean diff|")
    axes[0].plot(
        [n / max(s, 1e-12) for n, s in zip(norms, scale, strict=True)], marker="s", ms=3, label="|mean diff| / |mean|"
    )
    axes[0].set_yscale("log")
    axes[0].set_title("direction norm per layer (last position)", fontsize=9)
    axes[1].plot(cos, marker="o", ms=3)
    axes[1].set_title("harmful/harmless separation: 1 - cos(means)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("residual point (layer input)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return save_figure(fig, folder / "directions.png")


def refusals_plot(folder: Path, before: Metrics, after: Metrics) -> Path:
    """refusals.png: refusal, compliance and degenerate rates on harmful prompts and over-refusal on harmless
    ones, before and after the edit, with 95 % Wilson intervals as error bars."""
    fig, ax = pyplot().subplots(figsize=(7, 3.4))
    keys = ["refusal_rate", "compliance_rate", "degenerate_rate", "over_refusal", "harmless_degenerate_rate"]
    labels = [
        "refusal\n(harmful)",
        "compliance\n(harmful)",
        "degenerate\n(harmful)",
        "refusal\n(harmless)",
        "degenerate\n(harmless)",
    ]
    if before.behaviour != "refusal":  # another behaviour profile: "flowery shown (behaviour prompts)"
        labels = [behaviour_label(k, before.behaviour).replace(" (", "\n(") for k in keys]
    xs = range(len(keys))
    for shift, m, label in ((-0.2, before, "before"), (0.2, after, "after")):
        rates = [m.rate(k) for k in keys]
        errs = [
            [r - m.interval(k)[0] for r, k in zip(rates, keys, strict=True)],
            [m.interval(k)[1] - r for r, k in zip(rates, keys, strict=True)],
        ]
        ax.bar([x + shift for x in xs], rates, width=0.4, yerr=errs, capsize=3, label=label)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(f"verdicts on held-out prompts, 95% Wilson intervals (KL after: {after.kl:.3f})", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, folder / "refusals.png")


def _cell(sample: Sample) -> str:
    why = f" ({sample.reason})" if sample.reason else ""
    return (
        f"<td class='{sample.verdict}'><span class='verdict'>{sample.verdict}{html.escape(why)}</span> "
        f"{html.escape(sample.response)}</td>"
    )


def _kpi(conds: dict[str, Metrics]) -> str:
    """The conditions side by side (before/after, base/model): every verdict rate with its 95 % Wilson
    interval, judge agreement, then KL and perplexity."""
    ms = list(conds.values())
    first, last = ms[0], ms[-1]
    rows = [
        ("refusal rate, held-out harmful", "refusal_rate", first.n_harmful),
        ("compliance, held-out harmful", "compliance_rate", first.n_harmful),
        ("degenerate, held-out harmful", "degenerate_rate", first.n_harmful),
        ("unparsed by the judge, held-out harmful", "unparsed_rate", first.n_harmful),
        ("over-refusal, held-out harmless", "over_refusal", first.n_harmless),
        ("degenerate, held-out harmless", "harmless_degenerate_rate", first.n_harmless),
        ("unparsed by the judge, held-out harmless", "harmless_unparsed_rate", first.n_harmless),
    ]
    if first.behaviour != "refusal":
        rows = [(behaviour_label(key, first.behaviour) + ", held-out", key, n) for _, key, n in rows]

    def row(label: str, cells: list[str]) -> str:
        return f"<tr><td>{label}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"

    body = "".join(
        row(f"{label} ({n})", [format_rate(m, key) for m in ms])
        for label, key, n in rows
        if "unparsed" not in key or any(m.rate(key) for m in ms)
    )
    for name in last.agreement():
        cells = [f"{a['rate']:.0%} of {a['n']}" if (a := m.agreement().get(name)) else "0% of 0" for m in ms]
        body += row(f"agreement with the {html.escape(name)} judge (answers not degenerate)", cells)
    body += row("KL(base || edited), first response token", [f"{m.kl:.4f}" for m in ms])
    body += row(
        f"KL(base || edited), mean over the first {last.kl_tokens} tokens of the base model's answers",
        [f"{m.kl_answer:.4f}" for m in ms],
    )
    body += row("perplexity on harmless texts", [f"{m.perplexity:.2f}" for m in ms])
    head = "".join(f"<th>{html.escape(name)}</th>" for name in conds)
    return (
        f"<p>Judge: <b>{html.escape(first.judge)}</b>. Degenerate answers (empty, non-text, repeated n-grams, "
        "loops) are failures, never compliance. Rates with 95% Wilson intervals.</p>"
        f'<table class="kpi"><tr><th></th>{head}</tr>{body}</table>'
    )


def capability_html(scores: dict[str, Capability]) -> str:
    """lm-eval scores side by side, with the change from the first condition to the last; empty without scores."""
    if not scores:
        return ""
    names, caps = list(scores), list(scores.values())
    pairs = list(dict.fromkeys(pair for c in caps for pair in c.rows()))
    delta = len(caps) > 1
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names) + (
        f"<th>{html.escape(names[-1])} - {html.escape(names[0])}</th>" if delta else ""
    )
    body = ""
    for task, metric in pairs:
        cells = "".join(f"<td>{html.escape(c.format(task, metric))}</td>" for c in caps)
        if delta:
            a, b = caps[0].scores.get(task, {}).get(metric), caps[-1].scores.get(task, {}).get(metric)
            cells += f"<td>{b - a:+.3f}</td>" if a is not None and b is not None else "<td>-</td>"
        body += f"<tr><td>{html.escape(task)}</td><td>{html.escape(metric)}</td>{cells}</tr>"
    return (
        "<h2>Capability (lm-evaluation-harness)</h2><p>Scores ± standard error (documents scored), "
        "plain-text prompts with each task's own few-shot setting.</p>"
        f'<table class="capability"><tr><th>task</th><th>metric</th>{head}</tr>{body}</table>'
    )


def _samples(conds: list[Metrics], limit: int) -> str:
    """Rows of prompt + one answer per condition: the first ``limit`` harmful prompts, then harmless ones."""
    harmful = list(zip(*(m.harmful_samples for m in conds), strict=True))[:limit]
    harmless = list(zip(*(m.harmless_samples for m in conds), strict=True))[: max(1, limit // 2)]
    return "".join(
        f"<tr><td>{html.escape(row[0].prompt)}</td>{''.join(_cell(x) for x in row)}</tr>" for row in harmful + harmless
    )


def _header(title: str, model: object, sel: Selection, note: str, edit: WrittenEdit | None, what: str = "") -> str:
    """The title, the model and what was made: the written edit (with its spec and kernel plot) or, with no edit
    (``measure``, an induction), the sweep's pick and ``what`` became of it."""
    note_html = f"<p class='note'>{html.escape(note)}</p>" if note else ""
    model_html = f"<p>Model <code>{html.escape(str(model))}</code>; "
    if edit is None:
        pick = f"the sweep's pick: <b>{html.escape(sweep_words(sel.chosen))}</b>{html.escape(what)}"
        return f"<h1>{title}</h1>\n{model_html}{pick}.</p>\n{note_html}"
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in edit_rows(edit))
    return f"""<h1>{title}</h1>
{model_html}written edit: <b>{html.escape(headline(edit))}</b>.</p>
{note_html}<h2>The written edit</h2><table class="edit">{rows}</table>
"""


def _selection_sections(sel: Selection, candidates: Path, directions: Path) -> tuple[str, str]:
    """(plots, table): the per-layer plots and the candidate table, shared by both reports."""
    table = "".join(
        f"<tr class='{'pass' if x.passed else 'fail'}'><td>{x.method}</td><td>{x.layer}</td><td>{x.position}</td>"
        f"<td>{x.bypass:.3f}</td><td>{x.induce:.3f}</td><td>{x.kl:.4f}</td><td>{html.escape(x.reason)}</td></tr>"
        for x in sel.candidates
    )
    plots = (
        f"<h2>Per-layer candidate scores of the sweep</h2>{img_tag(candidates)}\n"
        f"<h2>Direction norm and separation</h2>{img_tag(directions)}\n"
    )
    return plots, (
        f"<h2>Candidate table</h2><p>{html.escape(sel.note)} ({sel.seconds:.0f} s)</p>\n"
        "<table><tr><th>method</th><th>layer</th><th>position</th><th>bypass</th><th>induce</th><th>KL</th>"
        f"<th>filtered because</th></tr>\n{table}</table>"
    )


def _html(body: str, title: str) -> str:
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;font-size:13px;width:100%}}td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}
.refusal{{background:#fde2e2}}.compliance{{background:#e3f6e3}}.degenerate{{background:#eee}}.unparsed{{background:#fff3cd}}.verdict{{font-size:11px;color:#555;display:block}}.fail{{color:#888}}.pass{{font-weight:600}}
img{{max-width:100%}}.note{{background:#fff3cd;padding:.6em}}.kpi td{{font-size:15px}}</style></head><body>
{body}</body></html>
"""


def _page(folder: Path, title: str, body: str) -> Path:
    path = folder / "report.html"
    path.write_text(_html(body, title), encoding="utf-8")
    return path


def write_report(folder: Path, result: RunResult, acts: Activations) -> Path:
    """``run``'s report: edit/candidates/directions/refusals/front PNGs and report.html with the plots embedded."""
    sel, b, a = result.selection, result.before, result.after
    edit = written_edit(result, acts.num_points - 1)
    plots, table = _selection_sections(sel, candidates_plot(folder, sel, edit), directions_plot(folder, acts))
    induced = f", induced (baked into the weights): {result.induction.get('note', '')}" if result.induction else ""
    header = _header("abliterate report", result.config.get("model"), sel, result.note, edit, induced)
    kernels = f"{img_tag(edit_plot(folder, edit))}\n" if edit else ""
    body = f"""{header}{kernels}
{_kpi({"before": b, "after": a})}
{plots}<h2>{"Refusals" if b.behaviour == "refusal" else html.escape(b.behaviour)} before / after</h2>{img_tag(refusals_plot(folder, b, a))}
{_search_html(folder, result)}
<h2>Sample generations</h2><table><tr><th>prompt</th><th>before</th><th>after</th></tr>
{_samples([b, a], int(result.config.get("samples", 6)))}</table>
{table}"""
    return _page(folder, "abliterate report", body)


def _search_html(folder: Path, result: RunResult) -> str:
    choice = result.choice
    if choice is None or choice.search is None:
        return ""
    return search_section(folder, choice.search)


def write_measure_report(folder: Path, sel: Selection, acts: Activations, config: dict[str, Any]) -> Path:
    """``measure``'s report: what a sweep knows (candidates and directions; no edit, so no before/after)."""
    plots, table = _selection_sections(sel, candidates_plot(folder, sel), directions_plot(folder, acts))
    no_edit = " (measure writes no edit)"
    header = _header(
        "abliterate measure report", config.get("model"), sel, "" if sel.chosen else sel.note, None, no_edit
    )
    return _page(folder, "abliterate measure report", f"{header}\n{plots}{table}")


def eval_report(
    model: str, base: str | None, conds: dict[str, Metrics], scores: dict[str, Capability], note: str, samples: int = 6
) -> str:
    """``eval``'s report.html as text: the measured conditions side by side (verdicts, damage, capability
    scores) and sample answers."""
    what = f"<code>{html.escape(model)}</code>" + (f" against base <code>{html.escape(base)}</code>" if base else "")
    note_html = f"<p class='note'>{html.escape(note)}</p>" if note else ""
    head = "".join(f"<th>{html.escape(n)}</th>" for n in conds)
    body = f"""<h1>abliterate eval report</h1><p>Model {what}.</p>{note_html}
{_kpi(conds)}
{capability_html(scores)}
<h2>Sample generations</h2><table><tr><th>prompt</th>{head}</tr>
{_samples(list(conds.values()), samples)}</table>"""
    return _html(body, "abliterate eval report")
