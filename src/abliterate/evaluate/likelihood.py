"""A degenerate-answer check by likelihood: the answer's perplexity under the unedited model.

Surface rules (:class:`~abliterate.evaluate.judge.DegenerateDetector`) see loops, foreign glyphs and mixed scripts;
they cannot tell fluent-looking word salad ("bridge seven purple whisper ocean tax lunar hinge") from a list of
nouns. The unedited model can: :class:`LikelihoodDetector` teacher-forces each answer after its prompt (the chat
template's generation prompt, as in generation) through the *unedited* model and computes the answer's perplexity,
``exp(mean negative log-likelihood per answer token)``. Real answers, the base model's own and an abliterated
model's compliant ones alike, score well below :data:`THRESHOLD`; token soup from a broken model scores in the
thousands and word salad in the hundreds (``bench/damaged.py`` and BENCHMARKS.md show both on the demo model).

Wiring: build it once on the unedited model (before any edit, or with hooks removed) and pass it with the surface
detector, ``judge_responses(judge, prompts, responses, detector=Detectors(DegenerateDetector(),
LikelihoodDetector(base_lm)))``; an answer it flags is "degenerate" with the reason ``unlikely (perplexity N)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from abliterate.lm.model import LoadedModel

THRESHOLD = 200.0  # perplexity per answer token above which an answer is no answer (see the module docstring)


@dataclass
class LikelihoodDetector:
    """Flags answers whose perplexity under ``lm`` (the unedited model) is above ``threshold``.

    Only an answer's first ``max_tokens`` tokens are scored, and only answers of at least ``min_tokens`` tokens
    are judged (a two-token answer has too few tokens for a perplexity to mean anything; the surface detector
    judges empty answers). ``system`` is the system prompt the answers were generated under."""

    lm: LoadedModel
    threshold: float = THRESHOLD
    min_tokens: int = 4
    max_tokens: int = 128
    batch_size: int = 8
    system: str | None = None

    def __post_init__(self) -> None:
        if not self.threshold > 1:
            raise ValueError(f"threshold must be above 1 (a perplexity), got {self.threshold}")

    @torch.inference_mode()
    def perplexities(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        """Perplexity of each answer given its prompt; ``nan`` for an answer under ``min_tokens`` tokens."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        tok = self.lm.tokenizer
        heads = [tok(t, add_special_tokens=False)["input_ids"] for t in self.lm.format(prompts, system=self.system)]
        tails = [tok(a, add_special_tokens=False)["input_ids"][: self.max_tokens] for a in answers]
        out = [math.nan] * len(answers)
        todo = [i for i, t in enumerate(tails) if len(t) >= self.min_tokens]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        for start in range(0, len(todo), self.batch_size):
            rows = todo[start : start + self.batch_size]
            seqs = [heads[i] + tails[i] for i in rows]
            width = max(len(s) for s in seqs)
            ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=self.lm.device)
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.lm.device)
            logits = self.lm.forward({"input_ids": ids, "attention_mask": mask}, all_logits=True).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            target = logp.gather(-1, ids[:, 1:, None])[..., 0]  # log p(token t+1 | up to t)
            for j, i in enumerate(rows):
                m = len(tails[i])
                out[i] = math.exp(-float(target[j, -m:].mean()))
        return out

    def reasons(self, prompts: Sequence[str], answers: Sequence[str]) -> list[str]:
        """``unlikely (perplexity N)`` for each answer above the threshold, else ""."""
        return [
            f"unlikely (perplexity {p:.0f})" if p > self.threshold else "" for p in self.perplexities(prompts, answers)
        ]
