"""Benchmark the streaming weight edit: peak memory and throughput on a multi-GB sharded checkpoint.

    python bench/stream.py [--size-gb 2.2] [--shard-mb 400] [--dtype bf16] [--reps 3] [--write BENCHMARKS.md]

Builds a random-weight Llama checkpoint (hidden 2048, intermediate 5632, GQA 16/4 heads, vocab 32000, untied
embeddings, as many layers as reach ``--size-gb``) sharded at ``--shard-mb`` with a
``model.safetensors.index.json``, written shard by shard (the builder holds one shard). Then, each in a
fresh subprocess and alternating so that a busy machine slows both alike:

* ``stream``  ``abliterate.checkpoint.stream_edit.stream_orthogonalize(src, out, r)`` (all layers and the embeddings)
* ``copy``    ``shutil.copyfile`` of every shard and the index: the same bytes, nothing edited

each with the input in the page cache (``hot``: read once just before) and out of it (``cold``:
``posix_fadvise(DONTNEED)`` on the input files only, so other processes keep their cache). Peak RSS is the
kernel high-water mark (VmHWM) reset just before the timed call (``5 > /proc/self/clear_refs``), so it covers
the call alone; the RSS before the call (Python, torch, transformers imported) is reported too. Outputs are
deleted and ``sync`` is run before every timed call, so dirty pages of one run never slow the next.
The checkpoint and all outputs are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000
SECTION = "## Streaming edit (bench/stream.py)"


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    kv, p = HIDDEN // HEADS * KV_HEADS, f"model.layers.{i}."
    return {
        p + "input_layernorm.weight": (HIDDEN,),
        p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        p + "self_attn.k_proj.weight": (kv, HIDDEN),
        p + "self_attn.v_proj.weight": (kv, HIDDEN),
        p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        p + "post_attention_layernorm.weight": (HIDDEN,),
        p + "mlp.gate_proj.weight": (INTER, HIDDEN),
        p + "mlp.up_proj.weight": (INTER, HIDDEN),
        p + "mlp.down_proj.weight": (HIDDEN, INTER),
    }


def build(src: Path, size_gb: float, shard_mb: int, dtype_name: str) -> dict[str, Any]:
    """Write a random checkpoint of at least ``size_gb`` GB; returns its description."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    width = torch.tensor([], dtype=dtype).element_size()
    per_layer = sum(torch.Size(s).numel() for s in _layer_shapes(0).values()) * width
    layers = max(2, -(-int(size_gb * 1e9 - 2 * VOCAB * HIDDEN * width) // per_layer))
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        shapes.update(_layer_shapes(i))
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * width
        if groups[-1] and size + nbytes > shard_mb * 1e6:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    src.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for n, names in enumerate(groups, 1):
        file = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            t = torch.empty(shapes[name], dtype=dtype)
            t.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.02, generator=gen)
            tensors[name] = t
            weight_map[name] = file
            total += t.numel() * width
        save_file(tensors, str(src / file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (src / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=False,
        dtype=dtype_name.replace("bf16", "bfloat16").replace("fp16", "float16").replace("fp32", "float32"),
    )
    config.save_pretrained(src)
    shard_sizes = [(src / f).stat().st_size for f in sorted(set(weight_map.values()))]
    return {"layers": layers, "dtype": dtype_name, "shards": len(shard_sizes), "bytes": sum(shard_sizes),
            "largest_shard": max(shard_sizes), "embedding": VOCAB * HIDDEN * width}  # fmt: skip


def worker(kind: str, src: Path, out: Path) -> None:
    """One timed call in this fresh process; prints a JSON line."""
    imports = 0.0
    if kind == "stream":
        # One-time imports before the clock: torch, transformers and this architecture's config and modeling
        # modules (transformers imports them lazily, on first use); any program using transformers pays them.
        start = time.perf_counter()
        import torch
        import transformers.core_model_loading  # noqa: F401
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        from abliterate.checkpoint.stream_edit import stream_orthogonalize

        _ = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(src))]
        imports = time.perf_counter() - start
        config = json.loads((src / "config.json").read_text())
        r = torch.randn(config["hidden_size"], generator=torch.Generator().manual_seed(1))
        r /= r.norm()
    rss_before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    edited = 0
    if kind == "stream":
        edited = len(stream_orthogonalize(src, out, r).edited)
    else:
        out.mkdir()
        for file in sorted(src.iterdir()):
            shutil.copyfile(file, out / file.name)
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "rss_before": rss_before, "rss_peak": _status("VmHWM"), "edited": edited}
    print(json.dumps({**result, "imports": imports}))


def evict(src: Path) -> None:
    """Drop just these files from the page cache (POSIX_FADV_DONTNEED), so the next run reads them from disk."""
    for file in src.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(kind: str, cache: str, src: Path, out: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    if cache == "cold":
        evict(src)
    else:  # warm the page cache
        for file in src.iterdir():
            with open(file, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    cmd = [sys.executable, __file__, "--worker", kind, str(src), str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"{kind} worker failed:\n{res.stderr[-3000:]}")
    result = json.loads(res.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result


def _runs(results: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['seconds']:.2f}" for r in results)


def markdown(info: dict[str, Any], results: dict[str, list[dict[str, Any]]], command: str) -> str:
    gb, mib = 1e9, 2**20
    med = {k: {f: statistics.median(r[f] for r in rs) for f in rs[0]} for k, rs in results.items()}
    best = {k: min(r["seconds"] for r in rs) for k, rs in results.items()}
    stream, reps = med["stream hot"], len(results["stream hot"])
    peak, before, shard = stream["rss_peak"], stream["rss_before"], info["largest_shard"]
    ratio = {c: best[f"copy {c}"] / best[f"stream {c}"] for c in ("hot", "cold")}
    paired = {}
    for c in ("hot", "cold"):
        pairs = zip(results[f"stream {c}"], results[f"copy {c}"], strict=True)
        paired[c] = statistics.median(copy["seconds"] / stream["seconds"] for stream, copy in pairs)
    rows = [
        f"{SECTION}",
        "",
        f"Date: {datetime.date.today().isoformat()}. Command: `{command}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.platform()}, shared with other jobs (load average {os.getloadavg()[0]:.1f} at the end). "
        f"{reps} rounds; each round runs the four variants back to back, in rotating order.",
        "",
        f"Checkpoint: random Llama, hidden {HIDDEN}, intermediate {INTER}, {info['layers']} layers, vocab {VOCAB}, "
        f"untied, {info['dtype']}: {info['bytes'] / gb:.2f} GB in {info['shards']} shards, largest "
        f"{shard / mib:.0f} MiB; {int(stream['edited'])} writer tensors edited (every o_proj and down_proj, "
        "and the embedding).",
        "",
        "| variant | page cache | best s | median s | best MB/s | peak RSS MiB | RSS before call MiB | peak - before |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k, v in med.items():
        kind, cache = k.split()
        rows.append(
            f"| {kind} | {cache} | {best[k]:.2f} | {v['seconds']:.2f} | {info['bytes'] / best[k] / 1e6:.0f} | "
            f"{v['rss_peak'] / mib:.0f} | {v['rss_before'] / mib:.0f} | {(v['rss_peak'] - v['rss_before']) / mib:.0f} |"
        )
    rows += [
        "",
        f"* Memory: the edit's peak RSS is {peak / shard:.2f}x the largest shard (target <= 1.2x), of which "
        f"{before / mib:.0f} MiB is the interpreter with torch and transformers loaded before the call; the call "
        f"itself adds {(peak - before) / mib:.0f} MiB = {(peak - before) / shard:.2f}x the largest shard: the "
        "meta-device model, a 16 MiB float32 work buffer and one row block of stored bytes (writers are edited "
        f"in row blocks, so not even the {info['embedding'] / mib:.0f} MiB embedding is held whole). Untouched "
        "tensors never enter user memory.",
        f"* Throughput, target >= 50% of the plain copy's: best run vs best run {ratio['hot']:.0%} with the input "
        f"in the page cache and {ratio['cold']:.0%} with it evicted first (posix_fadvise DONTNEED on the shards); "
        f"median of the per-round ratios {paired['hot']:.0%} hot and {paired['cold']:.0%} cold. Other jobs add "
        "seconds to random runs here, so best-of is the steadier figure. The extra time is reading, projecting "
        "(float32) and writing the writer tensors (a third of the bytes; a Linear weight is read twice, once to "
        "sum U W and once to write), the copy being split around them, and building the meta-device model "
        "(about 0.3 s); untouched tensors go through copy_file_range like the copy's sendfile, on a second thread "
        "that overlaps the edits. Writing 2 GB into "
        "the page cache is itself erratic here: the same copy takes 0.55 s or 3.5 s from run to run.",
        f"* Not in the timed call: one-time imports (torch, transformers, the Llama config and modeling modules), "
        f"{stream['imports']:.1f} s per worker (median); a first call in a fresh process pays them on top.",
        "* Runs (s): " + "; ".join(f"{k} {_runs(rs)}" for k, rs in results.items()) + ".",
        "",
    ]
    return "\n".join(rows)


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of ``path`` (other sections stay as they are), or append it."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new.rstrip("\n") + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.2)
    ap.add_argument("--shard-mb", type=int, default=400)
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="where the checkpoint goes (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint")
    ap.add_argument("--write", type=Path, default=None, help="write the results section into this markdown file")
    ap.add_argument("--worker", nargs=3, metavar=("KIND", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), Path(args.worker[2]))
        return
    root = Path(tempfile.mkdtemp(prefix="abliterate-stream-", dir=args.workdir))
    try:
        t = time.perf_counter()
        info = build(root / "src", args.size_gb, args.shard_mb, args.dtype)
        print(f"built {info} in {time.perf_counter() - t:.0f} s", flush=True)
        variants = ["stream hot", "copy hot", "stream cold", "copy cold"]
        results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for rep in range(args.reps):
            for v in variants[rep % 4 :] + variants[: rep % 4]:
                kind, cache = v.split()
                results[v].append(run(kind, cache, root / "src", root / f"out-{kind}"))
                print(v, results[v][-1], flush=True)
        command = "python bench/stream.py " + " ".join(a for a in sys.argv[1:])
        text = markdown(info, results, command.strip())
        print(text)
        if args.write:
            write_section(args.write, text)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
