"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random qwen2 model and its tokenizer, saved as a local model folder."""
    from tiny import tiny_model, tiny_tokenizer

    path = tmp_path_factory.mktemp("qwen2") / "model"
    tiny_model("qwen2").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
