"""The edit ``run`` wrote, described for people: its spec in words, the layers and writers it touches, and its
kernels drawn over the layers (``edit.png``). The report's header and the model card both read it, so that they
describe the written edit and never the sweep's candidate (which is only the search's starting point)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate.edit.spec import EditSpec, Kernel
from abliterate.outputs.plots import pyplot, save_figure
from abliterate.select.sweep import CandidateScore, Selection

if TYPE_CHECKING:
    from abliterate.run.result import RunResult


@dataclass(frozen=True)
class WrittenEdit:
    """The edit written (``spec``) for a model of ``num_layers`` layers; ``trial``: the search trial it came from
    (None: the sweep's pick made the edit, ``--no-search``); ``sweep``: the sweep's candidate."""

    spec: EditSpec
    num_layers: int
    trial: int | None
    sweep: CandidateScore | None

    @property
    def searched(self) -> bool:
        return self.trial is not None


def written_edit(result: RunResult, num_layers: int | None) -> WrittenEdit | None:
    """The edit ``run`` wrote (None for an induction, which bakes the sweep's direction instead, or when the layer
    count is unknown)."""
    choice = result.choice
    if choice is None or num_layers is None:
        return None
    search = choice.search
    trial = None if search is None or search.chosen is None else search.chosen.number
    return WrittenEdit(choice.spec, num_layers, trial, result.selection.chosen)


def layer_count(sel: Selection) -> int | None:
    """The model's layer count as the sweep's direction sets know it (one residual point more than layers)."""
    for ds in sel.direction_sets.values():
        return ds.num_points - 1
    return None


def spans(layers: list[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3–5, 9"``."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs) or "none"


def touched(kernel: Kernel | None, num_layers: int) -> list[int]:
    """The layers a component's kernel gives a non-zero weight."""
    return [] if kernel is None else [i for i, w in enumerate(kernel.weights(num_layers)) if w > 0]


def kernel_words(kernel: Kernel | None, num_layers: int) -> str:
    """Which layers a component's kernel touches and with what weight, in one phrase."""
    if kernel is None:
        return "untouched"
    layers = touched(kernel, num_layers)
    if not layers:
        return "untouched (weight 0 at every layer)"
    where = f"layers {spans(layers)} ({len(layers)} of {num_layers})"
    if kernel.max_weight == kernel.edge_weight and (math.isinf(kernel.width) or len(layers) == num_layers):
        return f"{where}, weight {kernel.max_weight:g} at each"
    weights = [kernel.weights(num_layers)[i] for i in layers]
    return (
        f"{where}; kernel peaking at layer {kernel.peak:.1f} with weight {kernel.max_weight:.2f}, falling to "
        f"{kernel.edge_weight:.2f} at {kernel.width:.1f} layers from the peak (weights {min(weights):.2f}"
        f"–{max(weights):.2f})"
    )


def direction_words(spec: EditSpec) -> str:
    if spec.direction_index is None:
        return "each layer's own: every writer removes the direction of the residual point it writes into"
    x = spec.direction_index
    if x == int(x):
        return f"one direction everywhere: residual point {int(x)} (the input of layer {int(x)})"
    low = math.floor(x)
    return f"one direction everywhere: residual point {x:.2f}, interpolated between points {low} and {low + 1}"


def method_words(spec: EditSpec) -> str:
    return f"slerp (t = {spec.slerp_t:g})" if spec.method == "slerp" else spec.method


def sweep_words(c: CandidateScore | None) -> str:
    return "none" if c is None else f"{c.method} at layer {c.layer}, position {c.position}"


def edit_rows(edit: WrittenEdit) -> list[tuple[str, str]]:
    """(what, value) rows: the written edit's spec, then where it came from."""
    s, n = edit.spec, edit.num_layers
    k = "1 (one direction)" if s.k == 1 else f"{s.k} (the direction plus the nearest residual points' directions)"
    rows = [
        ("method", method_words(s)),
        ("token position", str(s.position)),
        ("direction", direction_words(s)),
        ("subspace rank k", k),
        ("attention writers (output projections)", kernel_words(s.attn, n)),
        ("MLP writers (down projections)", kernel_words(s.mlp, n)),
        ("embeddings", f"scale {s.embedding:g}" if s.embedding > 0 else "untouched"),
        ("norm-preserving", "yes" if s.norm_preserving else "no"),
    ]
    if edit.searched:
        rows.append(("chosen by", f"the search, trial {edit.trial}"))
        rows.append(("search's warm start (the sweep's candidate, not the edit)", sweep_words(edit.sweep)))
    else:
        rows.append(("chosen by", f"the sweep (no search): its candidate {sweep_words(edit.sweep)}"))
    return rows


def headline(edit: WrittenEdit) -> str:
    """One line: what was written and where it came from."""
    origin = f"search trial {edit.trial}" if edit.searched else "the sweep's pick, no search"
    return f"{edit.spec.label()} ({origin})"


def edit_plot(folder: Path, edit: WrittenEdit) -> Path:
    """edit.png: the written edit's scale at each layer for the attention and MLP writers (the kernels), the
    embeddings at layer -1, and the residual point its direction comes from."""
    return save_figure(edit_figure(edit), folder / "edit.png")


def edit_figure(edit: WrittenEdit) -> Any:
    """The figure of :func:`edit_plot` (open: the caller saves or closes it)."""
    s, n = edit.spec, edit.num_layers
    fig, ax = pyplot().subplots(figsize=(7.5, 3.2))
    layers = list(range(n))
    # attention solid and wide, MLP dashed on top: where the two kernels are equal both stay visible
    styles = ({"ls": "-", "lw": 4, "alpha": 0.6}, {"ls": "--"})
    for name, kernel, style in zip(("attention", "MLP"), (s.attn, s.mlp), styles, strict=True):
        weights = kernel.weights(n) if kernel is not None else [0.0] * n
        off = "" if kernel is not None else " (untouched)"
        ax.plot(layers, weights, marker="o", ms=3, label=f"{name} writers{off}", **style)
    ax.bar([-1], [s.embedding], width=0.5, color="#2ca02c", label=f"embeddings ({s.embedding:g})")
    if s.direction_index is not None:
        label = f"direction: residual point {s.direction_index:.2f}"
        ax.axvline(s.direction_index, color="#d62728", ls=":", lw=1.2, label=label)
    where = "each layer's own direction" if s.direction_index is None else "one direction"
    ax.set_title(f"written edit: scale of the removal per layer ({where}, k={s.k})", fontsize=9)
    ax.set_xlabel("layer (emb: the embeddings)")
    ax.set_ylabel("kernel weight")
    ax.set_xlim(-1.5, n - 0.5)
    step = max(1, math.ceil(n / 16))
    ticks = [-1, *range(0, n, step)]
    ax.set_xticks(ticks, ["emb", *map(str, ticks[1:])])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig
