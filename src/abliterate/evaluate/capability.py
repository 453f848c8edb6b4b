"""Capability scores from lm-evaluation-harness (the optional extra ``abliterate[bench]``) on a loaded model.

Refusal rates and KL say what an edit changed on refusals and how far the next-token distribution moved;
a benchmark says whether the model still knows things. :class:`Harness` resolves task names once (the
harness scans its few thousand task YAMLs, plus any ``task_paths`` holding local ones), then scores any
number of already-loaded models, or one model under a runtime edit, through the harness's Python API
(``simple_evaluate`` on an ``HFLM`` that wraps the loaded model and tokenizer; nothing is reloaded).
Prompts are plain text as the harness builds them (no chat template), as its own default is.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abliterate.errors import CapabilityError
from abliterate.lm.model import LoadedModel

INSTALL = "pip install 'abliterate[bench]'"
Edit = Callable[[], AbstractContextManager[Any]]
_SKIP = {"alias", "name", "sample_len", "samples"}


def lm_eval_module() -> Any:
    """The ``lm_eval`` package, or one error line saying how to install it."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (HFLM: fails early if its own imports are missing)
    except ImportError as exc:
        raise CapabilityError(
            f"--tasks needs lm-evaluation-harness, which is not installed ({exc}); {INSTALL}"
        ) from None
    return lm_eval


def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]`` (blank entries dropped, order and duplicates kept once)."""
    if spec is None:
        return []
    parts = [spec] if isinstance(spec, str) else list(spec)
    names = [name.strip() for part in parts for name in part.split(",")]
    return list(dict.fromkeys(name for name in names if name))


@dataclass
class Capability:
    """One model's scores: ``scores[task][metric]`` (a metric that a harness filter produced is named
    ``metric,filter``), with ``metric_stderr`` where the harness computed one, and ``n[task]`` the number of
    documents scored."""

    name: str
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {task: {**metrics, "n": self.n.get(task, 0)} for task, metrics in self.scores.items()}

    def rows(self) -> list[tuple[str, str]]:
        """``(task, metric)`` pairs that have a value (stderr entries left out), in the harness's order."""
        return [(t, m) for t, ms in self.scores.items() for m in ms if not m.endswith("_stderr")]

    def format(self, task: str, metric: str) -> str:
        value = self.scores.get(task, {}).get(metric)
        if value is None:
            return "-"
        err = self.scores[task].get(f"{metric}_stderr")
        spread = f" ± {err:.3f}" if err is not None and math.isfinite(err) else ""
        return f"{value:.3f}{spread} (n={self.n.get(task, 0)})"


def _scores(results: dict[str, Any]) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """``simple_evaluate``'s results -> (scores per task, documents per task)."""
    scores: dict[str, dict[str, float]] = {}
    for task, entry in results.get("results", {}).items():
        metrics: dict[str, float] = {}
        for key, value in entry.items():
            if key in _SKIP or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric.removesuffix('_stderr')},{filt}"
            if metric.endswith("_stderr") and filt not in ("", "none"):
                name += "_stderr"
            metrics[name] = float(value)
        scores[task] = metrics
    n = {task: int(v.get("effective", v.get("original", 0))) for task, v in results.get("n-samples", {}).items()}
    for task in scores:  # a group's documents: the sum over its tasks
        if task not in n and (group := results.get("group_subtasks", {}).get(task)):
            n[task] = sum(n.get(t, 0) for t in group)
    return scores, n


@contextlib.contextmanager
def _quiet_harness() -> Iterator[None]:
    """The harness warns that a model object (not a name) was passed: that is the point here; errors still show."""
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@functools.cache
def _manager(paths: tuple[str, ...]) -> Any:
    """The harness's task index over its registry and ``paths`` (built once per process: the scan takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None)


class Harness:
    """Tasks resolved once, then scored on any number of loaded models.

    ``tasks``: harness task, group or tag names; ``task_paths``: folders of local task YAMLs searched
    besides the harness's own registry; ``limit``: at most this many documents per task (None: all).
    Few-shot counts are each task's own. An unknown name raises :class:`CapabilityError` naming where it looked.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        task_paths: Sequence[str | Path] = (),
        limit: int | None = None,
        batch_size: int = 8,
    ) -> None:
        lm_eval = lm_eval_module()
        self.tasks = parse_tasks(tasks)
        if not self.tasks:
            raise CapabilityError("no task named; give --tasks NAME[,NAME...] (lm-eval ls tasks lists them)")
        if limit is not None and limit < 1:
            raise CapabilityError(f"--limit must be at least 1 document per task, got {limit}")
        self.task_paths = [Path(p) for p in task_paths]
        for path in self.task_paths:
            if not path.is_dir():
                raise CapabilityError(f"--task-path {path} is not a folder; give the folder that holds the task YAMLs")
        self.limit, self.batch_size = limit, batch_size
        self.version = getattr(lm_eval, "__version__", "?")
        self.manager = _manager(tuple(str(p.resolve()) for p in self.task_paths))
        known = set(self.manager.all_tasks)
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise CapabilityError(self._unknown(unknown, sorted(known)))

    def _unknown(self, unknown: list[str], known: list[str]) -> str:
        local = ", ".join(str(p) for p in self.task_paths)
        where = (f"the --task-path folder(s) {local} and " if local else "") + (
            f"the {len(known)} tasks, groups and tags of lm-eval {self.version}'s registry"
        )
        close = sorted({m for t in unknown for m in difflib.get_close_matches(t, known, n=3, cutoff=0.75)})
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return (
            f"unknown lm-eval task {', '.join(unknown)}: looked in {where}{hint} "
            "(lm-eval ls tasks lists the registry; add --task-path DIR for local task YAMLs)"
        )

    def settings(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "task_paths": [str(p) for p in self.task_paths],
            "limit": self.limit,
            "lm_eval": self.version,
            "chat_template": False,
        }

    def score(self, lm: LoadedModel, name: str = "model", edit: Edit | None = None) -> Capability:
        """Scores of ``lm`` (under ``edit``, a context-manager factory such as ``lambda: ablate(lm, r)``)."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        with _quiet_harness():
            wrapped = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=self.batch_size)
            with edit() if edit else contextlib.nullcontext():
                results = simple_evaluate(
                    model=wrapped,
                    tasks=list(self.tasks),
                    limit=self.limit,
                    task_manager=self.manager,
                    log_samples=False,
                )
        if results is None:  # only a non-zero rank of a distributed run gets None
            raise CapabilityError("lm-eval returned no results; run abliterate eval in a single process")
        scores, n = _scores(results)
        return Capability(name, scores, n)
