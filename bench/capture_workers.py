"""The workers of bench/capture.py: the variants it times (abliterate's capture, plain forward passes,
TransformerLens), the memory phase's one-pass worker and the timing phase's long-lived server, with the prompts,
batching and RSS helpers they share. Imports only the standard library at the top: the TransformerLens worker runs
in its own venv, which has no abliterate.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _common import set_threads

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
    set_threads(args.threads)
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
