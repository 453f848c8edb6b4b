"""Damage beyond the first token: KL along the unedited model's own answers, and perplexity on plain text.

* :func:`answer_reference` records, once, the unedited model's greedy answer (its first ``k`` tokens) to
  each harmless prompt and its next-token distribution at every one of those positions;
* :func:`answer_kl` teacher-forces the same answers through an edited model (or the base model under
  hooks) and returns KL(base || edited) averaged over the answer positions of each prompt.

Storing ``n x k`` full distributions would take gigabytes for a 150k-token vocabulary, so each is kept
as its ``top`` most likely tokens plus one bucket for the remaining mass; the KL is computed between
the two distributions coarsened that way. That is a lower bound of the exact KL (coarsening never
increases it), equal to it when the base puts no mass outside its top tokens, and equal to the exact
first-token KL on a test model with a small vocabulary (see the tests).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources

import torch

from abliterate.lm.model import LoadedModel, Progress

TOP = 1024


@dataclass
class AnswerReference:
    """The base model's greedy answers and, per answer position, its top tokens and the rest's mass."""

    answers: list[list[int]]  # token ids, each at most k long (ending at the first end-of-sequence)
    top_ids: list[torch.Tensor]  # [m_i, top] long
    top_logp: list[torch.Tensor]  # [m_i, top] float32
    rest_logp: list[torch.Tensor]  # [m_i] float32: log of the mass outside the top tokens
    k: int


def _batches(
    lm: LoadedModel, prompts: Sequence[str], answers: Sequence[list[int]], system: str | None, batch_size: int
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(rows, log-probs ``[b, k+1, vocab]``) of the last ``k+1`` positions of prompt + answer, left-padded;
    row ``j``'s answer of length ``m`` is predicted by positions ``[-(m+1), -1)``."""
    heads = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in lm.format(prompts, system=system)]
    pad = lm.tokenizer.pad_token_id or 0
    keep = max(len(a) for a in answers) + 1
    kwargs = {"logits_to_keep": keep} if lm.caps.logits_to_keep else {}
    for start in range(0, len(prompts), batch_size):
        rows = list(range(start, min(start + batch_size, len(prompts))))
        seqs = [heads[i] + answers[i] for i in rows]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=lm.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=lm.device)
        out = lm.forward({"input_ids": ids, "attention_mask": mask}, all_logits=not kwargs, **kwargs)
        yield rows, torch.log_softmax(out.logits[:, -keep:].float(), dim=-1).cpu()


def _answer_positions(logp: torch.Tensor, m: int) -> torch.Tensor:
    """The ``[m, vocab]`` rows that predict an answer of ``m`` tokens (from a ``[k+1, vocab]`` slice)."""
    return logp[logp.shape[0] - 1 - m : logp.shape[0] - 1]


@torch.inference_mode()
def answer_reference(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    k: int,
    system: str | None = None,
    batch_size: int = 8,
    top: int = TOP,
    progress: Progress | None = None,
) -> AnswerReference:
    """Greedy answers of ``lm`` (first ``k`` tokens) and its coarsened distributions along them; ``progress(done,
    total)`` after each generation batch."""
    answers = lm.generate_ids(prompts, max_new_tokens=k, system=system, batch_size=batch_size, progress=progress)
    answers = [a if a else [lm.tokenizer.eos_token_id or 0] for a in answers]  # never an empty answer
    ref = AnswerReference(answers, [None] * len(prompts), [None] * len(prompts), [None] * len(prompts), k)  # type: ignore[list-item]
    for rows, logp in _batches(lm, prompts, answers, system, batch_size):
        for j, i in enumerate(rows):
            pos = _answer_positions(logp[j], len(answers[i]))
            values, ids = pos.topk(min(top, pos.shape[-1]), dim=-1)
            rest = torch.log1p(-values.exp().sum(-1).clamp(max=1 - 1e-7))
            ref.top_ids[i], ref.top_logp[i], ref.rest_logp[i] = ids, values, rest
    return ref


def coarse_kl(
    top_ids: torch.Tensor, top_logp: torch.Tensor, rest_logp: torch.Tensor, edited: torch.Tensor
) -> torch.Tensor:
    """KL(base || edited) per position between the two distributions coarsened to the base's top tokens plus
    one bucket for the rest: ``top_*`` ``[m, top]``, ``rest_logp`` ``[m]``, ``edited`` log-probs ``[m, vocab]``."""
    e_top = edited.gather(-1, top_ids)
    e_rest = torch.log1p(-e_top.exp().sum(-1).clamp(max=1 - 1e-7))
    kl = (top_logp.exp() * (top_logp - e_top)).sum(-1) + rest_logp.exp() * (rest_logp - e_rest)
    return kl.clamp_min(0.0)


@torch.inference_mode()
def answer_kl(
    lm: LoadedModel, prompts: Sequence[str], ref: AnswerReference, *, system: str | None = None, batch_size: int = 8
) -> torch.Tensor:
    """Per-prompt KL(base || ``lm``), averaged over the positions of the base's answer, teacher-forced."""
    out = torch.empty(len(prompts))
    for rows, logp in _batches(lm, prompts, ref.answers, system, batch_size):
        for j, i in enumerate(rows):
            pos = _answer_positions(logp[j], len(ref.answers[i]))
            out[i] = coarse_kl(ref.top_ids[i], ref.top_logp[i], ref.rest_logp[i], pos).mean()
    return out


def bundled_texts() -> list[str]:
    """The bundled harmless paragraphs for perplexity (written for this project, one per line)."""
    text = resources.files("abliterate").joinpath("data", "texts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


@torch.inference_mode()
def perplexity(lm: LoadedModel, texts: Sequence[str], *, batch_size: int = 4, max_tokens: int = 128) -> float:
    """Token-weighted perplexity ``exp(mean NLL)`` of ``lm`` on plain ``texts`` (no chat template; the
    tokenizer's own special tokens added; each text's first ``max_tokens`` tokens, which is all of a bundled
    paragraph for a real tokenizer), under whatever hooks are active."""
    nll, count = 0.0, 0
    pad = lm.tokenizer.pad_token_id or 0
    limit = min(max_tokens, getattr(lm.model.config, "max_position_embeddings", None) or max_tokens)
    encoded = [lm.tokenizer(t)["input_ids"][:limit] for t in texts]
    for start in range(0, len(encoded), batch_size):
        seqs = encoded[start : start + batch_size]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=lm.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=lm.device)
        logits = lm.forward({"input_ids": ids, "attention_mask": mask}, all_logits=True).logits[:, :-1].float()
        target, valid = ids[:, 1:], mask[:, 1:].bool() & mask[:, :-1].bool()
        token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        nll += float(token_nll[valid].sum())
        count += int(valid.sum())
    return float(torch.exp(torch.tensor(nll / max(count, 1))))
