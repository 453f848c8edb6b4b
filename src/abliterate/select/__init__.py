"""Choosing the edit: the scorer, the sweep over candidates, subspaces, and the Optuna search with its space (search.py
and search_space.py never touch a model).
"""
