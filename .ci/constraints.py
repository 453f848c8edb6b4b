"""Write constraints.txt: the exact installed version of every package abliterate[dev,bench] pulls in.

Run after a green `.ci/run`; `pip install -c constraints.txt -e '.[dev,bench]'` then reproduces that environment.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement


def closure(root: str, extras: set[str]) -> dict[str, str]:
    seen: dict[str, str] = {}
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[key] = dist.version.split("+")[0]  # a local tag (2.13.0+cpu) would pin one wheel index
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (wanted or {""})):
                todo.append((req.name, set(req.extras)))
    return seen


if __name__ == "__main__":
    pins = closure("abliterate", {"dev", "bench"})
    pins.pop("abliterate", None)
    head = f"# exact versions of the last green CI run (python {sys.version.split()[0]}); see README 'Tests'\n"
    body = "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))
    Path("constraints.txt").write_text(head + body)
    print(f"wrote constraints.txt ({len(pins)} packages)")
