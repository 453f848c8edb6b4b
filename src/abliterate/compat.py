"""Old import paths keep working: ``abliterate.<module>`` of the flat layout, before the modules moved into
subpackages, resolves to the module's new home (the very same module object, so monkeypatching either path
patches both). Loaded lazily: nothing is imported until an old path is."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

# The flat layout's module paths, before the move into subpackages, and where each module lives now.
MOVED: dict[str, str] = {
    "abliterate.adapter": "abliterate.outputs.adapter",
    "abliterate.anatomy": "abliterate.arch.anatomy",
    "abliterate.applying": "abliterate.run.applying",
    "abliterate.batching": "abliterate.measure.batching",
    "abliterate.bias_writers": "abliterate.arch.bias_writers",
    "abliterate.capability": "abliterate.evaluate.capability",
    "abliterate.capture": "abliterate.measure.capture",
    "abliterate.card": "abliterate.outputs.card",
    "abliterate.choosing": "abliterate.run.choosing",
    "abliterate.cli_chat": "abliterate.cli.chat",
    "abliterate.cli_common": "abliterate.cli.common",
    "abliterate.cli_eval": "abliterate.cli.evaluate",
    "abliterate.cli_export": "abliterate.cli.export",
    "abliterate.cli_pick": "abliterate.cli.pick",
    "abliterate.cli_run": "abliterate.cli.run",
    "abliterate.cli_share": "abliterate.cli.share",
    "abliterate.cli_tools": "abliterate.cli.tools",
    "abliterate.comparison": "abliterate.run.comparison",
    "abliterate.config": "abliterate.run.config",
    "abliterate.control_vector": "abliterate.outputs.control_vector",
    "abliterate.damage": "abliterate.evaluate.damage",
    "abliterate.demo": "abliterate.lm.demo",
    "abliterate.direction_edit": "abliterate.edit.direction_edit",
    "abliterate.directions": "abliterate.measure.directions",
    "abliterate.discovery": "abliterate.arch.discovery",
    "abliterate.evaluation": "abliterate.evaluate.evaluation",
    "abliterate.exporting": "abliterate.run.exporting",
    "abliterate.hook_edit": "abliterate.edit.hook_edit",
    "abliterate.hooks": "abliterate.ops.hooks",
    "abliterate.hub": "abliterate.outputs.hub",
    "abliterate.induction": "abliterate.run.induction",
    "abliterate.interventions": "abliterate.edit.interventions",
    "abliterate.judge": "abliterate.evaluate.judge",
    "abliterate.judges": "abliterate.evaluate.llm_judges",
    "abliterate.kernel": "abliterate.ops.kernel",
    "abliterate.loading": "abliterate.lm.loading",
    "abliterate.manifest": "abliterate.outputs.manifest",
    "abliterate.miniature": "abliterate.arch.miniature",
    "abliterate.model": "abliterate.lm.model",
    "abliterate.patterns": "abliterate.arch.patterns",
    "abliterate.pipeline": "abliterate.run.pipeline",
    "abliterate.placement": "abliterate.ops.placement",
    "abliterate.plan": "abliterate.edit.plan",
    "abliterate.plots": "abliterate.outputs.plots",
    "abliterate.profiles": "abliterate.behaviours.profiles",
    "abliterate.projection": "abliterate.arch.projection",
    "abliterate.prompts": "abliterate.behaviours.prompts",
    "abliterate.report": "abliterate.outputs.report",
    "abliterate.report_search": "abliterate.outputs.report_search",
    "abliterate.run_context": "abliterate.run.context",
    "abliterate.run_manifest": "abliterate.run.run_manifest",
    "abliterate.run_result": "abliterate.run.result",
    "abliterate.saving": "abliterate.lm.saving",
    "abliterate.scorer": "abliterate.select.scorer",
    "abliterate.scoring": "abliterate.measure.first_token",
    "abliterate.search": "abliterate.select.search",
    "abliterate.search_space": "abliterate.select.search_space",
    "abliterate.selection": "abliterate.select.sweep",
    "abliterate.selfcheck": "abliterate.arch.selfcheck",
    "abliterate.shard_edit": "abliterate.checkpoint.shard_edit",
    "abliterate.shards": "abliterate.checkpoint.shards",
    "abliterate.space": "abliterate.edit.spec",
    "abliterate.streaming": "abliterate.checkpoint.stream_edit",
    "abliterate.streams": "abliterate.arch.streams",
    "abliterate.subspace": "abliterate.select.subspace",
    "abliterate.template": "abliterate.lm.template",
    "abliterate.verify": "abliterate.arch.verify",
    "abliterate.weights": "abliterate.edit.weights",
    "abliterate.writer": "abliterate.arch.writer",
}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A finder for the old flat module paths: each one loads as the module at its new path."""

    def __init__(self, moved: dict[str, str]) -> None:
        self.moved = moved
        self.specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.moved:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.moved[spec.name])
        self.specs[spec.name] = module.__spec__  # the import system stamps the old spec on it; exec_module restores it
        return module

    def exec_module(self, module: ModuleType) -> None:
        for old, spec in list(self.specs.items()):
            if sys.modules.get(old) is module:
                module.__spec__ = spec
                del self.specs[old]


def install() -> None:
    """Serve the old paths. Those whose module is loaded already are aliased at once: importing them later then
    leaves the package's attributes alone (``abliterate.capture`` stays the function, not its module)."""
    for old, new in MOVED.items():
        if new in sys.modules and old not in sys.modules:
            sys.modules[old] = sys.modules[new]
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules(MOVED))
