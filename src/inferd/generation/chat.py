"""Chat messages to one prompt: the tokenizer's chat template where it has one, else a plain
transcript.

The transcript (for models saved without a chat template, such as GPT-2) is one line per
message, ``<role>: <content>``, then ``assistant:`` for the reply::

    system: You answer in one sentence.
    user: What is the capital of France?
    assistant:

and generation also ends before ``"\\nuser:"``, so that a model continuing the transcript does
not write the user's next turn. See docs/protocols.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inferd.errors import ValidationFailed

__all__ = ["ROLES", "TRANSCRIPT_STOP", "ChatPrompt", "render_chat"]

ROLES = ("system", "developer", "user", "assistant")
"""The roles a message may have (``developer`` is what newer clients call ``system``)."""

TRANSCRIPT_STOP = "\nuser:"
"""Where a reply written as a transcript ends."""

_ERROR_CHARS = 300


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """A conversation rendered for the model."""

    text: str
    templated: bool
    """True when the tokenizer's chat template wrote it: it holds its own special tokens, so
    it is tokenized without adding more."""
    stop: tuple[str, ...]
    """Stop strings the rendering implies (the transcript's next user turn)."""


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> ChatPrompt:
    """Render ``messages`` (``{"role", "content"}``, already checked) for ``tokenizer``'s model.
    Blocking (a template is Jinja); raises ValidationFailed when the template refuses the
    conversation (many insist that roles alternate)."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja2's TemplateError, or raise_exception() in a template
            message = " ".join(str(exc).split())[:_ERROR_CHARS]
            raise ValidationFailed(
                f"the model's chat template refused these messages: {message}"
            ) from exc
        if not isinstance(text, str):
            raise ValidationFailed("the model's chat template did not render to text")
        return ChatPrompt(text, True, ())
    lines = [f"{_transcript_role(m['role'])}: {m['content']}" for m in messages]
    return ChatPrompt("\n".join([*lines, "assistant:"]), False, (TRANSCRIPT_STOP,))


def _transcript_role(role: str) -> str:
    return "system" if role == "developer" else role
