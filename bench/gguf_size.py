"""GGUF out, measured: the streaming GGUF edit of a model (default: the demo's Q4_K_M GGUF) without loading it.

A unit direction (seeded random, or --directions FILE with its chosen layer) is removed from every residual writer
and the embeddings, norm-preserving, as a default run's edit does; the GGUF is written tensor by tensor. Prints the
source and written sizes (and their ratio), the seconds to write, the peak RSS of this process before and after the
write, and the edited tensors' types before -> after.

    python3 bench/gguf_size.py                       # the demo GGUF, --gguf-type auto
    python3 bench/gguf_size.py --model x.gguf --gguf-type Q8_0
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from abliterate.arch.anatomy import find_anatomy
from abliterate.checkpoint.gguf_stream import meta_model, write_plan_gguf
from abliterate.edit.direction_edit import DirectionEdit
from abliterate.lm.model import LoadedModel


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a .gguf file (default: the demo's)")
    parser.add_argument("--gguf-type", default="auto")
    parser.add_argument("--out", help="where to write (default: a temporary folder, removed)")
    args = parser.parse_args()
    if args.model is None:
        from abliterate.lm.demo import DEMO_NAME, cache_dir, demo_model_path, fetch_demo_gguf

        demo_model_path()
        args.model = str(
            fetch_demo_gguf()
            if not (cache_dir() / f"{DEMO_NAME}.gguf").is_file()
            else cache_dir() / f"{DEMO_NAME}.gguf"
        )
    src = Path(args.model)
    model = meta_model(src)
    anatomy = find_anatomy(model)
    lm = LoadedModel(model, None, anatomy, str(src), None)
    d = torch.randn(anatomy.hidden_size, generator=torch.Generator().manual_seed(0))
    plan = DirectionEdit(d / d.norm(), None, 1.0, True, None, True).plan(lm)
    before = peak_rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(args.out) if args.out else Path(tmp) / "out.gguf"
        start = time.perf_counter()
        written = write_plan_gguf(src, dst, plan, anatomy.hidden_size, gguf_type=args.gguf_type)
        seconds = time.perf_counter() - start
        kinds = collections.Counter(f"{b}->{a}" for b, a in written.edited.values())
        report = {
            "model": str(src),
            "gguf_type": args.gguf_type,
            "source_mib": round(src.stat().st_size / 2**20, 1),
            "written_mib": round(written.bytes / 2**20, 1),
            "ratio": round(written.bytes / src.stat().st_size, 3),
            "seconds": round(seconds, 1),
            "peak_rss_mib_before_write": round(before, 0),
            "peak_rss_mib_after_write": round(peak_rss_mib(), 0),
            "edited": dict(kinds),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
