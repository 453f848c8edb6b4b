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


def test_check_split_is_held_out_and_leaves_train_val_and_test_as_they_were(tmp_path):
    from abliterate.behaviours.prompts import SplitSizes, bundled, make_splits

    for kind in ("harmful", "harmless"):
        before = make_splits(kind, ["bundled"], SplitSizes(64, 16, 64, seed=3))
        after = make_splits(kind, ["bundled"], SplitSizes(64, 16, 64, seed=3, n_check=32))
        assert (after.train, after.val, after.test) == (before.train, before.val, before.test) and before.check == []
        assert len(set(after.check)) == 32 and set(after.check) <= set(bundled(kind, "train"))
        assert not set(after.check) & (set(after.train) | set(after.val) | set(after.test))
        assert make_splits(kind, ["bundled"], SplitSizes(64, 16, 64, seed=3, n_check=32)) == after
        assert make_splits(kind, ["bundled"], SplitSizes(64, 16, 64, seed=4, n_check=32)).check != after.check
        every = make_splits(kind, ["bundled"], SplitSizes(len(bundled(kind, "train")), 16, 64, n_check=32))
        assert every.check == [], "nothing left over from the train split: no check prompts"
    path = tmp_path / "p.txt"
    path.write_text("\n".join(f"prompt number {i}" for i in range(30)) + "\n")
    plain = make_splits("harmful", [str(path)], SplitSizes(10, 5, 5, seed=1, prefix="<", suffix=">"))
    held = make_splits("harmful", [str(path)], SplitSizes(10, 5, 5, seed=1, prefix="<", suffix=">", n_check=8))
    assert (held.train, held.val, held.test) == (plain.train, plain.val, plain.test)
    assert len(held.check) == 8 and all(p.startswith("<prompt") and p.endswith(">") for p in held.check)
    assert not set(held.check) & (set(held.train) | set(held.val) | set(held.test))
    short = make_splits("harmful", [str(path)], SplitSizes(10, 5, 5, seed=1, n_check=20))
    assert len(short.check) == 10, "only what the pool leaves over"
