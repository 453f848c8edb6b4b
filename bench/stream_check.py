"""Which architectures the streaming edit can verify: for every decoder-only causal-LM type, the full-size default
config is built on the meta device (as ``stream_orthogonalize`` builds a checkpoint's), its writers found by the name
patterns, and :func:`abliterate.arch.miniature.check_on_miniature` run on it (a copy with the widths shrunk, every layer
and flag kept). Types the registry test supports should pass; those it refuses should be refused here too.

    python bench/stream_check.py
"""

from __future__ import annotations

import collections
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import transformers  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402
from registry import CAUSAL_TYPES, ENCODER_TYPES, causal_lm_class, config_class  # noqa: E402
from test_architectures import REFUSED, UNBUILDABLE  # noqa: E402

from abliterate.arch.anatomy import find_anatomy  # noqa: E402
from abliterate.arch.miniature import check_on_miniature  # noqa: E402
from abliterate.errors import ArchitectureError  # noqa: E402


def main() -> None:
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    counts: collections.Counter[str] = collections.Counter()
    for t in CAUSAL_TYPES:
        if t in ENCODER_TYPES or t in UNBUILDABLE:
            continue
        expected = "refused" if t in REFUSED else "supported"
        try:
            with init_empty_weights():
                model = causal_lm_class(t)._from_config(config_class(t)())
            anatomy = find_anatomy(model)
        except Exception as exc:  # no default config, or patterns alone find no writers: not streamable as is
            counts["default config not streamable by patterns"] += 1
            print(f"{t:26s} {expected:9s} -  {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
            continue
        try:
            check_on_miniature(model, anatomy, None, None)
            got, why = "verified", ""
        except ArchitectureError as exc:
            got, why = "refused", str(exc)[:110]
        counts[f"{expected}, {got}"] += 1
        print(f"{t:26s} {expected:9s} {got:9s} {why}")
    print()
    for key, n in sorted(counts.items()):
        print(f"{key}: {n}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
