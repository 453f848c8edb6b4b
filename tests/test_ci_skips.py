"""`.ci/skips.py` fails CI on a skipped test it does not allow, listing every skip with its reason; `.ci/run`
installs chromium (the browser test's need) and runs the check after the main test run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIPS = ROOT / ".ci" / "skips.py"

SAMPLE = """
import os, sys
import pytest

def test_runs():
    assert True

@pytest.mark.skipif(True, reason="no frobnicator on PATH")
def test_needs_a_tool():
    pass

@pytest.mark.parametrize("x", [1, 2])
def test_param(x):
    if x == 2:
        pytest.skip("two is not supported here")

@pytest.mark.xfail(reason="known bug", strict=True)
def test_known_bug():
    assert False
"""


def _junit(tmp_path: Path, source: str, name: str = "test_sample.py") -> Path:
    """Run pytest (one process, no plugins of this project) on ``source`` and return its JUnit XML."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / name).write_text(source)
    junit = tmp_path / "junit.xml"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", f"--junitxml={junit}", name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    return junit


def _check(junit: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SKIPS), str(junit)], capture_output=True, text=True, check=False)


def test_every_skip_is_listed_with_its_reason_and_fails_ci(tmp_path):
    res = _check(_junit(tmp_path, SAMPLE))
    assert res.returncode == 1, res.stdout
    lines = res.stdout.splitlines()
    assert lines[0] == "skipped tests: 2 (2 not allowed)"
    assert "  test_sample.test_needs_a_tool: no frobnicator on PATH [NOT ALLOWED]" in lines
    assert "  test_sample.test_param[2]: two is not supported here [NOT ALLOWED]" in lines
    assert "known bug" not in res.stdout, "an xfail ran: it is not a skip"
    assert lines[-1].startswith("FAIL: 2 test(s) skipped in CI")


def test_no_skip_passes(tmp_path):
    res = _check(_junit(tmp_path, "def test_a():\n    assert True\n"))
    assert res.returncode == 0 and res.stdout == "skipped tests: 0 (0 not allowed)\n"


def test_an_allowed_skip_passes_with_its_reason(tmp_path):
    """ALLOWED's entry for the POSIX-only test: a module skipped as a whole is allowed, and says why."""
    source = "import pytest\npytestmark = pytest.mark.skipif(True, reason='liveness probe is POSIX only')\n"
    source += "def test_probe():\n    pass\n"
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "__init__.py").write_text("")
    junit = _junit(tmp_path, source, "tests/test_saving.py")
    res = _check(junit)
    assert res.returncode == 0, res.stdout
    assert "  tests.test_saving.test_probe: liveness probe is POSIX only [allowed: the liveness probe" in res.stdout


def test_bad_usage_is_one_line_and_exit_2(tmp_path):
    res = _check(tmp_path / "missing.xml")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "pytest --junitxml" in res.stderr


def test_ci_run_installs_chromium_and_checks_the_skips():
    """The order matters: chromium before the tests, the skip check on the main run's report (not on .ci/oldest,
    which runs a subset on purpose)."""
    run = (ROOT / ".ci" / "run").read_text()
    install = run.index("apt-get install -y -qq chromium")
    tests = run.index('python3 -m pytest -q -ra --junitxml="$junit"')
    assert install < tests < run.index('python3 .ci/skips.py "$junit"') < run.index("bash .ci/oldest")
    assert 'if [ "$(id -u)" = 0 ] && command -v apt-get' in run and "cannot be here" in run
