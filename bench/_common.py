"""What the benchmark scripts share: the model they run on when ``--model`` is not given (the cached demo model)
and the torch thread count.

Imports only the standard library at the top: bench/capture.py's TransformerLens worker imports this module in a
venv that has no abliterate, and torch is imported only by the scripts that set threads.
"""

from __future__ import annotations

import argparse

MODEL_HELP = "model directory (default: the cached demo model, abliterate.lm.demo.demo_model_path())"


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """``--model PATH``, defaulting to the demo model (resolved by :func:`model_path`)."""
    parser.add_argument("--model", help=MODEL_HELP)


def model_path(given: str | None) -> str:
    """The model a script runs on: ``given``, else the cached demo model (built offline on first use)."""
    if given:
        return given
    try:  # only here: a worker in bench/capture.py's TransformerLens venv has no abliterate and never gets here
        from abliterate.lm.demo import demo_model_path
    except ImportError:
        raise SystemExit("abliterate.lm.demo.demo_model_path is not available; pass --model PATH") from None
    return str(demo_model_path())


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when a count was given (torch's default otherwise)."""
    if threads:
        import torch  # only when asked: bench/capture.py's driver never imports torch before its workers run

        torch.set_num_threads(threads)
