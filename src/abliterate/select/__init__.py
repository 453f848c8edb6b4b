"""Choosing the edit: the scorer, the sweep over candidates, subspaces, and the Optuna search with its space (search.py
and search_space.py never touch a model).
"""

from abliterate.select.scorer import Score, Scorer
from abliterate.select.search import SearchResult
from abliterate.select.search_space import SearchSpace
from abliterate.select.subspace import choose_k
from abliterate.select.sweep import Selection, select

__all__ = [
    "choose_k",
    "Score",
    "Scorer",
    "SearchResult",
    "SearchSpace",
    "select",
    "Selection",
]
