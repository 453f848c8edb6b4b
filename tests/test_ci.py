"""`.ci/oldest` builds its old-transformers venv over the packages of whichever python3 runs it.

A user's activated venv (or conda env) is not the base interpreter: ``venv --system-site-packages`` would layer over
the base and lose torch and everything else installed in the venv. These tests build such an outer venv, with a
marker module standing in for its packages, and run the layering from inside it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERED = ROOT / ".ci" / "layered_venv.py"


def _python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def _purelib(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def _venv(dest: Path, *extra: str, python: str | Path = sys.executable) -> Path:
    subprocess.run([str(python), "-m", "venv", "--without-pip", *extra, str(dest)], check=True)
    return _python(dest)


def _layer(outer_python: Path | str, dest: Path) -> Path:
    out = subprocess.run(
        [str(outer_python), str(LAYERED), str(dest), "--without-pip"], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip())


def _where(python: Path, module: str) -> str:
    res = subprocess.run(
        [str(python), "-c", f"import {module}; print({module}.WHERE)"], capture_output=True, text=True, check=False
    )
    return res.stdout.strip() if res.returncode == 0 else "missing"


@pytest.fixture
def outer(tmp_path: Path) -> Path:
    """An 'activated' venv of the user's: not layered over anything, with one package only it has."""
    python = _venv(tmp_path / "outer")
    (_purelib(python) / "ci_marker_pkg.py").write_text("WHERE = 'outer'\n")
    return python


def test_layered_venv_sees_the_outer_venvs_packages(outer: Path, tmp_path: Path) -> None:
    inner = _layer(outer, tmp_path / "inner")
    assert _where(inner, "ci_marker_pkg") == "outer"


def test_system_site_packages_from_a_venv_loses_them(outer: Path, tmp_path: Path) -> None:
    """The failure the layering fixes: --system-site-packages, run from the outer venv, sees the base only."""
    inner = _venv(tmp_path / "inner", "--system-site-packages", python=outer)
    assert _where(inner, "ci_marker_pkg") == "missing"


def test_what_the_layered_venv_installs_shadows_the_layer_beneath(outer: Path, tmp_path: Path) -> None:
    inner = _layer(outer, tmp_path / "inner")
    (_purelib(inner) / "ci_marker_pkg.py").write_text("WHERE = 'inner'\n")
    assert _where(inner, "ci_marker_pkg") == "inner"
    assert _where(outer, "ci_marker_pkg") == "outer"


def test_layered_over_this_interpreter_has_torch_and_abliterate(tmp_path: Path) -> None:
    inner = _layer(sys.executable, tmp_path / "inner")
    res = subprocess.run(
        [str(inner), "-c", "import torch, transformers; print(torch.__version__)"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr


def test_ci_oldest_uses_the_layered_venv() -> None:
    script = (ROOT / ".ci" / "oldest").read_text()
    assert ".ci/layered_venv.py" in script
    commands = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    assert not any("--system-site-packages" in line for line in commands)
