"""The report's pieces without a run: the written edit in words and as a kernel plot, the front plot's KL axis, and
the table of trials checked by generation (from a synthetic ``SearchResult``)."""

from __future__ import annotations

import html
import re

import pytest

from abliterate.edit.spec import EditSpec, Kernel
from abliterate.outputs.plots import pyplot
from abliterate.outputs.report_edit import WrittenEdit, edit_figure, edit_rows, headline, kernel_words, spans
from abliterate.outputs.report_search import checked_table, front_figure
from abliterate.select.search import SearchResult, TrialRecord
from abliterate.select.sweep import CandidateScore

SWEEP = CandidateScore(layer=15, position=-1, method="mean_diff", bypass=-2.0, induce=3.0, kl=0.1, passed=True)
# the shape of the demo run's trial 44: k=2, each layer's own direction, attention only, embeddings, norm-preserving
TRIAL_44 = EditSpec(
    method="mean_diff",
    position=-1,
    direction_index=None,
    k=2,
    attn=Kernel(peak=18.6, max_weight=1.1, edge_weight=0.3, width=5.0),
    mlp=None,
    embedding=0.7,
    norm_preserving=True,
)


def test_spans():
    assert spans([3, 4, 5, 9]) == "3–5, 9" and spans([0]) == "0" and spans([]) == "none"


def test_the_searched_edit_in_words():
    rows = dict(edit_rows(WrittenEdit(TRIAL_44, 24, 44, SWEEP)))
    # |i - 18.6| <= 5: layers 14..23; weight 1.1 + (0.3 - 1.1) * d / 5: 0.364 at layer 14 (d 4.6), 1.036 at 19
    assert rows["attention writers (output projections)"] == (
        "layers 14–23 (10 of 24); kernel peaking at layer 18.6 with weight 1.10, falling to 0.30 at 5.0 layers from "
        "the peak (weights 0.36–1.04)"
    )
    assert rows["MLP writers (down projections)"] == "untouched"
    assert rows["direction"].startswith("each layer's own")
    assert rows["subspace rank k"].startswith("2 (")
    assert rows["embeddings"] == "scale 0.7" and rows["norm-preserving"] == "yes"
    assert rows["chosen by"] == "the search, trial 44"
    assert rows["search's warm start (the sweep's candidate, not the edit)"] == "mean_diff at layer 15, position -1"
    assert headline(WrittenEdit(TRIAL_44, 24, 44, SWEEP)).endswith("(search trial 44)")


def test_the_sweeps_edit_in_words():
    spec = EditSpec.full(15, norm_preserving=False)
    rows = dict(edit_rows(WrittenEdit(spec, 24, None, SWEEP)))
    assert rows["direction"] == "one direction everywhere: residual point 15 (the input of layer 15)"
    assert rows["attention writers (output projections)"] == "layers 0–23 (24 of 24), weight 1 at each"
    assert rows["chosen by"] == "the sweep (no search): its candidate mean_diff at layer 15, position -1"
    assert not any("warm start" in k for k in rows)
    interpolated = dict(edit_rows(WrittenEdit(EditSpec(direction_index=14.25), 24, 3, SWEEP)))
    assert interpolated["direction"] == (
        "one direction everywhere: residual point 14.25, interpolated between points 14 and 15"
    )
    assert kernel_words(Kernel(peak=3.0, max_weight=0.0, edge_weight=0.0, width=2.0), 8).startswith("untouched")


def test_the_kernel_plot_draws_each_components_weights_over_layers():
    fig = edit_figure(WrittenEdit(TRIAL_44, 24, 44, SWEEP))
    try:
        ax = fig.axes[0]
        lines = {line.get_label(): line for line in ax.get_lines()}
        attn, mlp = lines["attention writers"], lines["MLP writers (untouched)"]
        assert list(attn.get_xdata()) == list(range(24))
        assert list(attn.get_ydata()) == pytest.approx(TRIAL_44.attn.weights(24))
        assert max(attn.get_ydata()) == pytest.approx(1.1 - 0.8 * 0.4 / 5) and attn.get_ydata()[13] == 0
        assert list(mlp.get_ydata()) == [0.0] * 24
        (bar,) = ax.patches
        assert bar.get_height() == pytest.approx(0.7) and bar.get_x() + bar.get_width() / 2 == pytest.approx(-1)
        assert "direction" not in " ".join(lines), "each layer's own direction: no single point to mark"
    finally:
        pyplot().close(fig)
    fig = edit_figure(WrittenEdit(EditSpec.full(15), 24, None, SWEEP))
    try:
        marks = [line for line in fig.axes[0].get_lines() if line.get_label().startswith("direction")]
        assert [list(m.get_xdata()) for m in marks] == [[15.0, 15.0]]
    finally:
        pyplot().close(fig)


def _trial(number: int, refusal: float, kl: float, **extra) -> TrialRecord:
    spec = EditSpec.full(1).to_dict()
    return TrialRecord(number, spec, refusal, kl, on_front=True, **extra)


def _result(trials: list[TrialRecord], chosen: int) -> SearchResult:
    pick = next(t for t in trials if t.number == chosen)
    front = [t.number for t in trials if t.on_front]
    return SearchResult(trials, front, pick, "note", {"refusal": 3.0, "kl": 0.0}, 0.5, 1.0, None)


def _xticks(result: SearchResult) -> tuple[tuple[float, float], list[float], list[str]]:
    fig = front_figure(result)
    try:
        fig.canvas.draw()
        ax = fig.axes[0]
        low, high = ax.get_xlim()
        ticks = [float(t) for t in ax.get_xticks() if low <= t <= high]
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text() and low <= t.get_position()[0] <= high]
        return (low, high), ticks, labels
    finally:
        pyplot().close(fig)


@pytest.mark.parametrize("kls", [[0.0, 0.002, 0.04, 0.3, 1.2], [0.0, 0.0, 0.0], [-1e-9, 5e-4, 0.01]])
def test_the_front_plots_kl_axis_has_no_negative_tick(kls):
    """KL is never negative: the axis starts at 0 and no tick label is negative (symlog drew a -10⁻³)."""
    result = _result([_trial(i, 3.0 - i, kl) for i, kl in enumerate(kls)], chosen=len(kls) - 1)
    (low, _), ticks, labels = _xticks(result)
    assert low == 0.0 and ticks and min(ticks) >= 0.0
    assert labels and not [t for t in labels if re.match(r"^\$?(\\mathdefault\{)?[-−]", t)], labels


def test_the_checked_table_shows_what_the_check_measured():
    trials = [
        _trial(3, 1.0, 0.041, refused=2, judged=16),
        _trial(7, 0.5, 0.09, refused=1, judged=16),
        _trial(9, 0.7, 0.2),  # not checked by generation
    ]
    d = _result(trials, chosen=3).to_dict()
    d["base_refused"] = 12
    t3, t7 = d["trials"][0], d["trials"][1]
    t3.update(answer_kl=0.0087, perplexity=9.214, degenerate=0, harmless_degenerate=3)  # fields of the trial
    t7["scores"] = {"answer_kl": 0.12, "perplexity": 14.5, "degenerate": 4, "harmless_degenerate": 6}  # or scores
    page = checked_table(d)
    head = "<th>trial</th><th>judged refusals</th><th>first-token KL</th><th>answer KL</th><th>perplexity</th>"
    assert head + "<th>degenerate answers, harmful</th><th>degenerate answers, harmless</th></tr>" in page
    assert (
        '<tr class="pass"><td>3 (chosen)</td><td>2/16</td><td>0.0410</td><td>0.0087</td><td>9.21</td><td>0</td>'
        "<td>3</td></tr>" in page
    )
    assert "<tr><td>7</td><td>1/16</td><td>0.0900</td><td>0.1200</td><td>14.50</td><td>4</td><td>6</td></tr>" in page
    assert "<td>9</td>" not in page and "Trials checked by generation (2)" in page
    assert "12 judged refusals" in html.unescape(page)


def test_the_checked_table_leaves_out_what_was_not_measured():
    d = _result([_trial(1, 1.0, 0.05, refused=0, judged=8), _trial(2, 2.0, 0.01)], chosen=1).to_dict()
    page = checked_table(d)
    assert "<td>1 (chosen)</td><td>0/8</td><td>0.0500</td></tr>" in page
    for column in ("answer KL", "perplexity", "degenerate"):
        assert column not in page
    d["trials"][0]["perplexity"] = 11.0  # one measured column appears alone
    assert "<th>perplexity</th></tr>" in checked_table(d) and "answer KL" not in checked_table(d)
    assert checked_table(_result([_trial(1, 1.0, 0.05)], chosen=1).to_dict()) == ""
