"""Chat messages in the shape a model's chat template reads. Text-only templates take a string as a message's
content; many vision-language templates (LLaVA, Idefics3/SmolVLM, ...) take a list of typed parts and, handed a
string, iterate over its characters and render nothing: the prompt would silently vanish. A sentinel rendered once
per call decides which shape shows the text, and a template that shows neither is refused."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jinja2 import TemplateError

from abliterate.errors import ChatTemplateError

SENTINEL = "abliterate-sentinel-7f3a"
STYLES = ("text", "parts")


def content(text: str, style: str) -> str | list[dict[str, str]]:
    return text if style == "text" else [{"type": "text", "text": text}]


def messages(prompt: str, system: str | None, style: str) -> list[dict[str, Any]]:
    out = [{"role": "system", "content": content(system, style)}] if system else []
    return [*out, {"role": "user", "content": content(prompt, style)}]


def content_style(tokenizer: Any, kwargs: Mapping[str, Any], system: str | None = None) -> str:
    """``"text"`` or ``"parts"``: the first message shape whose user text (and system text, when one is given)
    the template renders. Raises :class:`ChatTemplateError` when neither shows them."""
    error = ""
    for style in STYLES:
        probe = messages(SENTINEL + "-user", SENTINEL + "-system" if system else None, style)
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True, **kwargs)
        except (TemplateError, TypeError, KeyError, ValueError, AttributeError) as exc:
            error = f" (it says: {str(exc).strip().splitlines()[0]})" if str(exc).strip() else ""
            continue
        if _shows(text, SENTINEL + "-user") and (not system or _shows(text, SENTINEL + "-system")):
            return style
    what = "the user's message" + (" or the system prompt" if system else "")
    fix = "drop the system prompt or pass" if system else "pass"
    raise ChatTemplateError(
        f"the chat template does not render {what}, neither as plain text nor as a list of text parts{error}; "
        f"{fix} a chat template that does (chat_template= in load_model or the config file)"
    )


def _shows(text: str, sentinel: str) -> bool:
    """``sentinel`` rendered as text, not inside the printed form of a list of parts."""
    return sentinel in text and f"'text': '{sentinel}" not in text and f'"text": "{sentinel}' not in text
