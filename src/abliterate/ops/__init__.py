"""Tensor mathematics with no model knowledge: forward hooks, device placement, the projection kernel."""

from abliterate.ops.hooks import HookSet
from abliterate.ops.kernel import project_out
from abliterate.ops.placement import execution_device, is_offloaded

__all__ = [
    "execution_device",
    "HookSet",
    "is_offloaded",
    "project_out",
]
