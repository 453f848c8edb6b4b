"""The unedited model's evaluation, kept across runs.

Every ``run`` evaluates the unedited model before editing it: greedy answers to the held-out prompts, its
first-token distributions, its own answers along which the multi-token KL is taken, and its perplexity. For the
same model and the same settings that work is the same each time, so it is stored once under
``<cache dir>/evaluations/<key>.pt`` (written to a temporary file, then renamed into place) and read back.

What is stored is what the *model* produced (its answers, distributions, perplexity), never a verdict: the
answers are judged again on every run, so a change of judge, markers or degenerate detector needs no new key and
can never be served a stale verdict.

The key is a sha256 over everything that changes what the model produces:

* the model's content: every parameter and buffer in memory (name, dtype, shape and bytes; storage shared by tied
  weights hashed once), its class, its config (less its path) and generation config, the dtype and device. Hashing
  the weights themselves (about 1.5 s per GB on one CPU core) is exact whatever file, copy or in-memory edit the
  model came from; a model whose weights are not all in memory (accelerate offload, the meta device) has no key
  and is evaluated afresh;
* the prompts as token ids after the chat template (so the template, its kwargs, the system prompt, the response
  prefix and the tokenizer are all in it) and the perplexity texts as token ids;
* the generation settings (min/max new tokens, batch size, multi-token KL length and its top tokens, end-of-sequence
  and padding ids);
* the versions of abliterate, torch and transformers, and this file's format.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from abliterate.evaluate.damage import AnswerReference
from abliterate.lm.model import LoadedModel
from abliterate.version import __version__

FORMAT = 1
PATH_KEYS = ("_name_or_path", "transformers_version")  # config entries that name where a model came from, not what


@dataclass
class BaseRecord:
    """What the unedited model produced for one evaluation: its answers per side, the first-token log-probs
    ``[n_harmless, vocab]``, its reference answers for the multi-token KL, and the three damage numbers measured
    on itself (close to zero KL, computed all the same)."""

    harmful: list[str]
    harmless: list[str]
    logprobs: torch.Tensor
    answers: AnswerReference
    kl: float
    kl_answer: float
    perplexity: float

    def to_state(self) -> dict[str, Any]:
        a = self.answers
        return {
            "format": FORMAT,
            "harmful": self.harmful,
            "harmless": self.harmless,
            "logprobs": self.logprobs,
            "answers": {"answers": a.answers, "top_ids": a.top_ids, "top_logp": a.top_logp, "rest_logp": a.rest_logp},
            "k": a.k,
            "numbers": [self.kl, self.kl_answer, self.perplexity],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> BaseRecord:
        a = state["answers"]
        answers = AnswerReference(a["answers"], a["top_ids"], a["top_logp"], a["rest_logp"], int(state["k"]))
        kl, kl_answer, ppl = (float(x) for x in state["numbers"])
        return cls(state["harmful"], state["harmless"], state["logprobs"], answers, kl, kl_answer, ppl)


def weights_digest(model: torch.nn.Module) -> str | None:
    """sha256 of every parameter and buffer (name, dtype, shape, bytes), each storage once; None when some tensor
    is not in memory (meta device: offloaded or not loaded)."""
    h = hashlib.sha256()
    seen: set[tuple[str, int]] = set()
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        t = tensor.detach()
        if t.device.type == "meta":
            return None
        where = (str(t.device), t.data_ptr())
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if where in seen and t.numel():
            continue  # a tied weight: its bytes are already in
        seen.add(where)
        h.update(memoryview(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _ids_digest(rows: Sequence[Sequence[int]]) -> str:
    return hashlib.sha256(json.dumps([list(r) for r in rows]).encode()).hexdigest()


def cache_key(lm: LoadedModel, inputs: dict[str, Sequence[Sequence[int]]], settings: dict[str, Any]) -> str | None:
    """The key of one base evaluation (see the module's docstring), or None when the model has none."""
    weights = weights_digest(lm.model)
    if weights is None:
        return None
    config = {k: v for k, v in lm.model.config.to_dict().items() if k not in PATH_KEYS}
    generation = getattr(lm.model, "generation_config", None)
    material = {
        "format": FORMAT,
        "versions": [__version__, torch.__version__, transformers.__version__],
        "class": type(lm.model).__name__,
        "config": config,
        "attention": getattr(lm.model.config, "_attn_implementation", None),
        "generation_config": None if generation is None else generation.to_diff_dict(),
        "weights": weights,
        "dtype": str(lm.dtype),
        "device": str(lm.device),
        "inputs": {name: _ids_digest(rows) for name, rows in sorted(inputs.items())},
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=repr).encode()).hexdigest()


def load(folder: Path, key: str) -> BaseRecord | None:
    """The record stored under ``key``, or None when there is none (or it cannot be read: it is then recomputed)."""
    path = folder / f"{key}.pt"
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != FORMAT:
            return None
        return BaseRecord.from_state(state)
    except Exception:  # a truncated or foreign file is a miss, never an error: the evaluation runs again
        return None


def store(folder: Path, key: str, record: BaseRecord) -> str:
    """Write ``record`` under ``key`` atomically (a temporary file in the same folder, renamed into place); returns
    "" or, when the folder cannot be written, why (the run goes on: the next one evaluates again)."""
    path = folder / f"{key}.pt"
    tmp = folder / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(record.to_state(), tmp)
        os.replace(tmp, path)
    except OSError as exc:
        return f"the unedited model's evaluation was not cached ({folder}: {exc.strerror or exc})"
    finally:
        with contextlib.suppress(OSError):  # nothing to remove, or a folder that never was
            tmp.unlink(missing_ok=True)
    return ""
