"""Chat templates: the model's own (its tokenizer's ``chat_template``) or the user's Jinja file."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class ChatError(ValueError):
    """Bad chat input: a conversation, template or data shape that cannot be used; names the fix."""


def load_template(path: str | Path | None) -> str | None:
    """The Jinja chat template in ``path`` (``--chat-template FILE``); None: the model's own."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise ChatError(f"chat template {path} does not exist; pass a Jinja template file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ChatError(f"chat template {path} is not UTF-8 text; pass a Jinja file") from None
    if "{%" not in text and "{{" not in text:
        raise ChatError(
            f"chat template {path} holds no Jinja tags ('{{%' or '{{{{'); it is not a chat template"
        )
    return text


def check_template(tokenizer: Any, template: str | None) -> str:
    """The template to use: ``template`` or the tokenizer's own; a model without one is refused."""
    chosen = template or getattr(tokenizer, "chat_template", None)
    if not chosen:
        raise ChatError(
            "this model's tokenizer has no chat template; pass one with --chat-template FILE "
            "(template=... in Python)"
        )
    return chosen


def render(
    tokenizer: Any,
    messages: list[dict[str, str]],
    template: str | None = None,
    *,
    add_generation_prompt: bool = False,
) -> str:
    """``messages`` as the model's chat text (``add_generation_prompt``: end with the assistant's
    header, ready for generation)."""
    return tokenizer.apply_chat_template(
        messages,
        chat_template=check_template(tokenizer, template),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
