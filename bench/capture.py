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
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

TL_NAME = "Qwen/Qwen2.5-0.5B-Instruct"
TL_VERSION = "3.9.0"
TIMED = ("plain", "plain_shared", "capture", "capture_noshare", "tl_filtered", "tl_full")
MEMORY = ("plain", "capture", "tl_filtered", "tl_full")
ONCE = ("hidden_states",)
TL_VARIANTS = ("tl_filtered", "tl_full")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
MARK = "@@bench "

Runner = Callable[[list[str], list[str]], Any]


# --------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        m = re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M)
    return int(m.group(1)) if m else 0


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


class PeakRSS:
    """Peak RSS (MB) inside a ``with`` block: the kernel high-water mark reset on entry, or polling."""

    def __init__(self) -> None:
        self.peak = 0.0
        self.method = "VmHWM"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
            if _status_kb("VmHWM") > _status_kb("VmRSS") * 1.01 + 1024:
                raise OSError("VmHWM was not reset")
        except OSError:
            self.method = "polling (5 ms)"
            self.peak = rss_mb()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            self.peak = _status_kb("VmHWM") / 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_mb())


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:9]]
    return (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")


def process_max_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------- prompts and batching


def load_prompts(data_dir: Path, n: int) -> tuple[list[str], list[str]]:
    sets = []
    for kind in ("harmful", "harmless"):
        with open(data_dir / f"{kind}.jsonl") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        train = [r["prompt"] for r in rows if r.get("split") == "train"]
        if len(train) < n:
            raise SystemExit(f"{kind}.jsonl has only {len(train)} train prompts; use --n {len(train)} or less")
        sets.append(train[:n])
    return sets[0], sets[1]


def chat_format(tokenizer: Any, prompts: Sequence[str]) -> list[str]:
    """What ``LoadedModel.format`` does (no system prompt)."""
    messages = [[{"role": "user", "content": p}] for p in prompts]
    return [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]


def length_order(tokenizer: Any, texts: list[str]) -> list[int]:
    """The order in which ``abliterate.measure.capture`` batches one prompt set: by token count, stable."""
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return sorted(range(len(texts)), key=lengths.__getitem__)


def sorted_batches(tokenizer: Any, texts: list[str], batch_size: int) -> list[list[str]]:
    order = length_order(tokenizer, texts)
    return [[texts[r] for r in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]


def chunks(tokenizer: Any, harmful: list[str], harmless: list[str], bs: int) -> list[tuple[list[str], list[str]]]:
    """Both sets cut at batch boundaries: chunk ``i`` holds batch ``i`` of each set. Running a
    variant on every chunk forms exactly the batches of one full pass (re-sorting a sorted chunk
    keeps its order)."""
    per_set = []
    for prompts in (harmful, harmless):
        order = length_order(tokenizer, chat_format(tokenizer, prompts))
        per_set.append([[prompts[r] for r in order[s : s + bs]] for s in range(0, len(order), bs)])
    return list(zip(*per_set, strict=True))


def encode(tokenizer: Any, texts: list[str]) -> dict[str, Any]:
    """What ``LoadedModel.encode`` does (left padding, no special tokens added)."""
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}


# --------------------------------------------------------------------------- the variants


def abliterate_runners(model_path: str, bs: int) -> tuple[dict[str, Runner], Any, Callable, dict]:
    """Each runner takes (harmful, harmless) and returns means [set, point, hidden] (``None`` for plain)."""
    import inspect

    import torch

    from abliterate import capture, load_model

    try:
        from abliterate.measure.batching import BatchRunner  # capture's batching with the shared chat-template prefix
    except ImportError:  # a version without prefix sharing: plain already is capture's batching
        BatchRunner = None  # noqa: N806
    lm = load_model(model_path)
    model, tok = lm.model, lm.tokenizer
    model.config.tie_last_hidden_states = False  # hidden_states[-1] = last layer's output, before the norm

    def capturer(**options: Any) -> Runner:
        def run(harmful: list[str], harmless: list[str]) -> Any:
            acts = capture(lm, harmful, harmless, positions=[-1], batch_size=bs, **options)
            return torch.stack([acts.harmful_mean[:, 0], acts.harmless_mean[:, 0]])

        return run

    def plain_shared(harmful: list[str], harmless: list[str]) -> None:
        """The forward passes capture makes (prefix KV cache filled once, then the batches), no hooks."""
        with torch.inference_mode():
            for prompts in (harmful, harmless):
                runner = BatchRunner(lm, lm.format(prompts), bs)
                runner.prefill()
                for _ in runner:
                    pass

    def forward(record: bool) -> Runner:
        def run(harmful: list[str], harmless: list[str]) -> Any:
            means = []
            with torch.inference_mode():
                for prompts in (harmful, harmless):
                    total = torch.zeros(lm.num_layers + 1, lm.hidden_size, dtype=torch.float64)
                    for texts in sorted_batches(tok, lm.format(prompts), bs):
                        batch = lm.encode(texts)
                        if not record:
                            model(**batch, use_cache=False, logits_to_keep=1)
                            continue
                        out = model(**batch, use_cache=False, logits_to_keep=1, output_hidden_states=True)
                        assert len(out.hidden_states) == lm.num_layers + 1
                        total += torch.stack([h[:, -1] for h in out.hidden_states], 1).double().sum(0)
                        del out
                    means.append(total / len(prompts))
            return torch.stack(means) if record else None

        return run

    @torch.inference_mode()
    def touch() -> None:  # one tiny forward: pages in the lazily mmapped safetensors weights
        model(**lm.encode(lm.format(["Hi"])), use_cache=False, logits_to_keep=1)

    runners = {"plain": forward(False), "capture": capturer(), "hidden_states": forward(True)}
    if BatchRunner is not None:
        runners["plain_shared"] = plain_shared
    if "share_prefix" in inspect.signature(capture).parameters:
        runners["capture_noshare"] = capturer(share_prefix=False)
    return runners, tok, touch, {"torch_threads": torch.get_num_threads()}


def tl_runners(model_path: str, bs: int) -> tuple[dict[str, Runner], Any, Callable, dict]:
    from importlib.metadata import version

    import torch
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    # A GGUF-converted checkpoint still carries quantization_config (gguf) although its weights are
    # dense fp32; HookedTransformer refuses any quantized model, so drop the stale marker.
    hf.hf_quantizer = None
    if getattr(hf.config, "quantization_config", None) is not None:
        del hf.config.quantization_config
    model = HookedTransformer.from_pretrained_no_processing(
        TL_NAME, hf_model=hf, tokenizer=tok, device="cpu", dtype=torch.float32, default_padding_side="left"
    )
    del hf  # as HookedTransformer.from_pretrained(name) would: only the TransformerLens copy stays
    gc.collect()
    n_layers = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]

    def runner(filtered: bool) -> Runner:
        def run(harmful: list[str], harmless: list[str]) -> Any:
            means = []
            with torch.inference_mode():
                for prompts in (harmful, harmless):
                    total = torch.zeros(len(names), model.cfg.d_model, dtype=torch.float64)
                    for texts in sorted_batches(tok, chat_format(tok, prompts), bs):
                        batch = encode(tok, texts)
                        ids, mask = batch["input_ids"], batch["attention_mask"]
                        if filtered:
                            out = model.run_with_cache(ids, attention_mask=mask, names_filter=names, return_type=None)
                        else:
                            out = model.run_with_cache(ids, attention_mask=mask)
                        cache = out[1]
                        total += torch.stack([cache[n][:, -1] for n in names], 1).double().sum(0)
                        del out, cache
                    means.append(total / len(prompts))
            return torch.stack(means)

        return run

    @torch.inference_mode()
    def touch() -> None:
        model(encode(tok, chat_format(tok, ["Hi"]))["input_ids"], return_type=None)

    info = {"torch_threads": torch.get_num_threads(), "transformer_lens": version("transformer_lens")}
    return {"tl_filtered": runner(True), "tl_full": runner(False)}, tok, touch, info


def load_runners(kind: str, args: argparse.Namespace) -> tuple[dict[str, Runner], Any, Callable, dict]:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return (tl_runners if kind == "tl" else abliterate_runners)(args.model, args.batch_size)


def kind_of(variant: str) -> str:
    return "tl" if variant in TL_VARIANTS else "abliterate"


# --------------------------------------------------------------------------- workers (subprocesses)


def memory_worker(args: argparse.Namespace) -> None:
    """Phase 1: one full pass of one variant in this fresh process; writes a JSON result."""
    t0 = time.perf_counter()
    runners, _, touch, info = load_runners(kind_of(args.variant), args)
    run = runners[args.variant]
    touch()  # weights resident; no warm-up of the variant itself, whose leftovers would raise the baseline
    load_s = time.perf_counter() - t0
    harmful, harmless = load_prompts(Path(args.data_dir), args.n)
    gc.collect()
    baseline = rss_mb()
    with PeakRSS() as peak:
        t = time.perf_counter()
        run(harmful, harmless)
        seconds = time.perf_counter() - t
    info.update(
        variant=args.variant,
        seconds=seconds,
        load_s=load_s,
        baseline_mb=baseline,
        peak_mb=peak.peak,
        extra_mb=peak.peak - baseline,
        peak_method=peak.method,
        process_max_mb=process_max_mb(),
    )
    Path(args.out).write_text(json.dumps(info))


def serve(args: argparse.Namespace) -> None:
    """Phase 2: load once, then run (variant, chunk) requests from stdin; replies go to the original
    stdout (library prints are sent to stderr). Means of each variant are summed over chunks and
    written to ``--out`` on exit."""
    import torch

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(obj: dict) -> None:
        proto.write(MARK + json.dumps(obj) + "\n")

    runners, tok, _, info = load_runners(args.serve, args)
    harmful, harmless = load_prompts(Path(args.data_dir), args.n)
    parts = chunks(tok, harmful, harmless, args.batch_size)
    for run in runners.values():
        run(harmful[:2], harmless[:2])  # warm-up
    reply({"ready": True, "chunks": len(parts), "variants": list(runners), **info})
    sums: dict[str, Any] = {}
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        h, b = parts[req["chunk"]]
        busy, own, t = busy_cpu_s(), time.process_time(), time.perf_counter()
        means = runners[req["variant"]](h, b)
        seconds = time.perf_counter() - t
        others = busy_cpu_s() - busy - (time.process_time() - own)  # CPU time other processes took meanwhile
        if req.get("keep") and means is not None:
            weights = torch.tensor([len(h), len(b)], dtype=torch.float64)[:, None, None]
            sums[req["variant"]] = sums.get(req["variant"], 0) + means.double() * weights
        reply({"seconds": seconds, "others_cores": max(others, 0.0) / seconds})
    torch.save({v: s / len(harmful) for v, s in sums.items()}, args.out)  # both sets have n prompts
    reply({"done": True})


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


def default_model() -> str:
    try:
        from abliterate.lm.demo import demo_model_path
    except ImportError:
        raise SystemExit("abliterate.lm.demo.demo_model_path is not available; pass --model PATH") from None
    return str(demo_model_path())


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
    p.add_argument("--model", help="model directory (default: abliterate.lm.demo.demo_model_path())")
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

    args.model = str(Path(args.model).resolve()) if args.model else default_model()
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
