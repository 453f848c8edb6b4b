"""One stage timer for ``run``: every stage timed by the same context manager, its seconds in ``metrics.json``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

StageProgress = Callable[[str, int, int], None]


class StageTimer:
    """Seconds per stage: ``with timer.stage("load"): ...`` records ``seconds["load"]``.

    A stage whose library call runs several steps without a timer of its own (the search, then its front check)
    is split on the progress it reports: pass the progress through :meth:`watch`, and ``splits`` maps a progress
    stage name to the timed name it starts (``{"check front": "check"}``): the stage's seconds up to the first
    report of that name go to the stage, the rest to ``"check"``.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()
        self._seen: dict[str, float] = {}  # progress stage -> when it was first reported, within the current stage
        self._running: tuple[str, float] | None = None  # the stage being timed, and when it started

    def watch(self, progress: StageProgress | None) -> StageProgress:
        """``progress``, also noting when each progress stage is first reported (for ``splits``)."""

        def report(stage: str, done: int, total: int) -> None:
            self._seen.setdefault(stage, time.perf_counter())
            if progress:
                progress(stage, done, total)

        return report

    @contextmanager
    def stage(self, name: str, splits: Mapping[str, str] | None = None) -> Iterator[None]:
        self._seen = {}
        before = dict(self.seconds)  # what the stage's names held (a repeated stage adds; so_far's copy is replaced)
        start = time.perf_counter()
        self._running = (name, start)
        try:
            yield
        finally:
            self._running = None
            end = time.perf_counter()
            cuts = sorted((t, splits[s]) for s, t in self._seen.items() if splits and s in splits)
            bounds = [(start, name), *cuts, (end, "")]
            for (t, label), (t_next, _) in zip(bounds, bounds[1:], strict=False):
                self.seconds[label] = before.get(label, 0.0) + (t_next - t)

    def so_far(self) -> dict[str, float]:
        """The stages timed, the one running counted up to now, and ``"total"``: for a file written before the
        run ends (``metrics.json`` inside the save stage)."""
        now = time.perf_counter()
        seconds = dict(self.seconds)
        if self._running:
            name, start = self._running
            seconds[name] = seconds.get(name, 0.0) + now - start
        return {**seconds, "total": now - self.started}

    def total(self) -> float:
        """Seconds since the timer was made (the whole run so far)."""
        return time.perf_counter() - self.started
