"""One validation scorer for every choice of edit (the sweep, the subspace size, the search).

A :class:`Scorer` formats and tokenizes its harmful and harmless validation prompts once, holds
the refusal-token ids and the unedited model's first-response-token log-probabilities, and then
scores whatever state the model is in now (runtime hooks or in-place weight edits):

* cheap, generation-free objectives from the first response token: refusal log-odds on harmful
  prompts (and the fraction above even odds), KL(base || current) over the full vocabulary on
  harmless prompts, refusal log-odds on harmless prompts (over-refusal);
* an expensive one, for promising candidates only: greedy generation on either side, judged by the run's
  :class:`Judge` through :func:`~abliterate.evaluate.judge.judge_responses` (the final evaluation's verdicts).

Each pass re-runs the shared chat-template prefix (an edit changes its KV cache) but never
re-tokenizes or re-sorts; only the last position's logits are computed, and only per-prompt
scalars leave the model's device.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from abliterate.errors import PromptError
from abliterate.evaluate.judge import Judge, Judgement, judge_responses
from abliterate.lm.model import LoadedModel, Progress
from abliterate.measure.batching import BatchRunner
from abliterate.measure.capture import check_prompts
from abliterate.measure.first_token import kl_divergence, refusal_scores, refusal_token_ids

SCORE_BATCH = 32  # prompts per forward pass: on the demo model's CPU run ~20% cheaper than 16
GENERATION_BATCH = 32  # decoding re-reads every weight per step: wide batches amortize it
Side = Literal["harmful", "harmless"]


@dataclass
class Score:
    """First-token scores of one model state on the validation prompts (log-odds in nats)."""

    refusal: float  # mean refusal log-odds on the harmful prompts (lower = fewer refusals)
    refusal_rate: float  # fraction of harmful prompts whose refusal-token probability is > 0.5
    kl: float  # mean KL(base || current) of the first response token on the harmless prompts
    harmless_refusal: float  # mean refusal log-odds on the harmless prompts (over-refusal proxy)
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Scorer:
    """Holds the validation prompts (formatted and tokenized once), the refusal-token ids and the
    unedited model's first-token log-probs; scores the model's current state (whatever hooks or
    in-place weight edits are active). The model must be unedited when the scorer is built."""

    def __init__(
        self,
        lm: LoadedModel,
        harmful: Sequence[str],
        harmless: Sequence[str],
        *,
        system: str | None = None,
        batch_size: int = SCORE_BATCH,
        refusal_ids: Sequence[int] | None = None,
        progress: Progress | None = None,
    ) -> None:
        if batch_size < 1:
            raise PromptError(f"batch_size must be at least 1, got {batch_size}")
        self.lm = lm
        self.harmful = check_prompts(harmful, "harmful validation", minimum=1)
        self.harmless = check_prompts(harmless, "harmless validation", minimum=1)
        self.system = system
        self.batch_size = batch_size
        self.progress = progress
        ids = sorted({int(i) for i in refusal_token_ids(lm.tokenizer)} if refusal_ids is None else set(refusal_ids))
        if not ids:
            raise PromptError("no refusal token ids; pass refusal_ids or leave it unset to derive them")
        if ids[0] < 0:
            raise PromptError(f"refusal token id {ids[0]} is negative; pass ids the tokenizer produced")
        self.refusal_ids: list[int] = ids
        self._harmful = BatchRunner(lm, lm.format(self.harmful, system=system), batch_size)
        self._harmless = BatchRunner(lm, lm.format(self.harmless, system=system), batch_size)
        self._base: torch.Tensor | None = None  # [n_harmless, vocab] float32 on the model's device
        start = time.perf_counter()
        harmful_lo = self._pass(self._harmful)[0]
        harmless_lo, _, self._base = self._pass(self._harmless, keep=True)
        self.base = self._score(harmful_lo, harmless_lo, torch.zeros(len(self.harmless)), start)

    # -- passes -------------------------------------------------------------------------------

    @torch.inference_mode()
    def _pass(
        self, runner: BatchRunner, *, keep: bool = False, kl: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One pass over a runner's prompts: per-prompt refusal log-odds, per-prompt KL against the
        base (``kl``) and the full log-probs (``keep``), rows in the caller's order."""
        n = len(runner.ids)
        logodds = torch.empty(n)
        kls = torch.empty(n) if kl else None
        kept: torch.Tensor | None = None
        runner.prefill()
        done = 0
        for batch in runner:
            logits = batch.output.logits[:, -1, :]
            if self.refusal_ids[-1] >= logits.shape[-1]:
                raise PromptError(
                    f"refusal token id {self.refusal_ids[-1]} is outside the model's vocabulary "
                    f"({logits.shape[-1]} tokens); pass ids the tokenizer produced"
                )
            logp = torch.log_softmax(logits.float(), dim=-1)
            rows = torch.tensor(batch.rows)
            logodds[rows] = refusal_scores(logp, self.refusal_ids).cpu()
            if kls is not None:
                assert self._base is not None
                kls[rows] = kl_divergence(self._base[rows.to(logp.device)], logp).cpu()
            if keep:
                if kept is None:
                    kept = torch.empty(n, logp.shape[-1], device=logp.device)
                kept[rows.to(logp.device)] = logp
            done += len(batch.rows)
            if self.progress:
                self.progress(done, n)
        return logodds, kls, kept

    def _score(self, harmful: torch.Tensor, harmless: torch.Tensor, kl: torch.Tensor, start: float) -> Score:
        return Score(
            refusal=float(harmful.mean()),
            refusal_rate=float((harmful > 0).float().mean()),
            kl=float(kl.mean()),
            harmless_refusal=float(harmless.mean()),
            seconds=time.perf_counter() - start,
        )

    # -- cheap objectives ---------------------------------------------------------------------

    def score(self) -> Score:
        """Score the current state: one pass over the harmful and one over the harmless prompts."""
        start = time.perf_counter()
        harmful = self._pass(self._harmful)[0]
        harmless, kl, _ = self._pass(self._harmless, kl=True)
        assert kl is not None
        return self._score(harmful, harmless, kl, start)

    def harmful_refusal(self) -> float:
        """Mean refusal log-odds on the harmful prompts only (half a :meth:`score`, for pruning)."""
        return float(self._pass(self._harmful)[0].mean())

    def induce(self) -> float:
        """Mean refusal log-odds on the harmless prompts under the current state (an induction test)."""
        return float(self._pass(self._harmless)[0].mean())

    # -- expensive objective --------------------------------------------------------------------

    def responses(
        self,
        max_new_tokens: int = 32,
        prompts: int | None = None,
        *,
        batch_size: int | None = None,
        side: Side = "harmful",
    ) -> list[str]:
        """Greedy responses of the current state to the first ``prompts`` prompts of ``side`` (default all),
        in order, as :meth:`LoadedModel.generate` gives them. Batches (``batch_size``, default
        :data:`GENERATION_BATCH`) are length-sorted and share the chat-template prefix's KV cache."""
        if side not in ("harmful", "harmless"):
            raise PromptError(f"side must be harmful or harmless, got {side!r}")
        texts = self.harmful if side == "harmful" else self.harmless
        n = len(texts) if prompts is None else prompts
        if not 1 <= n <= len(texts):
            raise PromptError(f"prompts must be between 1 and {len(texts)} (the {side} set), got {prompts}")
        if max_new_tokens < 1:
            raise PromptError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        size = GENERATION_BATCH if batch_size is None else batch_size
        if size < 1:
            raise PromptError(f"batch_size must be at least 1, got {size}")
        runner = self._harmful if side == "harmful" else self._harmless
        order = [r for r in runner.order if r < n]
        out: list[str] = [""] * n
        with torch.inference_mode():
            runner.prefill()
            for start in range(0, n, size):
                rows = order[start : start + size]
                decoded = self._generate(runner, rows, max_new_tokens)
                for r, text in zip(rows, decoded, strict=True):
                    out[r] = text
        return out

    def judged(
        self,
        judge: Judge,
        max_new_tokens: int = 32,
        prompts: int | None = None,
        *,
        batch_size: int | None = None,
        side: Side = "harmful",
    ) -> list[Judgement]:
        """The verdicts on :meth:`responses` exactly as the final evaluation gives them
        (:func:`~abliterate.evaluate.judge.judge_responses`: thinking removed, degenerate answers, an empty one
        among them, set aside before ``judge`` sees the rest)."""
        responses = self.responses(max_new_tokens, prompts, batch_size=batch_size, side=side)
        texts = self.harmful if side == "harmful" else self.harmless
        return judge_responses(judge, texts[: len(responses)], responses)

    def _generate(self, runner: BatchRunner, rows: list[int], max_new_tokens: int) -> list[str]:
        lm = self.lm
        prefix = runner.prefix_len if runner.cache is not None and lm.caps.cache_arg else 0
        head = list(runner.ids[rows[0]][:prefix])
        tails = [runner.ids[r][prefix:] for r in rows]
        width = max(len(t) for t in tails)
        pad = lm.tokenizer.pad_token_id
        ids = torch.tensor([head + [pad] * (width - len(t)) + list(t) for t in tails], device=lm.device)
        mask = torch.tensor([[1] * prefix + [0] * (width - len(t)) + [1] * len(t) for t in tails], device=lm.device)
        kwargs: dict[str, Any] = {}
        if prefix and lm.caps.cache_arg:
            cache = copy.deepcopy(runner.cache)
            cache.batch_repeat_interleave(len(rows))
            kwargs[lm.caps.cache_arg] = cache
        generated = lm.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
            **kwargs,
        )
        return lm.tokenizer.batch_decode(generated[:, ids.shape[1] :], skip_special_tokens=True)
