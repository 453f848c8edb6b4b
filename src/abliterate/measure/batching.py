"""Batched forward passes over chat-formatted prompts, sharing the common prompt prefix.

Every chat-formatted prompt starts with the same tokens (BOS, default system prompt, the user
turn header). :class:`BatchRunner` runs that shared prefix once (batch size 1) to fill a KV cache,
repeats the cache across the batch and runs only each prompt's own tokens, left-padded after the
prefix. Results equal the plain left-padded forward within float tolerance (tested per family);
it is skipped where the prefix is short or the model's cache cannot be repeated.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from abliterate.lm.model import LoadedModel, output_cache

MIN_PREFIX = 4


@dataclass
class Batch:
    rows: list[int]  # indices into the texts, in the caller's order
    output: Any  # the model output (logits for the last position, its KV cache when use_cache)
    attention_mask: torch.Tensor  # over prefix + batch tokens
    last_position: torch.Tensor  # [batch, 1] position id of each prompt's last token


class BatchRunner:
    """Iterate over ``texts`` in length-sorted batches. Call :meth:`prefill` (under the same hooks as
    the batches) before iterating; it is a no-op when no prefix is shared."""

    def __init__(
        self,
        lm: LoadedModel,
        texts: Sequence[str],
        batch_size: int,
        *,
        share_prefix: bool = True,
        min_suffix: int = 1,
        use_cache: bool = False,
    ) -> None:
        self.lm = lm
        self.batch_size = batch_size
        self.use_cache = use_cache
        self.ids = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        self.order = sorted(range(len(self.ids)), key=lambda i: len(self.ids[i]))
        self.prefix_len = self._shared(min_suffix) if share_prefix and lm.caps.cache_arg else 0
        self.cache: Any = None
        self.before_batch: Callable[[list[int]], None] | None = None  # called with the rows before each forward

    def _shared(self, min_suffix: int) -> int:
        first = self.ids[0]
        n = min(len(x) for x in self.ids) - min_suffix
        for ids in self.ids[1:]:
            k = 0
            while k < n and ids[k] == first[k]:
                k += 1
            n = k
        return n if n >= MIN_PREFIX and len(self.ids) > 1 else 0

    @torch.inference_mode()
    def prefill(self) -> None:
        if not self.prefix_len:
            return
        ids = torch.tensor([self.ids[0][: self.prefix_len]], device=self.lm.device)
        out = self.lm.forward({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, use_cache=True)
        self.cache = output_cache(out)

    def _pad(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        tails = [self.ids[r][self.prefix_len :] for r in rows]
        width = max(len(t) for t in tails)
        pad = self.lm.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(t)) + list(t) for t in tails], device=self.lm.device)
        mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in tails], device=self.lm.device)
        return ids, mask

    @torch.inference_mode()
    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, len(self.order), self.batch_size):
            rows = self.order[start : start + self.batch_size]
            if self.before_batch:
                self.before_batch(rows)
            ids, mask = self._pad(rows)
            if self.prefix_len:
                if self.cache is None:
                    raise RuntimeError("BatchRunner.prefill() must run before iterating")
                cache = copy.deepcopy(self.cache)
                cache.batch_repeat_interleave(len(rows))
                full = torch.cat(
                    [torch.ones(len(rows), self.prefix_len, dtype=mask.dtype, device=mask.device), mask], 1
                )
                positions = (full.cumsum(-1) - 1).clamp_min(0)[:, self.prefix_len :]
                out = self.lm.forward(
                    {"input_ids": ids, "attention_mask": full},
                    use_cache=True,
                    cache=cache,
                    position_ids=positions,
                )
            else:
                full = mask
                out = self.lm.forward({"input_ids": ids, "attention_mask": mask}, use_cache=self.use_cache)
            yield Batch(rows, out, full, full.sum(-1, keepdim=True) - 1)
