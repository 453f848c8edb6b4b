"""Residual-stream capture with forward hooks: before every decoder layer and after the last.

Means are accumulated as float64 running sums, so memory does not grow with the number of
prompts; per-prompt activations are kept only when asked for.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from abliterate.arch.streams import stream_mean
from abliterate.errors import PromptError
from abliterate.lm.model import LoadedModel, Progress, output_cache
from abliterate.measure.batching import BatchRunner
from abliterate.ops.hooks import HookSet

Position = int | Literal["gen"]
MIN_PROMPTS = 2


@dataclass
class Activations:
    """Mean residual activations of two prompt sets.

    Tensors are indexed ``[point, position, hidden]``: point ``i`` is the residual stream entering
    decoder layer ``i``, point ``num_layers`` the output of the last layer.
    """

    harmful_mean: torch.Tensor
    harmless_mean: torch.Tensor
    n_harmful: int
    n_harmless: int
    positions: list[Position]
    model: str = ""
    prompt_hash: str = ""
    harmful: torch.Tensor | None = None  # [n, point, position, hidden] float32, when kept
    harmless: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    harmful_prompts: list[str] = field(default_factory=list)
    harmless_prompts: list[str] = field(default_factory=list)

    @property
    def num_points(self) -> int:
        return self.harmful_mean.shape[0]

    def position_index(self, position: Position) -> int:
        if position not in self.positions:
            raise PromptError(f"position {position!r} was not captured; captured positions are {self.positions}")
        return self.positions.index(position)


def prompt_hash(*sets: Sequence[str], system: str | None = None) -> str:
    blob = json.dumps({"sets": [list(s) for s in sets], "system": system}, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_prompts(prompts: Sequence[str], what: str, minimum: int = MIN_PROMPTS) -> list[str]:
    if isinstance(prompts, str):
        raise PromptError(f"{what} prompts must be a list of strings, not one string")
    items = list(prompts)
    if len(items) < minimum:
        raise PromptError(f"{what} prompt set has {len(items)} prompt(s); at least {minimum} are needed")
    for i, p in enumerate(items):
        if not isinstance(p, str) or not p.strip():
            raise PromptError(f"{what} prompt #{i} is empty or not a string; remove it")
    return items


def check_positions(positions: Sequence[Position]) -> list[Position]:
    out = list(positions)
    if not out:
        raise PromptError("no token positions given; use e.g. positions=[-1] (last prompt token)")
    for p in out:
        if p != "gen" and not (isinstance(p, int) and p < 0):
            raise PromptError(
                f"bad position {p!r}: use negative offsets from the prompt end (-1 = last token) or 'gen'"
            )
    if len(set(out)) != len(out):
        raise PromptError(f"positions {out} repeat; list each once")
    return [p for p in out if p != "gen"] + (["gen"] if "gen" in out else [])  # "gen" goes last


class _Collector:
    """Receives [batch, seq, hidden] residuals at each point and keeps selected positions."""

    def __init__(self, points: int, n_pos: int, hidden: int, keep: int | None) -> None:
        self.sums = torch.zeros(points, n_pos, hidden, dtype=torch.float64)
        self.kept = torch.zeros(keep, points, n_pos, hidden, dtype=torch.float32) if keep else None
        self.rows: torch.Tensor | None = None  # original indices of the current batch

    def add(self, point: int, slot: slice, values: torch.Tensor) -> None:
        vals = values.detach().to("cpu", torch.float64)  # [batch, k, hidden]
        self.sums[point, slot] += vals.sum(0)
        if self.kept is not None and self.rows is not None:
            self.kept[self.rows, point, slot] = vals.float()


def _run_set(
    lm: LoadedModel,
    prompts: list[str],
    positions: list[Position],
    batch_size: int,
    system: str | None,
    keep: bool,
    progress: Progress | None,
    done: int,
    total: int,
    share_prefix: bool = True,
) -> _Collector:
    prompt_pos = [p for p in positions if p != "gen"]
    gen_slot = positions.index("gen") if "gen" in positions else None
    if gen_slot is not None and lm.caps.cache_arg is None:
        raise PromptError(
            f"position 'gen' needs a KV cache, and {type(lm.model).__name__}.forward takes none; "
            "capture prompt positions (negative offsets) instead"
        )
    idx = torch.tensor(prompt_pos, dtype=torch.long)
    n_points = lm.num_layers + 1
    col = _Collector(n_points, len(positions), lm.hidden_size, len(prompts) if keep else None)
    runner = BatchRunner(
        lm,
        lm.format(prompts, system=system),
        batch_size,
        share_prefix=share_prefix,
        min_suffix=-min(prompt_pos) if prompt_pos else 1,
        use_cache=gen_slot is not None,
    )
    shortest = min(len(ids) for ids in runner.ids)
    if prompt_pos and -min(prompt_pos) > shortest:
        raise PromptError(
            f"position {min(prompt_pos)} is before the start of a {shortest}-token prompt; use a smaller offset"
        )
    stage: dict[str, Any] = {"slot": slice(0, 0), "select": True, "on": False}

    def watcher(point: int):
        def fn(hidden: torch.Tensor) -> None:
            if not stage["on"]:
                return
            hidden = stream_mean(hidden, lm.hidden_size)
            if stage["select"]:
                col.add(point, stage["slot"], hidden[:, idx.to(hidden.device), :])
            else:
                col.add(point, stage["slot"], hidden[:, -1:, :])

        return fn

    with HookSet() as hooks, torch.inference_mode():
        for i, layer in enumerate(lm.anatomy.layers):
            hooks.watch_input(layer, watcher(i))
        hooks.watch_output(lm.anatomy.layers[-1], watcher(n_points - 1))
        runner.prefill()  # the shared prefix is run, not recorded
        finished = 0
        stage.update(slot=slice(0, len(prompt_pos)), on=True)  # prompt positions, recorded during each batch
        runner.before_batch = lambda rows: setattr(col, "rows", torch.tensor(rows))
        for batch in runner:
            out = batch.output
            if gen_slot is not None:
                next_ids = out.logits[:, -1, :].argmax(-1, keepdim=True).to(lm.device)
                mask = torch.cat([batch.attention_mask, torch.ones_like(next_ids)], 1)
                stage.update(slot=slice(gen_slot, gen_slot + 1), select=False)
                lm.forward(
                    {"input_ids": next_ids, "attention_mask": mask},
                    use_cache=True,
                    cache=output_cache(out),
                    position_ids=batch.last_position + 1,
                )
                stage.update(slot=slice(0, len(prompt_pos)), select=True)
            del out
            finished += len(batch.rows)
            if progress:
                progress(done + finished, total)
    return col


def capture(
    lm: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    positions: Sequence[Position] = (-1,),
    batch_size: int = 16,
    system: str | None = None,
    keep_per_prompt: bool = False,
    progress: Progress | None = None,
    share_prefix: bool = True,
) -> Activations:
    """Capture residual-stream activations for both prompt sets with the chat template applied.

    ``positions`` are negative offsets from the end of the formatted prompt (``-1`` is the last
    token; ``[-5, ..., -1]`` are post-instruction positions) and/or ``"gen"``, the first generated
    token (greedy). ``progress(done, total)`` is called after every batch.

    Args:
        lm: the loaded model.
        harmful: prompts that show the behaviour (at least two).
        harmless: prompts that do not (at least two).
        positions: negative offsets from the prompt's end and/or ``"gen"``.
        batch_size: prompts per forward pass.
        system: a system prompt for the chat template.
        keep_per_prompt: keep each prompt's activations too (``acts.harmful``/``acts.harmless``), not only means.
        progress: called as ``progress(done, total)`` after every batch.
        share_prefix: run the chat-template prefix every prompt shares once per batch and reuse its KV cache.

    Returns:
        The :class:`Activations`: float64 means per side, shaped ``[layers + 1, positions, hidden]`` (the stream
        entering each layer and after the last), with the prompts, their hash and the model's source.

    Example:
        >>> from abliterate import capture, load_model
        >>> from abliterate.behaviours.prompts import bundled
        >>> lm = load_model("Qwen/Qwen2.5-0.5B-Instruct")
        >>> acts = capture(lm, bundled("harmful", "train"), bundled("harmless", "train"), positions=[-1])
        >>> acts.harmful_mean.shape
    """
    harmful = check_prompts(harmful, "harmful")
    harmless = check_prompts(harmless, "harmless")
    pos = check_positions(positions)
    if batch_size < 1:
        raise PromptError(f"batch_size must be at least 1, got {batch_size}")
    total = len(harmful) + len(harmless)
    a = _run_set(lm, harmful, pos, batch_size, system, keep_per_prompt, progress, 0, total, share_prefix)
    b = _run_set(lm, harmless, pos, batch_size, system, keep_per_prompt, progress, len(harmful), total, share_prefix)
    return Activations(
        harmful_mean=a.sums / len(harmful),
        harmless_mean=b.sums / len(harmless),
        n_harmful=len(harmful),
        n_harmless=len(harmless),
        positions=pos,
        model=lm.source,
        prompt_hash=prompt_hash(harmful, harmless, system=system),
        harmful=a.kept,
        harmless=b.kept,
        meta={"system": system},
        harmful_prompts=harmful,
        harmless_prompts=harmless,
    )
