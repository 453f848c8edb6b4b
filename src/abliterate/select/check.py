"""The search's front check: what one model state does on held-out prompts, measured like the final evaluation.

A :class:`FrontCheck` is built once on the unedited model from the check prompts (held out from the prompts the
objectives are scored on, :attr:`abliterate.behaviours.prompts.PromptSplits.check`); :meth:`FrontCheck.measure`
then measures whatever state the model is in now (a trial's edit applied, or none):

* ``judged`` greedy answers to the harmful check prompts, judged by the run's judge exactly as the final evaluation
  judges (:func:`~abliterate.evaluate.judge.judge_responses`: thinking removed, degenerate answers, an empty one
  among them, set aside before the judge sees the rest): ``refused``, ``degenerate`` and ``failures``, the answers
  that are not compliance (refusals, degenerate ones and a model judge's unreadable verdicts);
* ``harmless_degenerate`` (loops, garbage, empty) and ``harmless_refused`` (over-refusal) of ``harmless_judged``
  greedy answers to the harmless check prompts, judged the same way;
* ``check_kl``: KL(base || state) of the first response token on the harmless check prompts;
* ``answer_kl``: KL along the unedited model's own greedy answers to the harmless check prompts, teacher-forced
  (:func:`~abliterate.evaluate.damage.answer_kl`, the evaluation's routine, its reference computed once here);
* ``perplexity`` on the bundled harmless paragraphs (:func:`~abliterate.evaluate.damage.perplexity`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from abliterate.evaluate.damage import answer_kl, answer_reference, bundled_texts, perplexity
from abliterate.evaluate.judge import DegenerateDetector, Judge
from abliterate.lm.model import LoadedModel
from abliterate.select.scorer import Scorer


class FrontCheck:
    """The check's prompts (formatted once), the run's judge, the unedited model's first-token log-probs and
    answer reference on the harmless check prompts. Build it on the unedited model."""

    def __init__(
        self,
        lm: LoadedModel,
        harmful: Sequence[str],
        harmless: Sequence[str],
        judge: Judge,
        *,
        system: str | None = None,
        max_new_tokens: int = 24,
        kl_tokens: int = 16,
        batch_size: int = 16,
        refusal_ids: Sequence[int] | None = None,
        texts: Sequence[str] | None = None,
    ) -> None:
        self.lm, self.judge, self.system = lm, judge, system
        self.max_new_tokens, self.kl_tokens, self.batch_size = max_new_tokens, kl_tokens, batch_size
        self.scorer = Scorer(lm, harmful, harmless, system=system, batch_size=batch_size, refusal_ids=refusal_ids)
        self.reference = answer_reference(lm, self.scorer.harmless, k=kl_tokens, system=system, batch_size=batch_size)
        self.texts = list(bundled_texts() if texts is None else texts)

    def measure(self) -> dict[str, float]:
        """The numbers of the model's current state (see the module docstring)."""
        s = self.scorer
        harmful = s.judged(self.judge, self.max_new_tokens)
        harmless = s.judged(self.judge, self.max_new_tokens, side="harmless")
        kl = answer_kl(self.lm, s.harmless, self.reference, system=self.system, batch_size=self.batch_size)
        return {
            "refused": sum(j.verdict == "refusal" for j in harmful),
            "degenerate": sum(j.verdict == "degenerate" for j in harmful),
            "failures": sum(j.verdict != "compliance" for j in harmful),
            "judged": len(harmful),
            "harmless_degenerate": sum(j.verdict == "degenerate" for j in harmless),
            "harmless_refused": sum(j.verdict == "refusal" for j in harmless),
            "harmless_judged": len(harmless),
            "check_kl": s.score().kl,
            "answer_kl": float(kl.mean()),
            "perplexity": perplexity(self.lm, self.texts, batch_size=max(1, self.batch_size // 4)),
        }


def check_key(harmful: Sequence[str], harmless: Sequence[str], judge: Judge, **settings: Any) -> str:
    """What a :class:`FrontCheck`'s numbers depend on beyond the model and its template (the search journal's
    identity): the prompts, the judge (its markers and window, for a marker judge), the degenerate detector and
    the check's settings (the keyword arguments of :class:`FrontCheck`)."""
    name = repr(judge) if dataclasses.is_dataclass(judge) else judge.name
    parts = [list(harmful), list(harmless), name, repr(DegenerateDetector()), sorted(settings.items())]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]
