"""CI fails on a skipped test: a skip in CI is a test that does not exist.

``python3 .ci/skips.py JUNIT_XML`` reads the report of ``pytest --junitxml``, lists every skipped test with its
reason, and exits 1 when any of them is not allowed below. ALLOWED is the one place where a test may skip in CI:
a shell-style pattern of test ids (``tests.test_file.test_name[param]``; a module-level skip is the module,
``tests.test_file``) and why skipping it there is right. Expected failures (xfail) ran and are not skips.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from fnmatch import fnmatchcase
from pathlib import Path

ALLOWED: dict[str, str] = {
    "tests.test_saving*": "the liveness probe of a writing process is POSIX only (skips on a Windows runner)",
}


def skipped(junit: Path) -> list[tuple[str, str]]:
    """(test id, reason) of every skipped test in a JUnit XML report."""
    found = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        for skip in case.findall("skipped"):
            if skip.get("type") == "pytest.xfail":
                continue
            classname, name = case.get("classname", ""), case.get("name", "")
            test = f"{classname}.{name}" if classname else name
            found.append((test, (skip.get("message") or skip.text or "no reason given").strip()))
    return found


def allowed(test: str) -> str | None:
    """Why ``test`` may skip in CI, or None."""
    return next((why for pattern, why in ALLOWED.items() if fnmatchcase(test, pattern)), None)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_file():
        print("usage: python3 .ci/skips.py JUNIT_XML (the report of pytest --junitxml)", file=sys.stderr)
        return 2
    skips = skipped(Path(argv[0]))
    bad = [(test, why) for test, why in skips if allowed(test) is None]
    print(f"skipped tests: {len(skips)} ({len(bad)} not allowed)")
    for test, why in skips:
        ok = allowed(test)
        print(f"  {test}: {why}" + (f" [allowed: {ok}]" if ok else " [NOT ALLOWED]"))
    if bad:
        print(
            f"FAIL: {len(bad)} test(s) skipped in CI: install what they need (.ci/run), or allow them with a reason "
            "in .ci/skips.py ALLOWED"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
