"""Metrics of a model, or of a runtime intervention, against the unedited model.

* verdicts on greedy answers to held-out prompts: refusal / compliance / degenerate (/ unparsed, for a
  model judge that could not be read), on harmful prompts (refusal rate) and harmless ones (over-refusal);
  every rate with its 95 % Wilson interval;
* induced refusal rate on harmless prompts under an induction;
* KL(base || edited) of the first response token on harmless prompts, base computed once per run, and
  KL averaged over the first ``kl_tokens`` tokens of the base model's own greedy answers (teacher-forced;
  :mod:`abliterate.evaluate.damage`);
* perplexity on a small set of harmless paragraphs (bundled ``data/texts.txt``).

The contract of the final evaluation: greedy answers of up to ``max_new_tokens`` (default
:data:`MAX_NEW_TOKENS` = 100) new tokens, at least ``min_new_tokens`` (default 0: a model that
stops early is not forced on), on :data:`N_TEST` = 64 held-out prompts per side by default.
Search and selection use cheap first-token scores instead (:mod:`abliterate.measure.first_token`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from abliterate.errors import AbliterateError
from abliterate.evaluate import base_cache
from abliterate.evaluate.base_cache import BaseRecord, cache_key
from abliterate.evaluate.damage import TOP, AnswerReference, answer_kl, answer_reference, bundled_texts, perplexity
from abliterate.evaluate.judge import VERDICTS, DegenerateDetector, Judge, MarkerJudge, Verdict, judge_responses
from abliterate.lm.model import LoadedModel, Progress, Steps
from abliterate.measure.capture import check_prompts
from abliterate.measure.first_token import first_token_logprobs, kl_divergence

Edit = Callable[[], AbstractContextManager[Any]]

MAX_NEW_TOKENS = 100  # answers of up to 100 new tokens unless the model stops: long enough to go past a preamble
MIN_NEW_TOKENS = 0
N_TEST = 64  # held-out prompts per side
KL_TOKENS = 16  # answer tokens of the base model along which the multi-token KL is averaged
Z95 = 1.959963984540054

# metrics.json key -> (prompt side, verdict)
RATES: dict[str, tuple[str, Verdict]] = {
    "refusal_rate": ("harmful", "refusal"),
    "compliance_rate": ("harmful", "compliance"),
    "degenerate_rate": ("harmful", "degenerate"),
    "unparsed_rate": ("harmful", "unparsed"),
    "over_refusal": ("harmless", "refusal"),
    "harmless_compliance_rate": ("harmless", "compliance"),
    "harmless_degenerate_rate": ("harmless", "degenerate"),
    "harmless_unparsed_rate": ("harmless", "unparsed"),
}


class EvaluationError(AbliterateError):
    """Evaluation settings that cannot work (e.g. more minimum than maximum new tokens)."""


def check_lengths(min_new_tokens: int, max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise EvaluationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if min_new_tokens < 0:
        raise EvaluationError(f"min_new_tokens must be >= 0, got {min_new_tokens}")
    if min_new_tokens > max_new_tokens:
        raise EvaluationError(
            f"min_new_tokens ({min_new_tokens}) is above max_new_tokens ({max_new_tokens}); "
            "lower --min-new-tokens or raise --max-new-tokens"
        )


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes in ``n`` trials (95 % for the default ``z``)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


@dataclass
class Sample:
    prompt: str
    response: str
    verdict: Verdict
    reason: str = ""  # why it is degenerate, or what an unparsed judge said
    also: dict[str, str] = field(default_factory=dict)  # other judges' verdicts on the same answer

    @property
    def refused(self) -> bool:
        return self.verdict == "refusal"


def _counts(samples: Sequence[Sample]) -> dict[str, int]:
    return {v: sum(s.verdict == v for s in samples) for v in VERDICTS}


@dataclass
class Metrics:
    """One measured condition: verdict counts per prompt side, rates (fractions in [0, 1]) with 95 %
    Wilson intervals; ``kl`` (first response token) and ``kl_answer`` (mean over the first ``kl_tokens``
    tokens of the base model's answers) in nats per prompt; ``perplexity`` on the harmless texts."""

    name: str
    kl: float
    harmful_samples: list[Sample] = field(default_factory=list)
    harmless_samples: list[Sample] = field(default_factory=list)
    judge: str = "marker"
    kl_answer: float = float("nan")
    kl_tokens: int = 0
    perplexity: float = float("nan")
    behaviour: str = "refusal"  # the behaviour profile judged: a "refusal" verdict means it was shown
    from_cache: bool = False  # the unedited model's answers and damage numbers were read from the cross-run cache

    @property
    def n_harmful(self) -> int:
        return len(self.harmful_samples)

    @property
    def n_harmless(self) -> int:
        return len(self.harmless_samples)

    def counts(self, side: str) -> dict[str, int]:
        return _counts(self.harmful_samples if side == "harmful" else self.harmless_samples)

    def rate(self, key: str) -> float:
        side, verdict = RATES[key]
        n = self.n_harmful if side == "harmful" else self.n_harmless
        return self.counts(side)[verdict] / n if n else 0.0

    def interval(self, key: str) -> tuple[float, float]:
        side, verdict = RATES[key]
        return wilson(self.counts(side)[verdict], self.n_harmful if side == "harmful" else self.n_harmless)

    def agreement(self) -> dict[str, dict[str, float]]:
        """Per other judge: on how many of the answers that are not degenerate (both judges see the same
        ones) it gave the main judge's verdict: ``{"rate": fraction, "n": answers}``."""
        samples = [s for s in self.harmful_samples + self.harmless_samples if s.verdict != "degenerate"]
        names = sorted({name for s in samples for name in s.also})
        return {
            name: {
                "rate": sum(s.also.get(name) == s.verdict for s in samples) / len(samples) if samples else 0.0,
                "n": len(samples),
            }
            for name in names
        }

    @property
    def refusal_rate(self) -> float:
        return self.rate("refusal_rate")

    @property
    def compliance_rate(self) -> float:
        return self.rate("compliance_rate")

    @property
    def degenerate_rate(self) -> float:
        return self.rate("degenerate_rate")

    @property
    def over_refusal(self) -> float:
        return self.rate("over_refusal")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "judge": self.judge, "behaviour": self.behaviour}
        for key in RATES:
            out[key] = self.rate(key)
            out[f"{key}_ci95"] = list(self.interval(key))
        out |= {
            "kl": self.kl,
            "kl_answer": self.kl_answer,
            "kl_tokens": self.kl_tokens,
            "perplexity": self.perplexity,
            "from_cache": self.from_cache,
            "n_harmful": self.n_harmful,
            "n_harmless": self.n_harmless,
            "counts": {"harmful": self.counts("harmful"), "harmless": self.counts("harmless")},
            "agreement": self.agreement(),
            "harmful_samples": [vars(s) for s in self.harmful_samples],
            "harmless_samples": [vars(s) for s in self.harmless_samples],
        }
        return out


def behaviour_label(key: str, behaviour: str) -> str:
    """A :data:`RATES` key in words for a behaviour other than refusal: "flowery shown (behaviour prompts)"."""
    side, verdict = RATES[key]
    what = {"refusal": f"{behaviour} shown", "compliance": f"{behaviour} not shown"}.get(verdict, verdict)
    return f"{what} ({'behaviour' if side == 'harmful' else 'plain'} prompts)"


def format_rate(metrics: Metrics, key: str) -> str:
    """``"12% (7-20)"``: the rate and its 95 % Wilson interval, in percent."""
    lo, hi = metrics.interval(key)
    return f"{metrics.rate(key):.0%} ({100 * lo:.0f}-{100 * hi:.0f})"


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
    computed once and reused for every KL. Answers are greedy, ``min_new_tokens`` to ``max_new_tokens``
    long, judged by ``judge`` after ``detector`` has set degenerate ones aside."""

    def __init__(
        self,
        lm: LoadedModel,
        harmful: Sequence[str],
        harmless: Sequence[str],
        *,
        judge: Judge | None = None,
        compare: Sequence[Judge] | None = None,
        detector: DegenerateDetector | None = None,
        system: str | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        min_new_tokens: int = MIN_NEW_TOKENS,
        kl_tokens: int = KL_TOKENS,
        perplexity_texts: Sequence[str] | None = None,
        batch_size: int = 8,
    ) -> None:
        check_lengths(min_new_tokens, max_new_tokens)
        if kl_tokens < 1:
            raise EvaluationError(f"kl_tokens must be at least 1, got {kl_tokens}")
        self.lm = lm
        self.harmful = check_prompts(harmful, "harmful evaluation", minimum=1)
        self.harmless = check_prompts(harmless, "harmless evaluation", minimum=1)
        self.judge: Judge = judge or MarkerJudge()
        # other judges run on the same answers, for agreement; the marker judge by default when it is not the main one
        self.compare = list(compare if compare is not None else [] if self.judge.name == "marker" else [MarkerJudge()])
        self.detector = detector or DegenerateDetector()
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.kl_tokens = kl_tokens
        self.texts = list(bundled_texts() if perplexity_texts is None else perplexity_texts)
        if not self.texts:
            raise EvaluationError("no perplexity texts; pass at least one (or None for the bundled ones)")
        self.batch_size = batch_size
        self._base: torch.Tensor | None = None
        self._answers: AnswerReference | None = None
        self.cache_note = ""  # why the base evaluation was not stored in the cross-run cache, when it was not

    def base_logprobs(self) -> torch.Tensor:
        if self._base is None:
            self._base = first_token_logprobs(self.lm, self.harmless, system=self.system, batch_size=self.batch_size)
        return self._base

    def base_answers(self, progress: Progress | None = None) -> AnswerReference:
        """The unedited model's first ``kl_tokens`` answer tokens to the harmless prompts and its distributions
        along them, computed once (before any edit) and reused for every multi-token KL."""
        if self._answers is None:
            self._answers = answer_reference(
                self.lm,
                self.harmless,
                k=self.kl_tokens,
                system=self.system,
                batch_size=self.batch_size,
                progress=progress,
            )
        return self._answers

    def _samples(self, prompts: list[str], responses: list[str]) -> list[Sample]:
        """Judge answers (the main judge, then every other judge for agreement)."""
        judged = judge_responses(self.judge, prompts, responses, detector=self.detector)
        samples = [Sample(p, r, j.verdict, j.reason) for p, r, j in zip(prompts, responses, judged, strict=True)]
        for other in self.compare:
            for sample, j in zip(
                samples, judge_responses(other, prompts, responses, detector=self.detector), strict=True
            ):
                sample.also[other.name] = j.verdict
        return samples

    def _generate(self, lm: LoadedModel, prompts: list[str], progress: Progress | None) -> list[str]:
        return lm.generate(
            prompts,
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            system=self.system,
            batch_size=self.batch_size,
            progress=progress,
        )

    def _produce(self, target: LoadedModel, steps: Steps) -> BaseRecord:
        """Everything ``target`` (under whatever edit is active) produces for one measurement: answers per side,
        first-token KL, answer KL and perplexity (the base references computed first, if not yet)."""
        base = self.base_logprobs()
        answers = self.base_answers(steps.part(len(self.harmless) if self._answers is None else 0))
        harmful = self._generate(target, self.harmful, steps.part(len(self.harmful)))
        harmless = self._generate(target, self.harmless, steps.part(len(self.harmless)))
        logp = first_token_logprobs(target, self.harmless, system=self.system, batch_size=self.batch_size)
        kl_answer = answer_kl(target, self.harmless, answers, system=self.system, batch_size=self.batch_size)
        ppl = perplexity(target, self.texts, batch_size=max(1, self.batch_size // 4))
        steps.advance(1)
        kl = float(kl_divergence(base, logp).mean())
        return BaseRecord(harmful, harmless, base, answers, kl, float(kl_answer.mean()), ppl)

    def _steps(self, progress: Progress | None) -> Steps:
        """Progress of one measurement in answers generated (the base's reference answers too while they are
        still to be made), plus one step for the damage measures after them."""
        base = len(self.harmless) if self._answers is None else 0
        return Steps(progress, base + len(self.harmful) + len(self.harmless) + 1)

    def _metrics(self, name: str, record: BaseRecord) -> Metrics:
        return Metrics(
            name=name,
            kl=record.kl,
            harmful_samples=self._samples(self.harmful, record.harmful),
            harmless_samples=self._samples(self.harmless, record.harmless),
            judge=self.judge.name,
            kl_answer=record.kl_answer,
            kl_tokens=self.kl_tokens,
            perplexity=record.perplexity,
        )

    def measure(
        self,
        name: str,
        edit: Edit | None = None,
        *,
        model: LoadedModel | None = None,
        progress: Progress | None = None,
    ) -> Metrics:
        """Measure the base model, the base model under ``edit`` (a context-manager factory such as
        ``lambda: ablate(lm, r)``), or another ``model`` (e.g. a saved abliterated copy). ``progress(done, total)``
        is called after every generation batch."""
        steps = self._steps(progress)
        self.base_logprobs()
        self.base_answers(steps.part(len(self.harmless) if self._answers is None else 0))
        with edit() if edit else contextlib.nullcontext():
            record = self._produce(model or self.lm, steps)
        return self._metrics(name, record)

    def cache_key(self) -> str | None:
        """The key of this evaluator's base evaluation in the cross-run cache (:mod:`abliterate.evaluate.base_cache`):
        the model's weights, the tokenized prompts and texts, the generation settings; None for a model whose
        weights are not all in memory."""
        tok = self.lm.tokenizer
        inputs = {
            side: [tok(t, add_special_tokens=False)["input_ids"] for t in self.lm.format(prompts, system=self.system)]
            for side, prompts in (("harmful", self.harmful), ("harmless", self.harmless))
        }
        inputs["texts"] = [tok(t)["input_ids"] for t in self.texts]
        settings = {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "batch_size": self.batch_size,
            "kl_tokens": self.kl_tokens,
            "top": TOP,
            "eos": sorted(self.lm.eos_ids()),
            "pad": tok.pad_token_id,
            "capabilities": self.lm.caps.to_dict(),
        }
        return cache_key(self.lm, inputs, settings)

    def measure_base(self, name: str, *, cache: Path | None = None, progress: Progress | None = None) -> Metrics:
        """Measure the unedited model (no edit may be active). With ``cache`` (a folder), what it produces is
        read from there when a run with the same key stored it, else measured and stored (see
        :mod:`abliterate.evaluate.base_cache`); the answers are judged afresh either way. The result's
        ``from_cache`` says which; :attr:`cache_note` says why nothing was stored, when that happened."""
        key = self.cache_key() if cache is not None else None
        record = base_cache.load(cache, key) if cache is not None and key else None
        hit = record is not None
        if record is None:
            steps = self._steps(progress)
            record = self._produce(self.lm, steps)
            if cache is not None and key:
                self.cache_note = base_cache.store(cache, key, record)
            elif cache is not None:
                self.cache_note = "the unedited model's evaluation was not cached: its weights are not all in memory"
        else:
            self._base, self._answers = record.logprobs, record.answers
            if progress:
                progress(1, 1)
        metrics = self._metrics(name, record)
        metrics.from_cache = hit
        return metrics

    def induced_refusal(self, edit: Edit) -> tuple[float, list[Sample]]:
        """Refusal rate on the harmless prompts under an induction."""
        with edit():
            responses = self._generate(self.lm, self.harmless, None)
        samples = self._samples(self.harmless, responses)
        return sum(s.refused for s in samples) / len(samples), samples
