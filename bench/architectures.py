"""Every causal-LM type the installed transformers registers, built as a tiny random model: supported, refused
(with the one-line ArchitectureError) or not buildable tiny. The same check as tests/test_architectures.py.

    python bench/architectures.py [--markdown] [TYPE ...]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

import transformers  # noqa: E402
from registry import CAUSAL_TYPES, ENCODER_TYPES, Outcome, check_type  # noqa: E402
from test_architectures import UNBUILDABLE  # noqa: E402


def note(o: Outcome) -> str:
    if o.status == "supported":
        lo, hi = o.per_layer
        count = f"{lo}" if lo == hi else f"{lo}-{hi}"
        extra = ", post-norms" if o.post_norms else ""
        return f"{count} writers/layer at `{o.layers_path}`{extra}; runtime vs weights {o.runtime_vs_weights:.0e}"
    short = o.detail.split("; ")[0].split(": after ablating")[0].split(", so ")[0]
    return short.replace("|", "\\|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="model types (default: all registered)")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table (for README)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    outcomes = []
    for t in args.types or CAUSAL_TYPES:
        o = Outcome(t, "unbuildable", UNBUILDABLE[t]) if t in UNBUILDABLE else check_type(t)
        outcomes.append(o)
        if not args.markdown:
            kind = "enc" if t in ENCODER_TYPES else "dec"
            print(f"{t:26s} {kind} {o.status:11s} {note(o)[:150]}", flush=True)
    if args.markdown:
        print("| type | kind | status | writers / reason |")
        print("|---|---|---|---|")
        for o in outcomes:
            kind = "encoder(-decoder)" if o.model_type in ENCODER_TYPES else "decoder-only"
            print(f"| `{o.model_type}` | {kind} | {o.status} | {note(o)} |")
    dec = [o for o in outcomes if o.model_type not in ENCODER_TYPES]
    enc = [o for o in outcomes if o.model_type in ENCODER_TYPES]

    def counts(group: list[Outcome]) -> str:
        n = {s: sum(o.status == s for o in group) for s in ("supported", "refused", "unbuildable")}
        built = n["supported"] + n["refused"]
        share = f" ({n['supported'] / built:.1%} of those that build)" if built else ""
        return f"{n['supported']} supported, {n['refused']} refused, {n['unbuildable']} not buildable tiny{share}"

    print()
    print(f"transformers {transformers.__version__}: {len(outcomes)} causal-LM types")
    print(f"decoder-only: {len(dec)}: {counts(dec)}")
    print(f"encoder / encoder-decoder: {len(enc)}: {counts(enc)}")
    silent = [
        o.model_type
        for o in outcomes
        if o.status == "supported" and (o.residual_leak > 1e-4 or o.runtime_vs_weights > 1e-4)
    ]
    print(f"silently wrong (supported but residual or weights off by > 1e-4): {len(silent)} {silent}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
