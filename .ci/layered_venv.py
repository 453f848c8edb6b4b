"""Create a virtual environment layered over the packages of the interpreter that runs this script.

``python -m venv --system-site-packages`` layers over the *base* interpreter's packages, so run from inside an
activated venv (or a conda env built on another Python) it loses everything installed there — torch included.
This venv instead adds every site directory of the running interpreter after its own, with ``site.addsitedir``
(so their ``.pth`` files, editable installs among them, still work): what gets installed into the new venv
shadows the layer beneath, everything else comes from it.

    python3 .ci/layered_venv.py DEST [--without-pip]
"""

from __future__ import annotations

import site
import subprocess
import sys
import sysconfig
from pathlib import Path


def site_dirs() -> list[str]:
    """The running interpreter's site directories, in its own order, without duplicates."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    dirs += [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    seen: dict[str, None] = {}
    for d in dirs:
        if Path(d).is_dir():
            seen.setdefault(str(Path(d).resolve()), None)
    return list(seen)


def create(dest: Path, with_pip: bool = True) -> Path:
    args = [sys.executable, "-m", "venv", str(dest)]
    if not with_pip:
        args.append("--without-pip")
    subprocess.run(args, check=True)
    python = dest / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in site_dirs())
    (Path(purelib) / "_layered_over_parent.pth").write_text(lines)
    return python


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] != "--without-pip"):
        sys.exit("usage: python3 .ci/layered_venv.py DEST [--without-pip]")
    print(create(Path(sys.argv[1]), with_pip=len(sys.argv) == 2))
