"""A loaded model: the transformers model, its tokenizer and its anatomy, with prompt formatting."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from abliterate.arch.anatomy import Anatomy
from abliterate.errors import PromptError
from abliterate.lm.template import content_style, messages
from abliterate.ops.placement import execution_device, is_offloaded

Progress = Callable[[int, int], None]

CACHE_ARGS = ("cache", "past_key_values")  # the KV cache's forward argument: "cache" from transformers 5.24 on


class Steps:
    """One measurement's progress over its parts: :meth:`part` turns a part's own ``(done, total)`` into the
    whole's, and moves the start of the next part on by that part's size."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0
        if progress:
            progress(0, total)  # the whole's size from the start

    def part(self, size: int) -> Progress | None:
        start, self.done = self.done, self.done + size
        if self.progress is None or not size:
            return None
        report = self.progress
        return lambda done, _total: report(start + done, self.total)

    def advance(self, size: int) -> None:
        self.done += size
        if self.progress:
            self.progress(self.done, self.total)


class CapabilityWarning(UserWarning):
    """A model's forward lacks an argument abliterate uses for speed or exactness (reported once per model)."""


@dataclass(frozen=True)
class ForwardCapabilities:
    """What a model's ``forward`` accepts, decided once from its signature when the model is wrapped.

    ``cache_arg``: the name of the KV-cache argument (``"cache"`` in transformers >= 5.24,
    ``"past_key_values"`` before), or None; without it the shared chat-template prefix is recomputed
    for every batch (slower, same results). ``position_ids``: without it left padding can shift learned
    absolute position embeddings (GPT-2-like models). ``logits_to_keep``: without it every position's
    logits are computed (more memory).
    """

    cache_arg: str | None
    position_ids: bool
    logits_to_keep: bool

    @classmethod
    def of(cls, model: nn.Module) -> ForwardCapabilities:
        params = inspect.signature(model.forward).parameters
        cache = next((name for name in CACHE_ARGS if name in params), None)
        return cls(cache, "position_ids" in params, "logits_to_keep" in params)

    @property
    def notes(self) -> list[str]:
        """One plain sentence per missing capability and what it costs."""
        notes = []
        if self.cache_arg is None:
            notes.append(
                "forward takes no KV cache argument (cache / past_key_values): the shared chat-template "
                "prefix is recomputed for every batch (same results, slower)"
            )
        if not self.position_ids:
            notes.append(
                "forward takes no position_ids: left-padded batches rely on the model's own handling of "
                "padding for positions"
            )
        if not self.logits_to_keep:
            notes.append("forward takes no logits_to_keep: logits of every position are computed (more memory)")
        return notes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "notes": self.notes}


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned, under either of its names."""
    for name in CACHE_ARGS:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


@dataclass
class LoadedModel:
    """A causal LM ready for capture and editing. ``source`` is what the user named.

    ``template_kwargs`` go to the chat template (e.g. ``{"enable_thinking": False}``);
    ``response_prefix`` is appended after the generation prompt, for models whose replies open
    with a fixed preamble. Both apply to capture, scoring and generation alike.
    """

    model: nn.Module
    tokenizer: Any
    anatomy: Anatomy
    source: str
    local_path: Path | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    response_prefix: str = ""
    caps: ForwardCapabilities = field(init=False)

    def __post_init__(self) -> None:
        self.caps = ForwardCapabilities.of(self.model)
        for note in self.caps.notes:
            warnings.warn(f"{type(self.model).__name__}: {note}", CapabilityWarning, stacklevel=3)

    def with_prompt_format(
        self, disable_thinking: bool | None = None, response_prefix: str | None = None
    ) -> LoadedModel:
        """Turn the template's thinking off (``enable_thinking=False``) and/or set :attr:`response_prefix`, as
        ``--disable-thinking``/``--response-prefix`` say; what is not given is left as it is. Returns the model."""
        if disable_thinking:
            self.template_kwargs["enable_thinking"] = False
        if response_prefix:
            self.response_prefix = response_prefix
        return self

    @property
    def name(self) -> str:
        return self.source

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's execution device. With accelerate offload (``device_map``
        with ``"cpu"``/``"disk"`` entries) the weight sits on the meta device or the CPU while the module
        runs on the main device; its dispatch hook knows which."""
        return execution_device(self.model, self.anatomy.embeddings[0].module)

    @property
    def quantized(self) -> bool:
        """True when some residual writer is stored quantized (bitsandbytes 4/8-bit): not editable in place."""
        return any(not w.weight.dtype.is_floating_point for w in self.anatomy.all_writers())

    @property
    def offloaded(self) -> bool:
        """True when some weights live off the execution devices (accelerate CPU/disk offload), so they
        cannot be edited in place; write an edited copy with :func:`abliterate.stream_orthogonalize`."""
        return any(is_offloaded(m) for m in self.model.modules())

    @property
    def dtype(self) -> torch.dtype:
        return self.anatomy.embeddings[0].weight.dtype

    @property
    def num_layers(self) -> int:
        return self.anatomy.num_layers

    @property
    def hidden_size(self) -> int:
        return self.anatomy.hidden_size

    def format(self, prompts: Sequence[str], *, system: str | None = None) -> list[str]:
        """Apply the chat template to each user prompt, ending where the assistant's reply begins.

        ``template_kwargs`` are passed to the template (Qwen3's ``enable_thinking=False`` writes an empty
        thinking block into the generation prompt) and ``response_prefix`` is appended after it. Capture,
        scoring, generation and evaluation all format through here, so both apply everywhere. Messages take the
        shape the template renders (a string, or a list of text parts for many vision-language templates).
        """
        style = content_style(self.tokenizer, self.template_kwargs, system)
        texts = []
        for prompt in prompts:
            text = self.tokenizer.apply_chat_template(
                messages(prompt, system, style), tokenize=False, add_generation_prompt=True, **self.template_kwargs
            )
            texts.append(text + self.response_prefix)
        return texts

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenize already-formatted texts with left padding, on the model's input device."""
        batch = self.tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def forward(
        self, batch: dict[str, torch.Tensor], *, all_logits: bool = False, cache: Any = None, **kwargs: Any
    ) -> Any:
        """One forward pass over a left-padded batch.

        Position ids count real tokens only, so left padding never shifts absolute position
        embeddings (GPT-2); logits are computed for the last position only unless ``all_logits``.
        ``cache`` (a KV cache) is passed under the name this model's forward takes; read the returned
        one with :func:`output_cache`.
        """
        if cache is not None:
            if self.caps.cache_arg is None:
                raise TypeError(f"{type(self.model).__name__}.forward takes no KV cache")
            kwargs[self.caps.cache_arg] = cache
        if self.caps.position_ids and "position_ids" not in kwargs:
            kwargs["position_ids"] = (batch["attention_mask"].long().cumsum(-1) - 1).clamp_min(0)
        if not all_logits and self.caps.logits_to_keep:
            kwargs.setdefault("logits_to_keep", 1)
        return self.model(**batch, **kwargs)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 64,
        min_new_tokens: int = 0,
        system: str | None = None,
        batch_size: int = 8,
        progress: Progress | None = None,
    ) -> list[str]:
        """Greedy responses to ``prompts`` (formatted by :meth:`format`), decoded without special tokens:
        up to ``max_new_tokens`` new tokens, and at least ``min_new_tokens`` (end-of-sequence is held back
        until then). A ``response_prefix`` is part of the prompt, not of the returned response."""
        ids = self.generate_ids(
            prompts,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            system=system,
            batch_size=batch_size,
            progress=progress,
        )
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def eos_ids(self) -> set[int]:
        """The token ids that end an answer (the generation config's, else the tokenizer's)."""
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    @torch.inference_mode()
    def generate_ids(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 64,
        min_new_tokens: int = 0,
        system: str | None = None,
        batch_size: int = 8,
        progress: Progress | None = None,
    ) -> list[list[int]]:
        """The new token ids of :meth:`generate`'s greedy answers, each up to and including its first
        end-of-sequence token (the padding after it removed)."""
        if not prompts:
            raise PromptError("no prompts to generate from; pass at least one prompt")
        texts = self.format(prompts, system=system)
        eos = self.eos_ids()
        out: list[list[int]] = []
        for start in range(0, len(texts), batch_size):
            batch = self.encode(texts[start : start + batch_size])
            ids = self.model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens or None,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            for row in ids[:, batch["input_ids"].shape[1] :].tolist():
                end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
                out.append(row[:end])
            if progress:
                progress(len(out), len(texts))
        return out

    def save(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """Write the (edited) model and tokenizer to ``out`` atomically; see :func:`save_model`."""
        from abliterate.lm.saving import save_model

        return save_model(self, out, overwrite=overwrite)
