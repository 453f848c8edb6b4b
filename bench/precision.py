"""Precision of the weight edit on the demo model: a bf16 / fp16 edit against the fp32 edit of the same model.

The claim (tests/test_precision.py): edits run in float32 and are cast back once, so a bf16 edit is within one
rounding of the exact edit of the bf16 weights and adds at most about one bf16 rounding to what loading in bf16
already costs. One fp32 direction (mean_diff, layer 15, position -1, train prompts) is removed from the fp32, bf16
and fp16 copies of the model (all layers and the embeddings), and per writer tensor, end to end (first-token KL on
held-out harmless prompts, residual component along r at every layer input) and in wall time they are compared.

    python bench/precision.py [--model DIR] [--n-train 32] [--n-test 32] [--layer 15] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import add_model_option, model_path

from abliterate import capture, directions, load_model, orthogonalize
from abliterate.arch.anatomy import Writer
from abliterate.behaviours.prompts import bundled
from abliterate.lm.loading import from_pretrained_objects
from abliterate.lm.model import LoadedModel
from abliterate.measure.first_token import kl_divergence

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11}
CHUNK = 1 << 16  # output vectors per float64 block


def writers(lm: LoadedModel) -> list[Writer]:
    return [*lm.anatomy.embeddings, *lm.anatomy.all_writers()]


def vectors(w: Writer, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The writer's output vectors as rows, ``[n, hidden]`` (a view)."""
    t = (w.weight if weight is None else weight).detach()
    return t.movedim(w.out_axis, -1).reshape(-1, t.shape[w.out_axis])


def leak(x: torch.Tensor, u: torch.Tensor) -> float:
    """max over rows of |x.u| / |x| (zero rows ignored)."""
    norm = x.norm(dim=-1)
    return float(((x @ u).abs()[norm > 0] / norm[norm > 0]).max())


@torch.no_grad()
def compare(ref: torch.Tensor, other: torch.Tensor, loaded: torch.Tensor | None, u: torch.Tensor) -> dict[str, float]:
    """|other - ref| / |ref| (Frobenius) and both leaks over rows; with ``loaded`` (the low-precision weights
    before the edit) also |other - P loaded| / |P loaded|, the distance to the exact edit of what was loaded."""
    sq = dict.fromkeys(("diff", "ref", "round", "exact"), 0.0)
    leaks, worst = {"ref": 0.0, "other": 0.0}, 0.0
    for i in range(0, ref.shape[0], CHUNK):
        a, b = ref[i : i + CHUNK].double(), other[i : i + CHUNK].double()
        sq["diff"] += float((b - a).square().sum())
        sq["ref"] += float(a.square().sum())
        leaks = {"ref": max(leaks["ref"], leak(a, u)), "other": max(leaks["other"], leak(b, u))}
        if loaded is not None:  # the exact edit of the low-precision weights: P w_low in float64
            c = loaded[i : i + CHUNK].double()
            exact = c - (c @ u)[:, None] * u
            sq["round"] += float((b - exact).square().sum())
            sq["exact"] += float(exact.square().sum())
            norm = exact.norm(dim=-1)
            worst = max(worst, float(((b - exact).norm(dim=-1)[norm > 0] / norm[norm > 0]).max()))
    out = {"rel": (sq["diff"] / sq["ref"]) ** 0.5, "leak_ref": leaks["ref"], "leak_other": leaks["other"]}
    if loaded is not None:
        out |= {"round": (sq["round"] / sq["exact"]) ** 0.5, "round_vector_max": worst}
    return out


@torch.inference_mode()
def forward_stats(lm: LoadedModel, prompts: list[str], u: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, float]:
    """First-token log-probs ``[n, vocab]`` and max over prompts, real tokens and layer inputs of |h.r| / |h|
    (``hidden_states[:num_layers]``: the embeddings' output and every layer's input, not the final normed state)."""
    texts, logps, worst = lm.format(prompts), [], 0.0
    for i in range(0, len(texts), batch_size):
        batch = lm.encode(texts[i : i + batch_size])
        out = lm.forward(batch, output_hidden_states=True)
        logps.append(torch.log_softmax(out.logits[:, -1].float(), dim=-1))
        mask = batch["attention_mask"].bool()
        for h in out.hidden_states[: lm.num_layers]:
            worst = max(worst, leak(h[mask].double(), u))
    return torch.cat(logps), worst


def time_edit(lm: LoadedModel, r: directions.Direction) -> float:
    """Seconds for orthogonalize on a fresh copy of ``lm`` (the copy is made outside the timer)."""
    twin = from_pretrained_objects(copy.deepcopy(lm.model), lm.tokenizer, source=lm.source)
    t = time.perf_counter()
    orthogonalize(twin, r)
    return time.perf_counter() - t


def stats(values: list[float]) -> dict[str, float]:
    return {"max": max(values), "median": statistics.median(values), "mean": statistics.fmean(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_option(ap)
    ap.add_argument("--n-train", type=int, default=32, help="harmful and harmless train prompts each")
    ap.add_argument("--n-test", type=int, default=32, help="held-out harmless test prompts for KL / residual")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="timed orthogonalize runs per dtype, on fresh copies")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.model = model_path(args.model)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    train_h = bundled("harmful", "train", limit=args.n_train)
    train_l = bundled("harmless", "train", limit=args.n_train, exclude_categories=("benign_lookalike",))
    test = bundled("harmless", "test", limit=args.n_test)

    models = {"fp32": load_model(args.model, dtype="float32")}
    models |= {name: load_model(args.model, dtype=dt) for name, dt in LOW.items()}
    found = {}
    for name, lm in models.items():
        t = time.perf_counter()
        acts = capture(lm, train_h, train_l, positions=[-1], batch_size=args.batch_size)
        found[name] = directions.mean_diff(acts)[args.layer, -1]
        print(f"capture {name}: {time.perf_counter() - t:.1f} s", flush=True)
    r = found["fp32"]
    u = r.vector.double() / r.vector.double().norm()
    cosine = {name: float(d.vector.double() @ u / d.vector.double().norm()) for name, d in found.items()}

    fwd = {name: forward_stats(lm, test, u, args.batch_size) for name, lm in models.items()}
    w32 = writers(models["fp32"])
    names = [w.name for w in w32]
    pairs = {n: list(zip(w32, writers(models[n]), strict=True)) for n in LOW}
    load = {n: [compare(vectors(a), vectors(b), None, u) for a, b in pairs[n]] for n in LOW}
    loaded = {n: [vectors(w).clone() for w in writers(models[n])] for n in LOW}
    print(f"unedited forward passes and load errors done at {time.perf_counter() - t_start:.0f} s", flush=True)

    timings: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):  # interleaved, so a busy machine slows every dtype alike
        for name, lm in models.items():
            timings[name].append(time_edit(lm, r))
    edit_s = {}
    for name, lm in models.items():
        t = time.perf_counter()
        orthogonalize(lm, r)
        edit_s[name] = time.perf_counter() - t
    print(f"timing and edits done at {time.perf_counter() - t_start:.0f} s", flush=True)

    fwd_edit = {name: forward_stats(lm, test, u, args.batch_size) for name, lm in models.items()}
    rows: dict[str, Any] = {}
    for n in LOW:
        edit = [compare(vectors(a), vectors(b), c, u) for (a, b), c in zip(pairs[n], loaded[n], strict=True)]
        eps, load_rel, edit_rel = UNIT_ROUNDOFF[n], [x["rel"] for x in load[n]], [x["rel"] for x in edit]
        rows[n] = {
            "unit_roundoff": eps,
            "direction_cosine": cosine[n],
            "load_rel": stats(load_rel),
            "edit_rel": stats(edit_rel),
            "edit_minus_load": stats([e - ld for e, ld in zip(edit_rel, load_rel, strict=True)]),
            "edit_vs_exact_edit_of_loaded": stats([x["round"] for x in edit]),
            "edit_vs_exact_edit_of_loaded_vector_max": max(x["round_vector_max"] for x in edit),
            "leak_unedited": max(x["leak_ref"] for x in load[n]),
            "leak_fp32_edit": max(x["leak_ref"] for x in edit),
            "leak_low_edit": max(x["leak_other"] for x in edit),
            "kl_unedited": stats(kl_divergence(fwd["fp32"][0], fwd[n][0]).tolist()),
            "kl_edited": stats(kl_divergence(fwd_edit["fp32"][0], fwd_edit[n][0]).tolist()),
            "per_writer": {
                nm: {"load_rel": a, "edit_rel": b} for nm, a, b in zip(names, load_rel, edit_rel, strict=True)
            },
        }
    residual: dict[str, dict[str, Any]] = {n: {"unedited": fwd[n][1], "edited": fwd_edit[n][1]} for n in models}
    times = {name: {"median": statistics.median(v), "best": min(v), "runs": v} for name, v in timings.items()}

    print(
        f"\ndirection: fp32 capture, mean_diff at layer {args.layer}, position -1, {args.n_train}+{args.n_train} "
        f"train prompts; cosine to it of the bf16 capture {cosine['bf16']:.6f}, fp16 {cosine['fp16']:.6f}"
    )
    print(
        f"\nper writer tensor ({len(names)}: embeddings, o_proj, down_proj), relative Frobenius error vs fp32 "
        "(max / median over writers):\n"
    )
    print(
        "| dtype | u | load: low(W) vs W | edit: low edit vs fp32 edit | edit - load | low edit vs exact edit "
        "of low(W) (worst vector) | max abs(r.w)/norm(w): unedited / fp32 edit / low edit |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, x in rows.items():
        pair = [f"{x[k]['max']:.3e} / {x[k]['median']:.3e}" for k in ("load_rel", "edit_rel", "edit_minus_load")]
        rnd = x["edit_vs_exact_edit_of_loaded"]
        print(
            f"| {n} | {x['unit_roundoff']:.3e} | {' | '.join(pair)} | {rnd['max']:.3e} / {rnd['median']:.3e} "
            f"({x['edit_vs_exact_edit_of_loaded_vector_max']:.3e}) "
            f"| {x['leak_unedited']:.3e} / {x['leak_fp32_edit']:.1e} / {x['leak_low_edit']:.3e} |"
        )
    print(
        f"\nend to end, {args.n_test} held-out harmless prompts (KL of the first token vs fp32, mean over prompts "
        "/ max):\n"
    )
    print(
        "| model | KL unedited vs fp32 unedited | KL edited vs fp32 edited | KL edited vs unedited (own dtype) "
        "| max abs(h.r)/norm(h) unedited | edited |"
    )
    print("|---|---|---|---|---|---|")
    for name, res in residual.items():
        kl = (
            ["-", "-"]
            if name == "fp32"
            else [f"{rows[name][k]['mean']:.2e} / {rows[name][k]['max']:.2e}" for k in ("kl_unedited", "kl_edited")]
        )
        own = kl_divergence(fwd[name][0], fwd_edit[name][0])
        res["kl_edit_effect"] = stats(own.tolist())
        own_s = f"{res['kl_edit_effect']['mean']:.3f} / {res['kl_edit_effect']['max']:.3f}"
        print(f"| {name} | {kl[0]} | {kl[1]} | {own_s} | {res['unedited']:.3e} | {res['edited']:.3e} |")
    print(f"\northogonalize wall time (s, {args.repeats} interleaved runs on fresh copies; then the measured edit):\n")
    print("| dtype | median | best | runs | measured edit |")
    print("|---|---|---|---|---|")
    for name, tm in times.items():
        runs = ", ".join(f"{v:.2f}" for v in tm["runs"])
        print(f"| {name} | {tm['median']:.2f} | {tm['best']:.2f} | {runs} | {edit_s[name]:.2f} |")
    meta = {
        "model": args.model,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "layer": args.layer,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "total_s": time.perf_counter() - t_start,
        "load_average_at_end": os.getloadavg(),
    }
    print(f"\ntotal {meta['total_s']:.0f} s, load average at the end {meta['load_average_at_end'][0]:.1f}")
    if args.json:
        out = {"meta": meta, "low": rows, "residual": residual, "orthogonalize_s": times, "measured_edit_s": edit_s}
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
