"""The house's rules, checked on the code itself: the import-linter contracts of pyproject.toml (layers, a search
free of any model, no cycles), and the flat layout's module paths that keep working after the move."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import abliterate
from abliterate.compat import MOVED

ROOT = Path(__file__).resolve().parents[1]
LINT = "from importlinter.cli import lint_imports_command as lint; lint()"


def test_import_contracts_are_kept() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(abliterate.__file__).parents[1])}
    res = subprocess.run(
        [sys.executable, "-c", LINT, "--no-cache", "--no-logo"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_are_the_moved_modules(old: str) -> None:
    module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert module.__spec__.name == MOVED[old], "the module keeps its own spec"


def test_old_paths_work_in_from_imports_and_monkeypatching(monkeypatch) -> None:
    from abliterate.judge import MarkerJudge

    from abliterate import pipeline  # the README's abliterate.pipeline.run
    from abliterate.run import pipeline as moved

    assert pipeline is moved and MarkerJudge.__module__ == "abliterate.evaluate.judge"
    monkeypatch.setattr("abliterate.pipeline.load_profile", "patched")
    assert moved.load_profile == "patched"


def test_old_module_paths_leave_the_package_api_alone() -> None:
    """``abliterate.capture`` is the function; importing the old module path ``abliterate.capture`` keeps it so."""
    func = abliterate.capture
    importlib.import_module("abliterate.capture")
    assert abliterate.capture is func and callable(abliterate.capture)


def test_every_flat_module_name_is_known() -> None:
    """A module added at the top level by mistake (not in a subpackage) fails here, unless it is one of the few that
    belong there."""
    top = {p.stem for p in Path(abliterate.__file__).parent.glob("*.py")}
    assert top == {"__init__", "compat", "errors", "version"}
