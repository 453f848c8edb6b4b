"""Prompts reach the model in the message shape its chat template renders: a string, or (many vision-language
templates: LLaVA, Idefics3/SmolVLM) a list of typed parts. Handed a string, such a template iterates over its
characters and renders no text at all, so every prompt would silently become an empty turn."""

from __future__ import annotations

import pytest
import torch
from test_vlm import tiny_llava
from tiny import HARMFUL, HARMLESS, tiny_tokenizer

from abliterate import ChatTemplateError, capture, load_model
from abliterate.lm import from_pretrained_objects

# A LLaVA-style template: images first, then the text parts; a string content renders nothing.
PARTS_ONLY = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# Gemma 2-style: no system role.
NO_SYSTEM = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start>{{ message['role'] }}\n{{ message['content'] }}<end>\n{% endfor %}"
    "{% if add_generation_prompt %}<start>model\n{% endif %}"
)
# Parts for the user, but the system content printed as it is: a list of parts would show as its Python repr.
USER_PARTS_ONLY = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}{% if message['role'] == 'system' %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}"
    "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
SILENT = "{% for message in messages %}{{ message['role'] }}: \n{% endfor %}ASSISTANT:"


def _lm(template: str):
    from tiny import tiny_model

    return from_pretrained_objects(tiny_model("llama"), tiny_tokenizer(template))


def test_a_parts_only_template_gets_text_parts():
    lm = _lm(PARTS_ONLY)
    (text,) = lm.format([HARMFUL[0]])
    assert text == f"USER: {HARMFUL[0]}\nASSISTANT:"
    (with_system,) = lm.format([HARMFUL[0]], system="Be brief.")
    assert with_system == f"SYSTEM: Be brief.\nUSER: {HARMFUL[0]}\nASSISTANT:"


def test_a_plain_text_template_keeps_strings():
    lm = _lm(NO_SYSTEM)
    (text,) = lm.format([HARMFUL[0]])
    assert text == f"<start>user\n{HARMFUL[0]}<end>\n<start>model\n"


def test_a_list_printed_as_text_does_not_count_as_rendered():
    lm = _lm(USER_PARTS_ONLY)
    with pytest.raises(ChatTemplateError, match="or the system prompt"):
        lm.format([HARMFUL[0]], system="Be brief.")


def test_a_template_that_drops_the_prompt_is_refused_in_one_line():
    lm = _lm(SILENT)
    with pytest.raises(ChatTemplateError, match="does not render the user's message") as exc:
        lm.format([HARMFUL[0]])
    assert "\n" not in str(exc.value)


def test_a_system_prompt_the_template_rejects_is_refused_in_one_line():
    lm = _lm(NO_SYSTEM)
    match = r"or the system prompt, .* \(it says: System role not supported\); drop the system prompt or pass"
    with pytest.raises(ChatTemplateError, match=match) as exc:
        lm.format([HARMFUL[0]], system="Be brief.")
    assert "\n" not in str(exc.value)


def test_a_vlm_with_a_parts_only_template_captures_its_prompts(tmp_path):
    """A LLaVA checkpoint whose (processor-style) template takes only parts: the captured activations differ
    between prompt sets, which they could not if every prompt rendered as the same empty turn."""
    tokenizer = tiny_tokenizer(PARTS_ONLY)
    tiny_llava(len(tokenizer) + 1).save_pretrained(tmp_path / "vlm")
    tokenizer.save_pretrained(tmp_path / "vlm")
    lm = load_model(tmp_path / "vlm")
    assert all(p in t for p, t in zip(HARMFUL[:4], lm.format(HARMFUL[:4]), strict=True))
    acts = capture(lm, HARMFUL[:4], HARMLESS[:4], batch_size=4)
    assert float((acts.harmful_mean - acts.harmless_mean).abs().max()) > 1e-4
    assert torch.isfinite(acts.harmful_mean).all()
