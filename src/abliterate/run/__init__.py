"""The pipeline: a run's config, its resolved context, its stages, and the apply/eval flows the CLI calls."""

from abliterate.run.applying import ApplyOptions, apply_saved
from abliterate.run.comparison import Comparison, EvalOptions, compare, evaluate
from abliterate.run.config import RunConfig, SearchConfig
from abliterate.run.pipeline import run
from abliterate.run.result import RunResult

__all__ = [
    "apply_saved",
    "ApplyOptions",
    "compare",
    "Comparison",
    "EvalOptions",
    "evaluate",
    "run",
    "RunConfig",
    "RunResult",
    "SearchConfig",
]
