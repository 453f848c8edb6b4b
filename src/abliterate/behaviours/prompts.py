"""Prompt sets: the bundled harmful/harmless instructions with a fixed train/val/test split, and a held-out
"check" part drawn from what the train split leaves over (the search's front check)."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from abliterate.errors import PromptError

Kind = Literal["harmful", "harmless"]
Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    category: str
    split: str


def bundled_names() -> list[str]:
    """The bundled prompt sets: harmful, harmless and the sets behaviour profiles use (e.g. questions)."""
    folder = resources.files("abliterate").joinpath("data")
    return sorted(p.name[: -len(".jsonl")] for p in folder.iterdir() if p.name.endswith(".jsonl"))


def bundled_records(kind: Kind | str) -> list[PromptRecord]:
    """Every record of a bundled set, in file order (categories interleaved)."""
    if kind not in bundled_names():
        raise PromptError(f"unknown bundled set '{kind}'; use one of {', '.join(bundled_names())}")
    text = resources.files("abliterate").joinpath("data", f"{kind}.jsonl").read_text(encoding="utf-8")
    return [PromptRecord(**json.loads(line)) for line in text.splitlines() if line.strip()]


def bundled(
    kind: Kind | str, split: Split | None = None, *, limit: int | None = None, exclude_categories: tuple[str, ...] = ()
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


def _column(rows: list[dict], column: str | None, source: str) -> list[str]:
    if not rows:
        return []
    col = column or next((c for c in ("prompt", "instruction", "text", "goal", "question") if c in rows[0]), None)
    if col is None or col not in rows[0]:
        raise PromptError(f"{source}: no column {column or 'prompt/instruction/text'}; name one as {source}:COLUMN")
    out = []
    for i, row in enumerate(rows):
        if col not in row or not isinstance(row[col], str):
            raise PromptError(f"{source}: row {i + 1} has no text in column '{col}'; fix or remove it")
        out.append(row[col])
    return out


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{path}: line {n} is not valid JSON ({exc.msg}); fix that line") from exc
        if not isinstance(row, dict):
            raise PromptError(f'{path}: line {n} is not a JSON object; expected {{"prompt": ...}}')
        rows.append(row)
    return rows


def load_source(spec: str) -> list[str]:
    """Prompts from one source spec.

    ``bundled:harmful`` / ``bundled:harmless`` (or another bundled set); ``FILE.txt`` (one per line);
    ``FILE.jsonl[:COLUMN]``; ``FILE.csv[:COLUMN]``; ``FILE.parquet[:COLUMN]``; ``hf:DATASET[:SPLIT[:COLUMN]]``
    (Hugging Face datasets). The column defaults to the first of prompt/instruction/text/goal/question.
    """
    if spec.startswith("bundled:"):
        return bundled(spec.split(":", 1)[1])  # type: ignore[arg-type]
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        name, split, column = parts[0], parts[1] if len(parts) > 1 else "train", parts[2] if len(parts) > 2 else None
        try:
            import datasets
        except ImportError as exc:
            raise PromptError("hf: sources need the 'datasets' package; pip install datasets") from exc
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as exc:  # datasets raises many types for missing/offline datasets
            raise PromptError(f"cannot load dataset '{name}' split '{split}': {str(exc).splitlines()[0]}") from exc
        return _column([dict(r) for r in ds], column, spec)
    path_str, _, column = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    path = Path(path_str)
    if not path.is_file():
        raise PromptError(f"prompt file {path} does not exist; check the path")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".jsonl":
        return _column(_read_jsonl(path), column or None, spec)
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            return _column(list(csv.DictReader(fh)), column or None, spec)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return _column(pq.read_table(path).to_pylist(), column or None, spec)
    raise PromptError(f"unsupported prompt file type '{suffix}'; use .txt, .jsonl, .csv or .parquet")


@dataclass(frozen=True)
class PromptSplits:
    train: list[str]
    val: list[str]
    test: list[str]
    check: list[str] = field(default_factory=list)  # held out from train, val and test (the search's front check)


def dedupe(prompts: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for p in prompts:
        key = " ".join(p.lower().split())
        if key and key not in seen:
            seen.add(key)
            out.append(p)
    return out


@dataclass(frozen=True)
class SplitSizes:
    """How prompts are split: the size of each part, the sampling seed, and the text around every prompt."""

    n_train: int
    n_val: int
    n_test: int
    seed: int | None = 0
    prefix: str = ""
    suffix: str = ""
    n_check: int = 0  # at most this many "check" prompts from what the train part leaves over


def make_splits(kind: Kind | str, sources: list[str], sizes: SplitSizes) -> PromptSplits:
    """Train/validation/test prompts of one kind, and up to ``sizes.n_check`` "check" prompts.

    The bundled set (source ``bundled``) keeps its fixed splits. Other sources are mixed,
    deduplicated, shuffled with ``sizes.seed`` and cut into the three parts. Each part is sampled down
    to its size with that seed; ``sizes.prefix``/``sizes.suffix`` wrap every prompt.

    The check prompts are what the train part leaves over (the bundled train split's prompts not sampled
    for training; for other sources the shuffled pool after the three parts), drawn with a generator of its
    own: asking for them changes neither the train, the validation nor the test prompts. There may be fewer
    than asked for (none when the train part is used up); the caller says what it does then.
    """
    n_train, n_val, n_test = sizes.n_train, sizes.n_val, sizes.n_test
    rng = random.Random(sizes.seed)
    if sources == ["bundled"]:
        parts = [bundled(kind, s) for s in SPLITS]  # type: ignore[arg-type]
        left: list[str] | None = None  # the train split's prompts not sampled (below)
    else:
        pool = dedupe([p for spec in sources for p in (bundled(kind) if spec == "bundled" else load_source(spec))])
        rng.shuffle(pool)
        need = n_train + n_val + n_test
        if len(pool) < need:
            raise PromptError(
                f"{kind} prompts: {len(pool)} after deduplication but {need} are needed "
                f"({n_train} train + {n_val} val + {n_test} test); add prompts or lower the counts"
            )
        parts = [pool[:n_train], pool[n_train : n_train + n_val], pool[n_train + n_val : need]]
        left = pool[need : need + max(sizes.n_check, 0)]
    out = []
    for i, (part, n) in enumerate(zip(parts, (n_train, n_val, n_test), strict=True)):
        if len(part) < n:
            raise PromptError(
                f"{kind} prompts: a split has {len(part)} prompts but {n} were asked for; lower the count"
            )
        rows = range(len(part)) if len(part) == n else sorted(rng.sample(range(len(part)), n))
        if i == 0 and left is None:
            taken = set(rows)
            rest = [p for j, p in enumerate(part) if j not in taken]
            check_rng = random.Random(None if sizes.seed is None else f"check:{sizes.seed}")
            count = min(max(sizes.n_check, 0), len(rest))
            left = [rest[j] for j in sorted(check_rng.sample(range(len(rest)), count))]
        out.append([f"{sizes.prefix}{part[j]}{sizes.suffix}" for j in rows])
    check = [f"{sizes.prefix}{p}{sizes.suffix}" for p in left or []]
    return PromptSplits(*out, check=check)
