"""Atomic output directories: temporary siblings of a killed run are swept by the next write."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from abliterate.lm import saving

pytestmark = pytest.mark.skipif(os.name != "posix", reason="liveness probe is POSIX only")


def killed_run(target: Path) -> Path:
    """Run atomic_directory in a child that dies with SIGKILL mid-write; returns the temp dir it leaves."""
    code = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from abliterate.lm.saving import atomic_directory
        with atomic_directory(Path({str(target)!r})) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], check=False)
    assert res.returncode == -9
    (left,) = target.parent.glob(f".{target.name}.tmp-*")
    assert (left / "half.bin").exists() and not target.exists()
    return left


def test_next_write_sweeps_a_killed_runs_temp_dir(tmp_path):
    target = tmp_path / "out"
    left = killed_run(target)
    with saving.atomic_directory(target) as tmp:
        (tmp / "ok").write_text("done")
    assert not left.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (target / "ok").read_text() == "done"


def test_live_foreign_and_backup_siblings_are_kept(tmp_path):
    target = tmp_path / "out"
    host = saving._owner().split(".")[0]
    keep = [
        tmp_path / f".out.tmp-{host}.{os.getppid()}-aaaaaaaa",  # a live process on this host
        tmp_path / ".out.tmp-otherhost.1-bbbbbbbb",  # another host sharing the file system
        tmp_path / ".out.tmp-cccccccc",  # no owner in the name
        tmp_path / f".out.old-{host}.999999999-dddddddd",  # a backup of a replaced output: maybe the only copy
        tmp_path / f".other.tmp-{host}.999999999-eeeeeeee",  # another output's temp dir
    ]
    for path in keep:
        path.mkdir()
    with saving.atomic_directory(target) as tmp:
        assert tmp.name.startswith(f".out.tmp-{host}.{os.getpid()}-")
    assert all(path.exists() for path in keep)
    assert target.is_dir()
