"""Runtime ablation of the residual stream itself (``residual_only=True``) next to the usual ablation of every writer,
on a real model: refusals among held-out harmful prompts (greedy, marker judge) and the first response token's
KL(base || ablated) on held-out harmless prompts, for the same direction.

    python bench/residual_stream.py DIRECTIONS [--model DIR] [--layer L] [--n 24] [--tokens 32]

``DIRECTIONS`` is a ``directions.safetensors`` written by ``measure`` or ``run`` for the model (default model: the
demo model); ``--layer`` defaults to the chosen one recorded with it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import add_model_option, model_path

from abliterate import DirectionSet, ablate, load_model
from abliterate.behaviours.prompts import bundled
from abliterate.evaluate.judge import MarkerJudge


def first_token_logprobs(lm, prompts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        logits = lm.forward(lm.encode(lm.format(prompts))).logits[:, -1, :].float()
    return torch.log_softmax(logits, dim=-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directions")
    add_model_option(p)
    p.add_argument("--layer", type=int)
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()
    args.model = model_path(args.model)
    ds = DirectionSet.load(args.directions)
    layer = args.layer if args.layer is not None else ds.meta["chosen"]["layer"]
    direction = ds[layer]
    harmful, harmless = bundled("harmful", "test")[: args.n], bundled("harmless", "test")[: args.n]
    judge = MarkerJudge()
    rows: dict[str, dict[str, float]] = {}
    base_lp = None
    for mode in ("writers", "residual stream"):
        lm = load_model(args.model, residual_only=mode == "residual stream")
        if base_lp is None:
            base_lp = first_token_logprobs(lm, harmless)
            unedited = lm.generate(harmful, max_new_tokens=args.tokens)
            rows["unedited"] = {"refusals": sum(judge.judge(unedited)), "kl": 0.0}
        start = time.perf_counter()
        with ablate(lm, direction):
            answers = lm.generate(harmful, max_new_tokens=args.tokens)
            lp = first_token_logprobs(lm, harmless)
        kl = float((base_lp.exp() * (base_lp - lp)).sum(-1).mean())
        rows[mode] = {"refusals": sum(judge.judge(answers)), "kl": kl, "seconds": time.perf_counter() - start}
    print(f"direction: layer {layer}; {args.n} harmful and {args.n} harmless test prompts, greedy {args.tokens} tokens")
    print("| ablation | refusals | first-token KL |")
    print("|---|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['refusals']}/{args.n} | {row['kl']:.4f} |")
    print(json.dumps({"layer": layer, **rows}))


if __name__ == "__main__":
    main()
