"""What ``run`` returns and writes as ``metrics.json``: below the pipeline, so that the model card and the
report read it without importing the pipeline that builds them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abliterate.version import __version__

if TYPE_CHECKING:
    from abliterate.evaluate.evaluation import Metrics
    from abliterate.run.choosing import Choice
    from abliterate.select.sweep import Selection


@dataclass
class RunResult:
    out: Path | None
    selection: Selection
    before: Metrics
    after: Metrics
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    capabilities: dict[str, Any] = field(default_factory=dict)  # the model's ForwardCapabilities
    choice: Choice | None = None  # the edit made: the sweep's, or the search's pick (with every trial)
    behaviour: dict[str, Any] = field(default_factory=dict)  # the profile: name, goal, judge, scored token ids
    induction: dict[str, Any] | None = None  # goal induce: the baked induction (edit.json)

    def metrics(self) -> dict[str, Any]:
        chosen = self.selection.chosen
        return {
            "abliterate_version": __version__,
            "model": self.config.get("model"),
            "chosen": None
            if chosen is None
            else {"layer": chosen.layer, "position": chosen.position, "method": chosen.method},
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "selection": self.selection.to_dict(),
            "timings_s": self.timings,
            "model_capabilities": self.capabilities,
            "edit": None if self.choice is None else self.choice.to_dict(),
            "search": None if self.choice is None or self.choice.search is None else self.choice.search.to_dict(),
            "behaviour": self.behaviour,
            "induction": self.induction,
            "note": self.note,
        }
