"""The house's rules, checked on the code itself: the import-linter contracts of pyproject.toml (layers, a search
free of any model, no cycles), and nothing at the top level but the package's entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import abliterate

ROOT = Path(__file__).resolve().parents[1]
LINT = "from importlinter.cli import lint_imports_command as lint; lint()"


def test_import_contracts_are_kept() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(abliterate.__file__).parents[1])}
    res = subprocess.run(
        [sys.executable, "-c", LINT, "--no-cache", "--no-logo"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


def test_every_flat_module_name_is_known() -> None:
    """A module added at the top level by mistake (not in a subpackage) fails here, unless it is one of the few that
    belong there."""
    top = {p.stem for p in Path(abliterate.__file__).parent.glob("*.py")}
    assert top == {"__init__", "errors", "version"}
