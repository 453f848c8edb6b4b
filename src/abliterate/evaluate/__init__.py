"""Judging answers and measuring damage: verdicts, LLM judges, KL and length damage, capability tasks."""

from abliterate.evaluate.capability import Harness
from abliterate.evaluate.damage import answer_kl, perplexity
from abliterate.evaluate.evaluation import Evaluator, Metrics
from abliterate.evaluate.judge import DegenerateDetector, Judge, Judgement, MarkerJudge, judge_responses
from abliterate.evaluate.llm_judges import ClassifierJudge, LLMJudge, judge_from_spec

__all__ = [
    "answer_kl",
    "ClassifierJudge",
    "DegenerateDetector",
    "Evaluator",
    "Harness",
    "Judge",
    "judge_from_spec",
    "judge_responses",
    "Judgement",
    "LLMJudge",
    "MarkerJudge",
    "Metrics",
    "perplexity",
]
