"""The head-to-head bench's fairness helpers (issue 23, point 8): the system text that renders a chat template as no
system message (what heretic and abliterix are given), and bench/heldout.py's answer KL."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.tiny import HARMLESS, tiny_model, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import heldout  # noqa: E402
from peers import template_default_system  # noqa: E402

DEFAULT = "You are Tiny, a helpful assistant."
WITH_DEFAULT = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set rest = messages[1:] %}"
    "{% else %}{% set sys = '" + DEFAULT + "' %}{% set rest = messages %}{% endif %}"
    "<|im_start|>system\n{{ sys }}<|im_end|>\n"
    "{% for m in rest %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_SYSTEM_ROLE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _saved(tmp_path: Path, template: str) -> str:
    tiny_tokenizer(template).save_pretrained(tmp_path)
    return str(tmp_path)


def test_template_default_system_is_the_text_that_renders_as_none(tmp_path: Path) -> None:
    assert template_default_system(_saved(tmp_path / "a", WITH_DEFAULT)) == DEFAULT


def test_template_without_a_system_role_has_no_matching_text(tmp_path: Path) -> None:
    assert template_default_system(_saved(tmp_path / "b", NO_SYSTEM_ROLE)) is None


def test_answer_kl_is_zero_for_the_base_and_positive_for_another_model() -> None:
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    base, other = tiny_model("qwen2", seed=0).eval(), tiny_model("qwen2", seed=1).eval()
    ref = heldout.answer_reference(tok, base, HARMLESS[:4], 6, 2)
    assert all(1 <= len(a) <= 6 for a in ref["answers"])
    same = heldout.answer_kl(tok, base, HARMLESS[:4], ref, 2)
    assert torch.allclose(same, torch.zeros(4), atol=1e-5)
    assert bool((heldout.answer_kl(tok, other, HARMLESS[:4], ref, 2) > 1e-3).all())
