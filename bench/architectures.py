"""Every causal-LM type the installed transformers registers, and every type it registers only as image-text-to-text
(VLMs, text stack only), built as a tiny random model: supported, refused (with the one-line ArchitectureError) or not
buildable tiny; a refused type is also loaded with residual_only=True and shown as "runtime only" when runtime ablation
of the residual stream itself serves it (the direction absent from every layer's input and output). The same check
as tests/test_architectures.py and tests/test_vlm.py.

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
from registry_itt import ITT_TYPES, tiny_itt_model  # noqa: E402
from test_architectures import UNBUILDABLE  # noqa: E402
from test_vlm import ITT_UNBUILDABLE  # noqa: E402


def note(o: Outcome) -> str:
    if o.status == "supported":
        lo, hi = o.per_layer
        count = f"{lo}" if lo == hi else f"{lo}-{hi}"
        extra = ", post-norms" if o.post_norms else ""
        return f"{count} writers/layer at `{o.layers_path}`{extra}; runtime vs weights {o.runtime_vs_weights:.0e}"
    short = o.detail.split("; ")[0].split(": after ablating")[0].split(", so ")[0]
    if o.status == "refused" and not o.runtime_only:
        short += f"; --residual-stream: {o.runtime_leak:.0e} left between layers"
    elif o.status == "refused":
        short += f"; no runtime path either ({o.runtime_only.split('; ')[0].split(': ', 1)[-1]})"
    return short.replace("|", "\\|")


def status(o: Outcome) -> str:
    return "runtime only" if o.status == "refused" and not o.runtime_only else o.status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="model types (default: all registered)")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table (for README)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    outcomes: list[tuple[str, Outcome]] = []
    chosen = args.types or [*CAUSAL_TYPES, *ITT_TYPES]
    for t in chosen:
        if t in ITT_TYPES:
            kind = "vlm"
            o = Outcome(t, "unbuildable", ITT_UNBUILDABLE[t]) if t in ITT_UNBUILDABLE else check_type(t, tiny_itt_model)
        else:
            kind = "enc" if t in ENCODER_TYPES else "dec"
            o = Outcome(t, "unbuildable", UNBUILDABLE[t]) if t in UNBUILDABLE else check_type(t)
        outcomes.append((kind, o))
        if not args.markdown:
            print(f"{t:26s} {kind} {status(o):12s} {note(o)[:150]}", flush=True)
    if args.markdown:
        names = {"dec": "decoder-only", "enc": "encoder(-decoder)", "vlm": "image-text-to-text (text stack)"}
        print("| type | kind | status | writers / reason |")
        print("|---|---|---|---|")
        for kind, o in outcomes:
            print(f"| `{o.model_type}` | {names[kind]} | {status(o)} | {note(o)} |")
    dec = [o for k, o in outcomes if k == "dec"]
    enc = [o for k, o in outcomes if k == "enc"]
    vlm = [o for k, o in outcomes if k == "vlm"]

    def counts(group: list[Outcome]) -> str:
        n = {s: sum(o.status == s for o in group) for s in ("supported", "refused", "unbuildable")}
        runtime = sum(status(o) == "runtime only" for o in group)
        built = n["supported"] + n["refused"]
        share = f" ({n['supported'] / built:.1%} of those that build)" if built else ""
        return (
            f"{n['supported']} supported{share}, {n['refused']} refused for weight edits ({runtime} of them served "
            f"by --residual-stream), {n['unbuildable']} not buildable tiny"
        )

    print()
    print(f"transformers {transformers.__version__}: {len(dec) + len(enc)} causal-LM types, {len(vlm)} more VLM types")
    print(f"decoder-only: {len(dec)}: {counts(dec)}")
    print(f"encoder / encoder-decoder: {len(enc)}: {counts(enc)}")
    print(f"image-text-to-text only (VLMs, text stack): {len(vlm)}: {counts(vlm)}")
    silent = [
        o.model_type
        for _, o in outcomes
        if o.status == "supported" and (o.residual_leak > 1e-4 or o.runtime_vs_weights > 1e-4)
    ]
    print(f"silently wrong (supported but residual or weights off by > 1e-4): {len(silent)} {silent}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
