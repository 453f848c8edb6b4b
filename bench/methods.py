"""Method comparison on the demo model: mean-diff vs SLERP (t=1, fractional t) vs projected vs a
multi-direction subspace, each with its automatically selected candidate.

Same train / validation / test prompts for every method (the bundled fixed splits). Selection uses
validation prompts only; every reported number comes from held-out test prompts.

    python bench/methods.py [--model DIR] [--n-train 64] [--n-val 16] [--n-test 24] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from abliterate import ablate, capture, load_model
from abliterate.behaviours.prompts import bundled
from abliterate.evaluate.evaluation import Evaluator
from abliterate.select.subspace import choose_k
from abliterate.select.sweep import Method, select

METHODS = [Method("mean_diff"), Method("slerp", {"t": 1.0}), Method("slerp", {"t": 0.5}), Method("projected")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the cached demo model)")
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--n-val", type=int, default=16)
    ap.add_argument("--n-test", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.model is None:
        from abliterate.lm.demo import demo_model_path

        args.model = str(demo_model_path())
    torch.manual_seed(0)
    lm = load_model(args.model)
    skip = ("benign_lookalike",)
    train_h, train_l = (
        bundled("harmful", "train", limit=args.n_train),
        bundled("harmless", "train", limit=args.n_train, exclude_categories=skip),
    )
    val_h, val_l = bundled("harmful", "val", limit=args.n_val), bundled("harmless", "val", limit=args.n_val)
    test_h, test_l = bundled("harmful", "test", limit=args.n_test), bundled("harmless", "test", limit=args.n_test)

    t = time.perf_counter()
    acts = capture(lm, train_h, train_l, positions=[-1], keep_per_prompt=True)
    capture_s = time.perf_counter() - t
    print(f"capture: {capture_s:.1f} s", flush=True)

    ev = Evaluator(lm, test_h, test_l, max_new_tokens=args.max_new_tokens, batch_size=12)
    base = ev.measure("unedited")
    print(f"unedited: refusals {base.refusal_rate:.0%}, over-refusal {base.over_refusal:.0%}", flush=True)
    rows = [
        {
            "method": "unedited",
            "layer": None,
            "k": None,
            "refusal": base.refusal_rate,
            "over_refusal": base.over_refusal,
            "kl": 0.0,
            "select_s": 0.0,
        }
    ]
    chosen_layer, kl_limit = None, 0.1
    for method in METHODS:
        t = time.perf_counter()
        sel = select(lm, acts, val_h, val_l, methods=[method])
        select_s = time.perf_counter() - t
        if sel.chosen is None:
            print(f"{method.label}: nothing selected ({sel.note})", flush=True)
            rows.append({"method": method.label, "layer": None, "k": 1, "note": sel.note, "select_s": select_s})
            continue
        d = sel.direction()
        m = ev.measure(method.label, lambda d=d: ablate(lm, d))
        if method.name == "mean_diff":
            chosen_layer, kl_limit = sel.chosen.layer, sel.settings["kl_limit_used"]
        rows.append(
            {
                "method": method.label,
                "layer": sel.chosen.layer,
                "k": 1,
                "refusal": m.refusal_rate,
                "over_refusal": m.over_refusal,
                "kl": m.kl,
                "select_s": select_s,
                "val_bypass": sel.chosen.bypass,
                "val_kl": sel.chosen.kl,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if chosen_layer is not None:
        t = time.perf_counter()
        choice = choose_k(
            lm, acts, val_h, val_l, layer=chosen_layer, kind="pca", ks=(1, 2, 3, 4), kl_threshold=kl_limit
        )
        select_s = time.perf_counter() - t
        if choice.direction is None:
            print(f"pca subspace: no k passed (KL limit {kl_limit}): {choice.to_dict()['scores']}", flush=True)
            rows.append(
                {
                    "method": "pca subspace",
                    "layer": chosen_layer,
                    "k": None,
                    "select_s": select_s,
                    "note": f"no k with validation KL <= {kl_limit}",
                }
            )
        else:
            m = ev.measure("pca-subspace", lambda: ablate(lm, choice.direction))
            rows.append(
                {
                    "method": f"pca subspace (k={choice.chosen_k})",
                    "layer": chosen_layer,
                    "k": choice.chosen_k,
                    "refusal": m.refusal_rate,
                    "over_refusal": m.over_refusal,
                    "kl": m.kl,
                    "select_s": select_s,
                    "k_scores": [vars(s) for s in choice.scores],
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    print("\n| method | layer | k | refusals (test) | over-refusal (test) | KL (test) | selection s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "refusal" not in r:
            print(f"| {r['method']} | - | - | {r.get('note', '')} | | | {r['select_s']:.0f} |")
            continue
        print(
            f"| {r['method']} | {r['layer']} | {r['k']} | {r['refusal']:.0%} ({round(r['refusal'] * args.n_test)}/"
            f"{args.n_test}) | {r['over_refusal']:.0%} | {r['kl']:.4f} | {r['select_s']:.0f} |"
        )
    meta = {
        "model": args.model,
        "n_train": args.n_train,
        "n_val": args.n_val,
        "n_test": args.n_test,
        "capture_s": capture_s,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
