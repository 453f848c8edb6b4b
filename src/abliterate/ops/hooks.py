"""Forward hooks as a context manager: registered with ``prepend=True``, always removed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

TensorFn = Callable[[torch.Tensor], torch.Tensor]


def first_tensor(output: Any) -> torch.Tensor:
    """Decoder layers return a bare tensor in transformers 5, a tuple in older code."""
    return output if isinstance(output, torch.Tensor) else output[0]


def replace_first(output: Any, value: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return value
    return (value, *tuple(output)[1:])


class HookSet:
    """A set of hooks that is removed as a whole on ``close()`` or when the ``with`` block exits.

    Hooks are prepended so that they run before hooks transformers adds itself (which record
    ``output_hidden_states``); otherwise recorded hidden states would be un-edited.
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._handles)

    def close(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def on_output(self, module: nn.Module, fn: TensorFn) -> None:
        """Replace the module's (first) output by ``fn(output)``."""

        def hook(_m: nn.Module, _args: Any, output: Any) -> Any:
            return replace_first(output, fn(first_tensor(output)))

        self._handles.append(module.register_forward_hook(hook, prepend=True))

    def on_input(self, module: nn.Module, fn: TensorFn) -> None:
        """Replace the module's hidden-states input (first positional or ``hidden_states=``)."""

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            kwargs["hidden_states"] = fn(kwargs["hidden_states"])
            return args, kwargs

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))

    def watch_input(self, module: nn.Module, fn: Callable[[torch.Tensor], None]) -> None:
        """Call ``fn`` with the module's hidden-states input, changing nothing. Observers run after
        every editing hook, so they see what the module really receives."""

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            fn(args[0] if args else kwargs["hidden_states"])

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def watch_output(self, module: nn.Module, fn: Callable[[torch.Tensor], None]) -> None:
        def hook(_m: nn.Module, _args: Any, output: Any) -> None:
            fn(first_tensor(output))

        self._handles.append(module.register_forward_hook(hook))
