"""Where modules compute when accelerate dispatches a model (``device_map``, CPU/disk offload).

A dispatched module's weight may sit on the meta device (offloaded to disk) or on the CPU while the
module runs on a GPU; the accelerate hook attached to it (or to an ancestor) names its execution device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def flat_hooks(module: nn.Module) -> list[Any]:
    """The accelerate hooks on ``module``, with a ``SequentialHook`` flattened."""
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else [hook, *getattr(hook, "hooks", ())]


def is_offloaded(module: nn.Module) -> bool:
    """True when ``module``'s own weights live off its execution device: on the meta device (offloaded to
    disk) or behind an accelerate hook that loads them in for each call (CPU offload)."""
    return any(p.device.type == "meta" for p in module.parameters(recurse=False)) or any(
        getattr(h, "offload", False) for h in flat_hooks(module)
    )


def hook_device(module: nn.Module) -> torch.device | None:
    """The execution device of an accelerate dispatch hook on ``module`` itself, if any."""
    for h in flat_hooks(module):
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return None


def execution_device(model: nn.Module, module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its own or its nearest ancestor's dispatch hook, else its weight's."""
    name = next((n for n, m in model.named_modules() if m is module), "")
    parts = name.split(".") if name else []
    for k in range(len(parts), -1, -1):
        found = hook_device(model.get_submodule(".".join(parts[:k])))
        if found is not None:
            return found
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
