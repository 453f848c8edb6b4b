"""Metrics of a model, or of a runtime intervention, against the unedited model.

* refusal rate on harmful prompts and over-refusal on harmless prompts (greedy generation + judge);
* induced refusal rate on harmless prompts under an induction;
* KL(base || edited) of the first response token on harmless prompts, base computed once per run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .capture import check_prompts
from .judge import Judge, MarkerJudge
from .model import LoadedModel
from .scoring import first_token_logprobs, kl_divergence

Edit = Callable[[], AbstractContextManager[Any]]


@dataclass
class Sample:
    prompt: str
    response: str
    refused: bool


@dataclass
class Metrics:
    """One measured condition. Rates are fractions in [0, 1]; ``kl`` is nats per prompt."""

    name: str
    refusal_rate: float
    over_refusal: float
    kl: float
    n_harmful: int
    n_harmless: int
    harmful_samples: list[Sample] = field(default_factory=list)
    harmless_samples: list[Sample] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def baseline_note(base: Metrics) -> str:
    """Plain words when a 'success' would be meaningless because nothing was refused to begin with."""
    if base.refusal_rate == 0.0:
        return (
            f"the unedited model refused none of the {base.n_harmful} harmful prompts; "
            "there was no refusal to remove, so a 0% refusal rate after editing means nothing"
        )
    return ""


class Evaluator:
    """Measures conditions on fixed prompt sets; the base model's first-token distribution is
    computed once and reused for every KL."""

    def __init__(
        self,
        lm: LoadedModel,
        harmful: Sequence[str],
        harmless: Sequence[str],
        *,
        judge: Judge | None = None,
        system: str | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 8,
    ) -> None:
        self.lm = lm
        self.harmful = check_prompts(harmful, "harmful evaluation", minimum=1)
        self.harmless = check_prompts(harmless, "harmless evaluation", minimum=1)
        self.judge = judge or MarkerJudge()
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self._base: torch.Tensor | None = None

    def base_logprobs(self) -> torch.Tensor:
        if self._base is None:
            self._base = first_token_logprobs(self.lm, self.harmless, system=self.system, batch_size=self.batch_size)
        return self._base

    def _respond(self, lm: LoadedModel, prompts: list[str]) -> list[Sample]:
        responses = lm.generate(
            prompts, max_new_tokens=self.max_new_tokens, system=self.system, batch_size=self.batch_size
        )
        return [Sample(p, r, v) for p, r, v in zip(prompts, responses, self.judge.judge(responses), strict=True)]

    def measure(self, name: str, edit: Edit | None = None, *, model: LoadedModel | None = None) -> Metrics:
        """Measure the base model, the base model under ``edit`` (a context-manager factory such as
        ``lambda: ablate(lm, r)``), or another ``model`` (e.g. a saved abliterated copy)."""
        target = model or self.lm
        base = self.base_logprobs()
        with edit() if edit else contextlib.nullcontext():
            harmful = self._respond(target, self.harmful)
            harmless = self._respond(target, self.harmless)
            logp = first_token_logprobs(target, self.harmless, system=self.system, batch_size=self.batch_size)
        return Metrics(
            name=name,
            refusal_rate=sum(s.refused for s in harmful) / len(harmful),
            over_refusal=sum(s.refused for s in harmless) / len(harmless),
            kl=float(kl_divergence(base, logp).mean()),
            n_harmful=len(harmful),
            n_harmless=len(harmless),
            harmful_samples=harmful,
            harmless_samples=harmless,
        )

    def induced_refusal(self, edit: Edit) -> tuple[float, list[Sample]]:
        """Refusal rate on the harmless prompts under an induction."""
        with edit():
            samples = self._respond(self.lm, self.harmless)
        return sum(s.refused for s in samples) / len(samples), samples
