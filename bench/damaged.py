"""Damaged copies of the demo model: are their answers reported degenerate (never compliance)?

    python bench/damaged.py [--n 16] [--max-new-tokens 64] [--answers FILE.json] [--batch-size 16]

The demo model (Qwen2.5-Coder-0.5B-Instruct, float32, CPU) is damaged in memory, one way at a time, and restored in
between:

* ``writers x3``: every layer's residual writers (``o_proj``, ``down_proj``) scaled by 3;
* ``writers x0``: every layer's writers zeroed (each layer adds nothing: the model is its embedding and head);
* ``noise``: Gaussian noise of 0.5 x each matrix's own standard deviation added to every layer weight matrix
  (seed 0);
* ``layers 6-17 removed``: the writers of layers 6 to 17 (12 of 24) zeroed, so that those layers pass the
  residual stream through unchanged, as if removed.

Each copy, and the unedited model for reference, answers the first ``--n`` bundled harmful and harmless TEST
prompts greedily (``--max-new-tokens`` tokens, no system prompt). Every answer is judged by
``judge_responses(MarkerJudge(), ...)`` with the default ``DegenerateDetector`` and, separately, by
``LikelihoodDetector`` (answer perplexity under the unedited model, teacher-forced). The answers are written to
``--answers`` (and read from it when it exists, so judging can be rerun without generating).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from abliterate import load_model
from abliterate.behaviours.prompts import bundled
from abliterate.evaluate.judge import MarkerJudge, judge_responses
from abliterate.evaluate.likelihood import LikelihoodDetector
from abliterate.lm.demo import demo_model_path
from abliterate.lm.model import LoadedModel


def _matrices(lm: LoadedModel, names: tuple[str, ...], layers: range | None = None) -> list[torch.nn.Parameter]:
    out = []
    for name, p in lm.model.named_parameters():
        parts = name.split(".")
        if "layers" not in parts or p.dim() != 2:
            continue
        index = int(parts[parts.index("layers") + 1])
        if (layers is None or index in layers) and (not names or any(n in name for n in names)):
            out.append(p)
    return out


def _scale(factor: float, layers: range | None = None) -> Callable[[LoadedModel], None]:
    def damage(lm: LoadedModel) -> None:
        for p in _matrices(lm, ("o_proj", "down_proj"), layers):
            p.mul_(factor)

    return damage


def _noise(scale: float) -> Callable[[LoadedModel], None]:
    def damage(lm: LoadedModel) -> None:
        gen = torch.Generator().manual_seed(0)
        for p in _matrices(lm, ()):
            p.add_(torch.randn(p.shape, generator=gen) * (scale * float(p.std())))

    return damage


DAMAGES: dict[str, Callable[[LoadedModel], None]] = {
    "writers x3": _scale(3.0),
    "writers x0": _scale(0.0),
    "noise 0.5 sd": _noise(0.5),
    "layers 6-17 removed": _scale(0.0, range(6, 18)),
}


SAMPLES = {
    "a real answer": "To bake bread, mix flour, water, salt and yeast, knead the dough for ten minutes and let it rise "
    "for an hour. Then shape the loaf and bake it at 220 degrees for about thirty minutes.",
    "word salad": "bridge seven purple whisper ocean tax lunar hinge velvet crater jump silent marble orbit fence "
    "candle harbor",
    "token soup": " If notREAM] Freeiesراء?\n\nThis@. ieurs empiricald ). 2werk and///1}2Thirty()i) 观影 Ere proced "
    "べき versch ALSE шенuper局",
    "glyph soup": "ṭỳðŀ ẞŧ ĦŋÆ ǂ ȼ ɏ ʤ ḁ ḃ ƀ ɓ ƈ ɗ ƒ ɠ ħ",
}


@torch.inference_mode()
def generate_all(lm: LoadedModel, prompts: dict[str, list[str]], tokens: int, batch_size: int) -> dict:
    saved = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    out: dict[str, dict[str, list[str]]] = {}
    for name, damage in {"unedited": None, **DAMAGES}.items():
        start = time.time()
        if damage:
            damage(lm)
        out[name] = {
            side: lm.generate(ps, max_new_tokens=tokens, batch_size=batch_size) for side, ps in prompts.items()
        }
        for n, p in lm.model.named_parameters():
            p.copy_(saved[n])
        print(f"{name}: generated in {time.time() - start:.0f} s", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--answers", type=Path, default=Path("damaged-answers.json"))
    ap.add_argument("--no-likelihood", action="store_true", help="judge stored answers by the surface rules only")
    args = ap.parse_args()
    start = time.time()
    prompts = {side: bundled(side, "test", limit=args.n) for side in ("harmful", "harmless")}
    lm = None if args.no_likelihood and args.answers.is_file() else load_model(demo_model_path(), dtype="float32")
    if args.answers.is_file():
        answers = json.loads(args.answers.read_text())
    else:
        answers = generate_all(lm, prompts, args.max_new_tokens, args.batch_size)
        args.answers.write_text(json.dumps(answers, ensure_ascii=False, indent=1))
    likelihood = LikelihoodDetector(lm) if lm is not None else None
    print("| model | side | refusal | compliance | degenerate | reasons | perplexity > threshold | median perplexity |")
    print("|---|---|---|---|---|---|---|---|")
    for name, sides in answers.items():
        for side, texts in sides.items():
            verdicts = judge_responses(MarkerJudge(), prompts[side], texts)
            counts = Counter(v.verdict for v in verdicts)
            reasons = Counter(v.reason for v in verdicts if v.verdict == "degenerate")
            why = ", ".join(f"{r} {c}" for r, c in reasons.most_common())
            flagged, median = "–", "–"
            if likelihood is not None:
                ppl = likelihood.perplexities(prompts[side], texts)
                flagged = f"{sum(p > likelihood.threshold for p in ppl)}/{len(ppl)}"
                median = f"{sorted(ppl)[len(ppl) // 2]:.3g}"
            print(
                f"| {name} | {side} | {counts['refusal']} | {counts['compliance']} | {counts['degenerate']} | {why} "
                f"| {flagged} | {median} |"
            )
            for text, verdict in zip(texts, verdicts, strict=True):
                if name != "unedited" and verdict.verdict != "degenerate":
                    print(f"  not degenerate ({verdict.verdict}): {text[:200]!r}")
    if likelihood is None:
        return
    prompt = "How do I bake a simple loaf of bread?"
    ppl = likelihood.perplexities([prompt] * len(SAMPLES), list(SAMPLES.values()))
    print(f"\nPerplexity under the unedited model after the prompt {prompt!r} (threshold {likelihood.threshold:g}):")
    for name, value in zip(SAMPLES, ppl, strict=True):
        print(f"- {name}: {value:.3g}")
    print(f"\n{time.time() - start:.0f} s in all", file=sys.stderr)


if __name__ == "__main__":
    main()
