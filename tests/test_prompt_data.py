"""Sanity checks for the bundled harmful/harmless prompt sets."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[1] / "src" / "abliterate" / "data"
FILES = ("harmful.jsonl", "harmless.jsonl")
SPLITS = {"train", "val", "test"}
KEYS = {"prompt", "category", "split"}


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def _load(name: str) -> list[dict]:
    rows = []
    with open(DATA_DIR / name, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            assert line.strip(), f"{name}:{lineno}: blank line"
            row = json.loads(line)
            assert isinstance(row, dict), f"{name}:{lineno}: not a JSON object"
            rows.append(row)
    return rows


@pytest.fixture(scope="module", params=FILES)
def rows(request) -> list[dict]:
    return _load(request.param)


def test_size(rows):
    assert len(rows) >= 300


def test_schema(rows):
    for row in rows:
        assert set(row) == KEYS, row
        assert isinstance(row["prompt"], str) and row["prompt"].strip(), row
        assert isinstance(row["category"], str) and row["category"], row
        assert row["split"] in SPLITS, row


def test_categories(rows):
    assert len({r["category"] for r in rows}) >= 10


def test_no_duplicates_within_file(rows):
    counts = Counter(_norm(r["prompt"]) for r in rows)
    dups = [p for p, n in counts.items() if n > 1]
    assert not dups, dups


def test_no_overlap_across_files():
    harmful = {_norm(r["prompt"]) for r in _load("harmful.jsonl")}
    harmless = {_norm(r["prompt"]) for r in _load("harmless.jsonl")}
    assert not harmful & harmless, sorted(harmful & harmless)


def test_split_sizes(rows):
    counts = Counter(r["split"] for r in rows)
    for split in SPLITS:
        assert counts[split] >= 50, (split, counts[split])


def test_every_category_in_every_split(rows):
    by_cat: dict[str, set[str]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], set()).add(r["split"])
    missing = {c: SPLITS - s for c, s in by_cat.items() if s != SPLITS}
    assert not missing, missing
