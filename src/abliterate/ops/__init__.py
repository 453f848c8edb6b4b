"""Tensor mathematics with no model knowledge: forward hooks, device placement, the projection kernel."""
