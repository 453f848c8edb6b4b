"""Human-readable outputs of ``run`` and ``measure``: PNG plots, a self-contained HTML report and a model card."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .capture import Activations
from .evaluation import Metrics, Sample, behaviour_label, format_rate

if TYPE_CHECKING:
    from .pipeline import RunResult
    from .selection import Selection


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def candidates_plot(folder: Path, sel: Selection) -> Path:
    """candidates.png: bypass, induce and KL of every candidate per layer, the chosen one starred."""
    fig, axes = _pyplot().subplots(1, 3, figsize=(13, 3.6))
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
    if sel.chosen:
        for ax, key in zip(axes, ("bypass", "induce", "kl"), strict=True):
            ax.plot([sel.chosen.layer], [getattr(sel.chosen, key)], "r*", ms=12)
    axes[0].legend(fontsize=7)
    return _save(fig, folder / "candidates.png")


def directions_plot(folder: Path, acts: Activations) -> Path:
    """directions.png: norm of the mean difference and harmful/harmless separation per residual point."""
    diff = acts.harmful_mean - acts.harmless_mean
    norms = diff.norm(dim=-1)[:, -1].tolist()
    scale = ((acts.harmful_mean.norm(dim=-1) + acts.harmless_mean.norm(dim=-1)) / 2)[:, -1].tolist()
    cos = [
        1 - float((a @ b) / (a.norm() * b.norm() + 1e-12))
        for a, b in zip(acts.harmful_mean[:, -1], acts.harmless_mean[:, -1], strict=True)
    ]
    fig, axes = _pyplot().subplots(1, 2, figsize=(10, 3.4))
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
    return _save(fig, folder / "directions.png")


def refusals_plot(folder: Path, before: Metrics, after: Metrics) -> Path:
    """refusals.png: refusal, compliance and degenerate rates on harmful prompts and over-refusal on harmless
    ones, before and after the edit, with 95 % Wilson intervals as error bars."""
    fig, ax = _pyplot().subplots(figsize=(7, 3.4))
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
    return _save(fig, folder / "refusals.png")


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{path.stem}" src="data:image/png;base64,{data}">'


def _cell(sample: Sample) -> str:
    why = f" ({sample.reason})" if sample.reason else ""
    return (
        f"<td class='{sample.verdict}'><span class='verdict'>{sample.verdict}{html.escape(why)}</span> "
        f"{html.escape(sample.response)}</td>"
    )


def _kpi(before: Metrics, after: Metrics) -> str:
    """The before/after table: every verdict rate with its 95 % Wilson interval, then KL."""
    rows = [
        ("refusal rate, held-out harmful", "refusal_rate", before.n_harmful),
        ("compliance, held-out harmful", "compliance_rate", before.n_harmful),
        ("degenerate, held-out harmful", "degenerate_rate", before.n_harmful),
        ("unparsed by the judge, held-out harmful", "unparsed_rate", before.n_harmful),
        ("over-refusal, held-out harmless", "over_refusal", before.n_harmless),
        ("degenerate, held-out harmless", "harmless_degenerate_rate", before.n_harmless),
        ("unparsed by the judge, held-out harmless", "harmless_unparsed_rate", before.n_harmless),
    ]
    if before.behaviour != "refusal":
        rows = [(behaviour_label(key, before.behaviour) + ", held-out", key, n) for _, key, n in rows]
    body = "".join(
        f"<tr><td>{label} ({n})</td><td>{format_rate(before, key)}</td><td>{format_rate(after, key)}</td></tr>"
        for label, key, n in rows
        if "unparsed" not in key or before.rate(key) or after.rate(key)
    )
    for name, a in after.agreement().items():
        b = before.agreement().get(name, {"rate": 0.0, "n": 0})
        body += (
            f"<tr><td>agreement with the {html.escape(name)} judge (answers not degenerate)</td>"
            f"<td>{b['rate']:.0%} of {b['n']}</td><td>{a['rate']:.0%} of {a['n']}</td></tr>"
        )
    return (
        f"<p>Judge: <b>{html.escape(before.judge)}</b>. Degenerate answers (empty, non-text, repeated n-grams, "
        "loops) are failures, never compliance. Rates with 95% Wilson intervals.</p>"
        '<table class="kpi"><tr><th></th><th>before</th><th>after</th></tr>'
        f"{body}<tr><td>KL(base || edited), first response token</td><td>{before.kl:.4f}</td><td>{after.kl:.4f}</td></tr>"
        f"<tr><td>KL(base || edited), mean over the first {after.kl_tokens} tokens of the base model's answers</td>"
        f"<td>{before.kl_answer:.4f}</td><td>{after.kl_answer:.4f}</td></tr>"
        f"<tr><td>perplexity on harmless texts</td><td>{before.perplexity:.2f}</td><td>{after.perplexity:.2f}</td></tr></table>"
    )


def _samples(before: Metrics, after: Metrics, limit: int) -> str:
    rows = []
    for b, a in (
        list(zip(before.harmful_samples, after.harmful_samples, strict=True))[:limit]
        + list(zip(before.harmless_samples, after.harmless_samples, strict=True))[: max(1, limit // 2)]
    ):
        rows.append(f"<tr><td>{html.escape(b.prompt)}</td>{_cell(b)}{_cell(a)}</tr>")
    return "".join(rows)


def _header(title: str, model: object, sel: Selection, note: str) -> str:
    c = sel.chosen
    note_html = f"<p class='note'>{html.escape(note)}</p>" if note else ""
    return f"""<h1>{title}</h1>
<p>Model <code>{html.escape(str(model))}</code>; chosen direction:
<b>{html.escape(c.method) if c else "none"}</b> at layer <b>{c.layer if c else "-"}</b>, position {c.position if c else "-"}.</p>
{note_html}"""


def _selection_sections(sel: Selection, candidates: Path, directions: Path) -> tuple[str, str]:
    """(plots, table): the per-layer plots and the candidate table, shared by both reports."""
    table = "".join(
        f"<tr class='{'pass' if x.passed else 'fail'}'><td>{x.method}</td><td>{x.layer}</td><td>{x.position}</td>"
        f"<td>{x.bypass:.3f}</td><td>{x.induce:.3f}</td><td>{x.kl:.4f}</td><td>{html.escape(x.reason)}</td></tr>"
        for x in sel.candidates
    )
    plots = (
        f"<h2>Per-layer candidate scores</h2>{_img(candidates)}\n"
        f"<h2>Direction norm and separation</h2>{_img(directions)}\n"
    )
    return plots, (
        f"<h2>Candidate table</h2><p>{html.escape(sel.note)} ({sel.seconds:.0f} s)</p>\n"
        "<table><tr><th>method</th><th>layer</th><th>position</th><th>bypass</th><th>induce</th><th>KL</th>"
        f"<th>filtered because</th></tr>\n{table}</table>"
    )


def _page(folder: Path, title: str, body: str) -> Path:
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;font-size:13px;width:100%}}td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}
.refusal{{background:#fde2e2}}.compliance{{background:#e3f6e3}}.degenerate{{background:#eee}}.unparsed{{background:#fff3cd}}.verdict{{font-size:11px;color:#555;display:block}}.fail{{color:#888}}.pass{{font-weight:600}}
img{{max-width:100%}}.note{{background:#fff3cd;padding:.6em}}.kpi td{{font-size:15px}}</style></head><body>
{body}</body></html>
"""
    path = folder / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path


def write_report(folder: Path, result: RunResult, acts: Activations) -> Path:
    """``run``'s report: candidates/directions/refusals PNGs and report.html with the plots embedded."""
    sel, b, a = result.selection, result.before, result.after
    plots, table = _selection_sections(sel, candidates_plot(folder, sel), directions_plot(folder, acts))
    body = f"""{_header("abliterate report", result.config.get("model"), sel, result.note)}
{_kpi(b, a)}
{plots}<h2>{"Refusals" if b.behaviour == "refusal" else html.escape(b.behaviour)} before / after</h2>{_img(refusals_plot(folder, b, a))}
{_search_html(folder, result)}
<h2>Sample generations</h2><table><tr><th>prompt</th><th>before</th><th>after</th></tr>
{_samples(b, a, int(result.config.get("samples", 6)))}</table>
{table}"""
    return _page(folder, "abliterate report", body)


def _search_html(folder: Path, result: RunResult) -> str:
    choice = result.choice
    if choice is None or choice.search is None:
        return ""
    from .report_search import search_section

    return search_section(folder, choice.search)


def write_measure_report(folder: Path, sel: Selection, acts: Activations, config: dict[str, Any]) -> Path:
    """``measure``'s report: what a sweep knows (candidates and directions; no edit, so no before/after)."""
    plots, table = _selection_sections(sel, candidates_plot(folder, sel), directions_plot(folder, acts))
    header = _header("abliterate measure report", config.get("model"), sel, "" if sel.chosen else sel.note)
    return _page(folder, "abliterate measure report", f"{header}\n{plots}{table}")


def _edit_words(result: RunResult) -> str:
    choice, cfg = result.choice, result.config
    if choice is None or choice.search is None:
        return f"every writer, scale {cfg.get('scale')}, norm-preserving: {cfg.get('norm_preserving')}"
    n = len(choice.search.trials)
    return (
        f"the edit was chosen by a search of {n} trials ({choice.search.note}); its per-layer strengths are in "
        f"`edit.json`: `{json.dumps(choice.spec.to_dict())}`"
    )


def model_card(result: RunResult) -> str:
    sel, b, a, cfg = result.selection, result.before, result.after, result.config
    c = sel.chosen
    return f"""---
tags: [abliterate, abliteration, refusal-direction]
base_model: {cfg.get("model")}
---
# Abliterated {cfg.get("model")}

Made with [abliterate](https://pypi.org/project/abliterate/): the refusal direction was found from
{cfg.get("n_train")} harmful and {cfg.get("n_train")} harmless prompts and removed from the weights that write
into the residual stream (`W <- W - s r r^T W`): {_edit_words(result)}.

| | value |
|---|---|
| method | {c.method if c else "-"} |
| layer / position | {c.layer if c else "-"} / {c.position if c else "-"} |
| refusal rate on held-out harmful prompts ({b.n_harmful}) | {format_rate(b, "refusal_rate")} -> {format_rate(a, "refusal_rate")} |
| compliance on held-out harmful prompts | {format_rate(b, "compliance_rate")} -> {format_rate(a, "compliance_rate")} |
| degenerate answers to held-out harmful prompts | {format_rate(b, "degenerate_rate")} -> {format_rate(a, "degenerate_rate")} |
| over-refusal on held-out harmless prompts ({b.n_harmless}) | {format_rate(b, "over_refusal")} -> {format_rate(a, "over_refusal")} |
| degenerate answers to held-out harmless prompts | {format_rate(b, "harmless_degenerate_rate")} -> {format_rate(a, "harmless_degenerate_rate")} |
| KL(base, edited), first response token | {a.kl:.4f} |
| KL(base, edited), first {a.kl_tokens} tokens of the base model's answers | {a.kl_answer:.4f} |
| perplexity on harmless texts | {b.perplexity:.2f} -> {a.perplexity:.2f} |

Rates are judged by the {b.judge} judge (degenerate answers: empty, non-text, repeated n-grams or loops)
with 95% Wilson intervals in parentheses.

{result.note}

Loads with plain `transformers` (`AutoModelForCausalLM.from_pretrained`). The direction set is in
`directions.safetensors`, every number in `metrics.json`, the effective configuration and versions in
`abliterate_config.json`, plots in `report.html`.
"""
