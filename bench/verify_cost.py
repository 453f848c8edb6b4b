"""What the self-verified anatomy costs when a model is loaded: the probe (three forward passes over 8 tokens) next
to finding the writers by name alone, and next to loading the weights, on the demo model.

    python bench/verify_cost.py [--model DIR] [--repeats 5] [--threads N]

Loads the model once with transformers (timed), then alternates ``find_anatomy`` (patterns only) and
``checked_anatomy`` (patterns + probe) ``--repeats`` times each, side by side, and prints the medians as a markdown
table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _common import add_model_option, model_path, set_threads
from transformers import AutoModelForCausalLM

from abliterate.arch.anatomy import find_anatomy
from abliterate.arch.selfcheck import checked_anatomy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_option(p)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    set_threads(args.threads)
    args.model = model_path(args.model)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    load = time.perf_counter() - start
    patterns: list[float] = []
    checked: list[float] = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        find_anatomy(model)
        patterns.append(time.perf_counter() - start)
        start = time.perf_counter()
        anatomy = checked_anatomy(model)
        checked.append(time.perf_counter() - start)
    assert anatomy.verified
    row = {
        "model": args.model,
        "threads": torch.get_num_threads(),
        "load_s": round(load, 3),
        "patterns_s": round(statistics.median(patterns), 4),
        "checked_s": round(statistics.median(checked), 4),
    }
    row["probe_over_load"] = round((row["checked_s"] - row["patterns_s"]) / load, 3)
    print("| load (transformers) | patterns only | patterns + probe | probe / load |")
    print("|---:|---:|---:|---:|")
    print(f"| {load:.2f} s | {row['patterns_s']:.3f} s | {row['checked_s']:.3f} s | {row['probe_over_load']:.2f} |")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
