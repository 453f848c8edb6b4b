"""Prompt sets: the bundled harmful/harmless instructions with a fixed train/val/test split."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Literal

from .errors import PromptError

Kind = Literal["harmful", "harmless"]
Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    category: str
    split: str


def bundled_records(kind: Kind) -> list[PromptRecord]:
    """Every record of a bundled set, in file order (categories interleaved)."""
    if kind not in ("harmful", "harmless"):
        raise PromptError(f"unknown bundled set '{kind}'; use 'harmful' or 'harmless'")
    text = resources.files("abliterate").joinpath("data", f"{kind}.jsonl").read_text(encoding="utf-8")
    return [PromptRecord(**json.loads(line)) for line in text.splitlines() if line.strip()]


def bundled(
    kind: Kind, split: Split | None = None, *, limit: int | None = None, exclude_categories: tuple[str, ...] = ()
) -> list[str]:
    """Prompts of a bundled set, optionally one split only, the first ``limit`` of them.

    Because categories are interleaved in file order, any prefix covers every category.
    """
    if split is not None and split not in SPLITS:
        raise PromptError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
    out = [
        r.prompt
        for r in bundled_records(kind)
        if (split is None or r.split == split) and r.category not in exclude_categories
    ]
    return out[:limit] if limit is not None else out
