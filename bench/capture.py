"""Benchmark residual-stream capture: abliterate's hooks vs a plain forward pass vs TransformerLens.

    python bench/capture.py [--model PATH] [--n 32] [--batch-size 16] [--reps 3] [--tl-venv DIR] [--threads N]

All variants see the same prompts (the first N train prompts of each bundled set), the same chat
template, tokenization, batch size and per-set length-sorted batching as ``abliterate.measure.capture``:

* ``plain``           ``model(**lm.encode(texts), use_cache=False, logits_to_keep=1)``, nothing recorded
* ``plain_shared``    the forward passes ``capture`` itself makes, without hooks: the chat-template
                      prefix shared by all prompts is run once into a KV cache
                      (``abliterate.measure.batching.BatchRunner``) and each batch runs only its own tokens
* ``capture``         ``abliterate.measure.capture(lm, harmful, harmless, positions=[-1])``
* ``capture_noshare`` the same with ``share_prefix=False``: exactly the batches of ``plain``
* ``hidden_states``   ``output_hidden_states=True`` with ``config.tie_last_hidden_states=False``, a
                      hook-free cross-check of the means (timed in the first round only)
* ``tl_filtered``     TransformerLens ``run_with_cache(tokens, attention_mask=..., names_filter=<the
                      25 residual hooks>, return_type=None)``: the same points, no unembedding
* ``tl_full``         TransformerLens default ``run_with_cache(tokens, attention_mask=...)``: full
                      logits and every hook cached, as most TransformerLens code does

capture/plain is the whole saving a user sees; capture/plain_shared and capture_noshare/plain are
the cost of the hooks alone. TransformerLens has no prefix sharing, so tl_*/capture_noshare
compares the two hook implementations on identical batches.

Two phases, so that timings and memory peaks never contaminate each other:

1. Memory: plain, capture and the two TransformerLens variants run once each in a fresh
   subprocess: load, one one-token-prompt forward (the
   safetensors weights are mmapped lazily; this pages them in), baseline RSS, one full pass. Peak
   RSS of the pass is the kernel high-water mark reset just before it (VmHWM after writing 5 to
   /proc/self/clear_refs), else a 5 ms polling thread; "process max" is ru_maxrss, which also
   counts loading (TransformerLens briefly holds the HF model and its own copy).
2. Time: one long-lived worker per environment (abliterate; TransformerLens), both loaded and
   warmed up. The passes are split at batch boundaries into chunks (one batch of each set, exactly
   the batches a full pass forms) and the variants take turns chunk by chunk, in the orders of a
   Williams design (balanced for position and for which variant ran just before), so the noise of
   a shared machine falls on all of them alike. A repetition is one full pass of every variant
   (after a warm-up on 2+2 prompts); the table gives medians over repetitions, and the ratios are
   medians of the per-repetition (paired) ratios.

TransformerLens lives only in its own venv (``--tl-venv``, created on first use, pinned to this
interpreter's torch and transformers). ``HookedTransformer`` was removed in TransformerLens 4.0, so
the venv pins the last 3.x release. TransformerLens loads models only by an official name, whose
config it fetches from the hub; offline, its worker runs in a scratch directory holding
``Qwen/Qwen2.5-0.5B-Instruct -> <model dir>``, which TransformerLens's config loader reads as a
local directory (the demo model, Qwen2.5-Coder-0.5B-Instruct, has that architecture; the shapes come
from its own config.json). The weights come from the HF model (``hf_model=``), loaded with
``from_pretrained_no_processing`` so that activations are comparable.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from _common import MODEL_HELP, model_path
from capture_workers import (
    MARK,
    MEMORY,
    OFFLINE_ENV,
    ONCE,
    TIMED,
    TL_NAME,
    TL_VARIANTS,
    TL_VERSION,
    kind_of,
    memory_worker,
    serve,
)


class Server:
    """Driver side of :func:`serve`."""

    def __init__(self, cmd: list[str], cwd: Path, log: Path, out: Path) -> None:
        self.log, self.out = log, out
        self._log_fh: IO[str] = open(log, "w")  # noqa: SIM115 -- closed in close()
        env = {**os.environ, **OFFLINE_ENV}
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_fh, text=True
        )
        self.hello = self._read()

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        self.proc.wait()
        raise RuntimeError(last_error(self.log.read_text()))

    def _send(self, request: dict) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def call(self, variant: str, chunk: int, keep: bool) -> dict:
        return self._send({"op": "run", "variant": variant, "chunk": chunk, "keep": keep})

    def close(self) -> Any:
        import torch

        means = None
        if self.proc.poll() is None:
            self._send({"op": "quit"})
            self.proc.wait()
            means = torch.load(self.out)
        self._log_fh.close()
        return means


def last_error(log: str) -> str:
    lines = log.strip().splitlines()
    errors = [ln for ln in lines if re.match(r"^(\w+\.)*\w*(Error|Exception)\b", ln)]
    return (errors or lines or ["no output"])[-1]


# --------------------------------------------------------------------------- the TransformerLens venv


def ensure_tl_venv(venv: Path, version: str) -> Path:
    """A plain venv (no system site-packages) with TransformerLens and this interpreter's torch/transformers."""
    import torch
    import transformers

    py = venv / "bin" / "python"
    probe = "import transformer_lens, importlib.metadata as m; print(m.version('transformer_lens'))"
    if py.exists():
        res = subprocess.run([str(py), "-c", probe], capture_output=True, text=True)
        if res.returncode == 0 and res.stdout.strip() == version:
            return py
    print(f"setting up {venv} (transformer_lens=={version}); this runs once", flush=True)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pins = venv / "bench-constraints.txt"
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"  # never let pip pick another (CUDA) torch
    pins.write_text(f"{torch_pin}\ntransformers=={transformers.__version__}\n")
    pip = [str(py), "-m", "pip", "install", "-q", "-c", str(pins)]
    subprocess.run([*pip, torch_pin], check=True)
    subprocess.run([*pip, f"transformer_lens=={version}"], check=True)
    return py


# --------------------------------------------------------------------------- driver


def worker_cmd(python: str, args: argparse.Namespace, *extra: str) -> list[str]:
    cmd = [python, str(Path(__file__).resolve()), "--model", args.model, "--n", str(args.n)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    return cmd + ["--batch-size", str(args.batch_size), "--data-dir", str(args.data_dir), *extra]


def williams(n: int) -> list[list[int]]:
    """Orders of n variants in which each takes every position equally often and each variant
    directly follows every other one equally often (a Williams design), so that neither the
    position in a round nor the variant run just before favours anyone."""
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = [[(x + i) % n for x in first] for i in range(n)]
    return rows + [r[::-1] for r in rows] if n % 2 else rows


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def med(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--n", type=int, default=32, help="prompts per set: the first N train prompts (default 32)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per variant (default 3)")
    p.add_argument("--tl-venv", default="/tmp/tl-venv", help="venv for TransformerLens (created when missing)")
    p.add_argument("--tl-version", default=TL_VERSION, help=f"transformer_lens version (default {TL_VERSION})")
    p.add_argument("--no-tl", action="store_true", help="skip the TransformerLens variants")
    p.add_argument("--threads", type=int, help="torch threads in every worker (default: torch's default)")
    p.add_argument("--json", help="also write all raw results to this file")
    for hidden in ("--variant", "--serve", "--data-dir", "--out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:
        return memory_worker(args)
    if args.serve:
        return serve(args)
    if args.n < 2 or args.n % args.batch_size == 1:
        p.error("--n must be at least 2 and leave no batch of a single prompt (capture needs 2 per set)")

    import torch
    import transformers

    import abliterate

    args.model = str(Path(args.model).resolve()) if args.model else model_path(None)
    args.data_dir = str(Path(abliterate.__file__).parent / "data")
    started = time.perf_counter()
    tl_python = None if args.no_tl else str(ensure_tl_venv(Path(args.tl_venv), args.tl_version))
    pythons = {"abliterate": sys.executable, "tl": tl_python}

    print(f"date      {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"machine   {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}")
    print(f"software  python {platform.python_version()}, torch {torch.__version__}, ", end="")
    print(f"transformers {transformers.__version__}, abliterate {abliterate.__version__}", end="")
    print(f", transformer_lens {args.tl_version} (venv {args.tl_venv})" if tl_python else "")
    print(f"model     {args.model}")
    print(f"prompts   {args.n} harmful + {args.n} harmless (train split), batch size {args.batch_size}", end="")
    print(f", reps {args.reps}, torch threads {args.threads or torch.get_num_threads()}")

    variants = [v for v in TIMED if tl_python or v not in TL_VARIANTS]
    memory: dict[str, dict] = {}
    times: dict[str, list[float]] = {v: [] for v in [*TIMED, *ONCE]}
    errors: dict[str, str] = {}
    means: dict[str, Any] = {}
    calls: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp:
        scratch = Path(tmp)
        cwd = {"abliterate": Path.cwd(), "tl": scratch / "tl"}
        (cwd["tl"] / TL_NAME).parent.mkdir(parents=True)
        (cwd["tl"] / TL_NAME).symlink_to(args.model, target_is_directory=True)
        env = {**os.environ, **OFFLINE_ENV}

        print("\nphase 1: memory (one fresh process per variant)", flush=True)
        for v in [v for v in MEMORY if v in variants]:
            kind, out = kind_of(v), scratch / f"mem-{v}.json"
            cmd = worker_cmd(pythons[kind], args, "--variant", v, "--out", str(out))
            res = subprocess.run(cmd, cwd=cwd[kind], env=env, capture_output=True, text=True)
            if res.returncode != 0 or not out.exists():
                errors[v] = last_error(res.stderr or res.stdout)
                print(f"  {v:<14} FAILED: {errors[v]}", flush=True)
                continue
            r = memory[v] = json.loads(out.read_text())
            print(
                f"  {v:<14} peak {r['peak_mb']:6.0f} MB = baseline {r['baseline_mb']:6.0f} + {r['extra_mb']:5.0f}"
                f"  (process max {r['process_max_mb']:.0f} MB; cold pass {r['seconds']:.1f} s)",
                flush=True,
            )

        print("\nphase 2: time (long-lived workers, variants interleaved chunk by chunk)", flush=True)
        servers: dict[str, Server] = {}
        for kind in dict.fromkeys(kind_of(v) for v in variants):
            out = scratch / f"means-{kind}.pt"
            cmd = worker_cmd(pythons[kind], args, "--serve", kind, "--out", str(out))
            try:
                servers[kind] = Server(cmd, cwd[kind], scratch / f"{kind}.log", out)
            except RuntimeError as exc:
                for v in variants:
                    if kind_of(v) == kind:
                        errors.setdefault(v, str(exc))
                print(f"  {kind} worker FAILED: {exc}", flush=True)
        available = {v for s in servers.values() for v in s.hello["variants"]}
        live = [v for v in variants if v in available]
        n_chunks = next(iter(servers.values())).hello["chunks"] if servers else 0
        schedule = williams(len(live)) if live else []
        for rep in range(args.reps):
            totals = dict.fromkeys([*live, *(ONCE if rep == 0 else ())], 0.0)
            for c in range(n_chunks):
                order = [live[i] for i in schedule[(rep * n_chunks + c) % len(schedule)]]
                if rep == 0:
                    order += list(ONCE)
                for pos, v in enumerate(order):
                    r = servers[kind_of(v)].call(v, c, keep=rep == 0)
                    totals[v] += r["seconds"]
                    calls.append({"rep": rep, "chunk": c, "position": pos, "variant": v, **r})
            for v, s in totals.items():
                times[v].append(s)
            line = "  ".join(f"{v} {s:.1f}" for v, s in totals.items())
            print(f"  rep {rep + 1}: {line} s", flush=True)
        for s in servers.values():
            means.update(s.close() or {})

    checks = []
    if "capture" in means:
        ref = means["capture"]
        for other in ("capture_noshare", "hidden_states", "tl_filtered", "tl_full"):
            if other in means:
                diff = (ref - means[other]).abs().max().item()
                checks.append((other, diff, diff / ref.abs().max().item()))

    def ratio(a: str, b: str) -> float | None:
        """Median over repetitions of the paired ratio a/b."""
        return med([x / y for x, y in zip(times[a], times[b], strict=False)]) if times[a] and times[b] else None

    def best(v: str) -> float | None:
        """Sum over chunks of the fastest time of each chunk: the pass with the least interference."""
        fastest: dict[int, float] = {}
        for c in calls:
            if c["variant"] == v:
                fastest[c["chunk"]] = min(fastest.get(c["chunk"], float("inf")), c["seconds"])
        return sum(fastest.values()) if fastest else None

    def others(v: str) -> float | None:
        loads = [c["others_cores"] for c in calls if c["variant"] == v]
        return sum(loads) / len(loads) if loads else None

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    cols = ["variant", "median s", "best s", "median × plain", "best × plain", "others' CPU (cores)"]
    cols += ["baseline RSS MB", "peak RSS MB", "peak − baseline MB", "process max RSS MB"]
    print("\n| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for v in [v for v in [*TIMED, *ONCE] if times[v]]:
        m = memory.get(v, {})
        cells = [fmt(med(times.get(v) or []), ".2f"), fmt(best(v), ".2f"), fmt(ratio(v, "plain"), ".3f")]
        cells += [fmt(div(best(v), best("plain")), ".3f"), fmt(others(v), ".2f")]
        cells += [fmt(m.get(k), ".0f") for k in ("baseline_mb", "peak_mb", "extra_mb", "process_max_mb")]
        print(f"| {v} | " + " | ".join(cells) + " |")
    print(
        f"\nmedian: of {args.reps} interleaved passes (hidden_states: 1 pass); best: sum over chunks of each chunk's"
        " fastest run;\nmedian × plain: median of per-pass paired ratios; others' CPU: mean CPU use of other"
        " processes during the variant's runs"
    )
    for v, e in errors.items():
        print(f"{v} failed: {e}")

    def show(label: str, median_ratio: float | None, best_ratio: float | None, target: str) -> None:
        if median_ratio is not None:
            print(f"{label:<36} median {median_ratio:6.3f}   best {fmt(best_ratio, '6.3f')}   (target {target})")

    def pair(a: str, b: str, target: str) -> None:
        if times[a] and times[b]:
            show(f"time {a} / {b}", ratio(a, b), div(best(a), best(b)), target)

    pair("capture", "plain", "<= 1.05")
    pair("capture", "plain_shared", "<= 1.05")
    pair("capture_noshare", "plain", "<= 1.05")
    for tl in TL_VARIANTS:
        pair(tl, "capture", ">= 3")
        pair(tl, "capture_noshare", ">= 3")
    cap = memory.get("capture")
    for tl in TL_VARIANTS:
        if cap and tl in memory:
            tm = memory[tl]
            print(f"peak RSS capture / {tl:<12} {cap['peak_mb'] / tm['peak_mb']:.2f} (target <= 0.5); ", end="")
            print(f"over baseline: {cap['extra_mb']:.0f} MB vs {tm['extra_mb']:.0f} MB")
    for other, diff, rel in checks:
        print(f"max |capture - {other}| (both sets, 25 points): {diff:.3g}  (relative to max |x|: {rel:.2g})")
    methods = sorted({m["peak_method"] for m in memory.values()})
    print(f"peak RSS via {', '.join(methods)}; total wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        raw = {"args": vars(args), "memory": memory, "times": times, "calls": calls, "errors": errors}
        raw["checks"] = checks
        Path(args.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
