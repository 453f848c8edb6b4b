"""Cost of one search trial on the demo model: apply the edit in place, score, revert (and the generation check).

    python bench/search_trial.py [--model DIR] [--n-val 16] [--trials 8] [--threads N]

Loads the model once, captures the bundled train prompts (64 + 64), builds one ``Scorer`` on ``--n-val``
harmful + harmless validation prompts, then times ``--trials`` random edits of the search space (the same
sampler the search uses, fixed seed): build the plan, apply it to the weights, ``Scorer.score()``, revert.
Also times the multi-fidelity check (greedy 24-token answers to the harmful validation prompts, judged) and a
plain unedited ``score()`` for reference. Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import optuna
import torch
from _common import add_model_option, model_path, set_threads

from abliterate import capture, load_model
from abliterate.behaviours.prompts import bundled
from abliterate.edit.plan import Directions, applied, build_plan
from abliterate.evaluate.judge import MarkerJudge
from abliterate.select.scorer import Scorer
from abliterate.select.search import SearchSpace, suggest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_option(p)
    p.add_argument("--n-val", type=int, default=16)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    set_threads(args.threads)
    args.model = model_path(args.model)
    lm = load_model(args.model)
    acts = capture(lm, bundled("harmful", "train")[:64], bundled("harmless", "train")[:64], positions=[-1])
    source = Directions(acts)
    harmful, harmless = bundled("harmful", "val")[: args.n_val], bundled("harmless", "val")[: args.n_val]
    t = time.perf_counter()
    scorer = Scorer(lm, harmful, harmless)
    setup = time.perf_counter() - t
    plain = []
    for _ in range(3):
        t = time.perf_counter()
        scorer.score()
        plain.append(time.perf_counter() - t)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    rows = []
    for _ in range(args.trials):
        spec = suggest(study.ask(), SearchSpace(), lm.num_layers)
        t0 = time.perf_counter()
        plan = build_plan(lm, spec, source)
        t1 = time.perf_counter()
        with applied(lm, plan, mode="weights"):
            t2 = time.perf_counter()
            score = scorer.score()
            t3 = time.perf_counter()
        t4 = time.perf_counter()
        rows.append(
            {
                "build": t1 - t0,
                "apply": t2 - t1,
                "score": t3 - t2,
                "revert": t4 - t3,
                "total": t4 - t0,
                "norm_preserving": spec.norm_preserving,
                "kl": score.kl,
            }
        )
    t = time.perf_counter()
    with applied(lm, build_plan(lm, suggest(study.ask(), SearchSpace(), lm.num_layers), source), mode="weights"):
        n = len(scorer.judged(MarkerJudge(), max_new_tokens=24))
    check = time.perf_counter() - t
    med = {k: statistics.median(r[k] for r in rows) for k in ("build", "apply", "score", "revert", "total")}
    print(f"model {args.model}, {args.n_val}+{args.n_val} validation prompts, torch threads {torch.get_num_threads()}")
    print("| step | median s |\n|---|---:|")
    print(f"| scorer setup (tokenize, base log-probs) | {setup:.2f} |")
    print(f"| unedited score() | {statistics.median(plain):.2f} |")
    for k, v in med.items():
        print(f"| trial: {k} | {v:.2f} |")
    print(f"| generation check ({n} prompts x 24 tokens, judged) | {check:.2f} |")
    print(json.dumps({"setup": setup, "plain_score": plain, "trials": rows, "check": check, "n_val": args.n_val}))


if __name__ == "__main__":
    main()
