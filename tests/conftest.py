"""Fixtures shared by several test files."""

from __future__ import annotations

import os
import uuid

import pytest


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random qwen2 model and its tokenizer, saved as a local model folder."""
    from tiny import tiny_model, tiny_tokenizer

    path = tmp_path_factory.mktemp("qwen2") / "model"
    tiny_model("qwen2").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def own_evaluation_cache(monkeypatch, tmp_path_factory):
    """Each test its own cross-run evaluation cache (never the user's): a scripted or earlier test's answers are
    never served to another test."""
    from abliterate.run import pipeline

    folder = tmp_path_factory.getbasetemp() / f"evaluations-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(pipeline, "eval_cache_dir", lambda: folder)
    return folder


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per core, at most 4 (each holds its own torch and models in memory)."""
    return max(1, min(os.cpu_count() or 1, 4))


def pytest_configure(config) -> None:
    """Under pytest-xdist, share the cores among the workers instead of each torch taking all of them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
