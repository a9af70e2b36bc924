"""The OpenAI wire format: request bodies checked by hand, responses, stream chunks, errors.

Requests are read as the OpenAI API documents them and turned into inferd's generation
parameters (``max_tokens`` is ``max_new_tokens``). What inferd cannot honour is refused with a
400 that names the parameter (``n`` other than 1, ``logprobs``, penalties, tools...), as is
any parameter the API does not have; parameters that change nothing (``user``) are accepted.
Errors are ``{"error": {"message", "type", "param", "code"}}``; ``code`` is inferd's error
code. See docs/protocols.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import orjson

from inferd.errors import BadRequest, InferdError, ModelNotFound
from inferd.generation.chat import ROLES
from inferd.models.textgen import FinishReason

__all__ = [
    "ChatBody",
    "CompletionBody",
    "InvalidParameter",
    "UnknownModel",
    "chat_chunk",
    "chat_doc",
    "completion_chunk",
    "completion_doc",
    "error_doc",
    "finish_reason",
    "parse_chat",
    "parse_completion",
    "sse",
]

DONE = b"data: [DONE]\n\n"
_MAX_SEED = 2**64 - 1

_COMMON = frozenset(
    {
        "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "n", "stop",
        "seed", "user", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
        "top_k",
    }
)  # fmt: skip
_COMPLETION = _COMMON | {"prompt", "echo", "best_of", "suffix"}
_CHAT = _COMMON | {
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
    "tool_choice", "functions", "function_call", "parallel_tool_calls",
}  # fmt: skip


class InvalidParameter(BadRequest):
    """A request parameter inferd cannot take; ``param`` names it."""

    code = "invalid_parameter"

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class UnknownModel(ModelNotFound):
    """The ``model`` named is not served (404)."""

    param = "model"


@dataclass(frozen=True, slots=True)
class _Body:
    model: str
    stream: bool
    include_usage: bool
    parameters: dict[str, Any] = field(default_factory=dict)
    """inferd's generation parameters: max_new_tokens, temperature, top_p, top_k, seed, stop."""


@dataclass(frozen=True, slots=True)
class CompletionBody(_Body):
    prompt: str | list[int] = ""
    """The prompt as text, or as token ids."""


@dataclass(frozen=True, slots=True)
class ChatBody(_Body):
    messages: list[dict[str, str]] = field(default_factory=list)
    """``{"role", "content"}`` with the content as one string."""


# ---------------------------------------------------------------------------------- requests
def parse_completion(body: bytes) -> CompletionBody:
    """``POST /v1/completions``."""
    doc = _object(body)
    _known(doc, _COMPLETION)
    _refuse(doc, "echo", lambda v: v not in (None, False), "echo is not supported")
    _refuse(doc, "best_of", lambda v: v not in (None, 1), "best_of must be 1")
    _refuse(doc, "suffix", lambda v: v not in (None, ""), "suffix (insertion) is not supported")
    model, stream, include_usage, parameters = _common(doc)
    return CompletionBody(model, stream, include_usage, parameters, _prompt(doc))


def parse_chat(body: bytes) -> ChatBody:
    """``POST /v1/chat/completions``."""
    doc = _object(body)
    _known(doc, _CHAT)
    for name in ("tools", "functions"):
        _refuse(doc, name, lambda v: v not in (None, []), f"{name} (tool calls) are not supported")
    for name in ("tool_choice", "function_call"):
        _refuse(doc, name, lambda v: v not in (None, "none"), f"{name} is not supported")
    _refuse(doc, "top_logprobs", lambda v: v not in (None, 0), "top_logprobs is not supported")
    _refuse(
        doc,
        "response_format",
        lambda v: v is not None and v != {"type": "text"},
        'response_format must be {"type": "text"}; structured output is not supported',
    )
    model, stream, include_usage, parameters = _common(doc)
    limit = doc.get("max_completion_tokens")
    if limit is not None:
        given = _integer(limit, "max_completion_tokens", 1, None)
        if parameters.get("max_new_tokens", given) != given:
            raise InvalidParameter(
                "max_tokens and max_completion_tokens differ; send one of them",
                "max_completion_tokens",
            )
        parameters["max_new_tokens"] = given
    return ChatBody(model, stream, include_usage, parameters, _messages(doc.get("messages")))


def _object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise InvalidParameter("the request body is empty; send a JSON object", None)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidParameter(f"the request body is not valid JSON: {exc}", None) from None
    if not isinstance(doc, dict):
        raise InvalidParameter("the request body must be a JSON object", None)
    return doc


def _known(doc: dict[str, Any], allowed: frozenset[str] | set[str]) -> None:
    for name in doc:
        if name not in allowed:
            raise InvalidParameter(f"Unrecognized request argument supplied: {name}", name)


def _refuse(doc: dict[str, Any], name: str, bad: Any, message: str) -> None:
    if name in doc and bad(doc[name]):
        raise InvalidParameter(message, name)


def _common(doc: dict[str, Any]) -> tuple[str, bool, bool, dict[str, Any]]:
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidParameter("model is required: the name of a served text model", "model")
    stream = _flag(doc.get("stream"), "stream")
    options = doc.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise InvalidParameter(
                "stream_options is only allowed when stream is true", "stream_options"
            )
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise InvalidParameter(
                'stream_options must be {"include_usage": true|false}', "stream_options"
            )
        include_usage = _flag(options.get("include_usage"), "stream_options.include_usage")
    n = doc.get("n")
    if n is not None and (_integer(n, "n", 1, None) != 1):
        raise InvalidParameter(
            f"n must be 1 (got {n}): inferd returns one choice per request; send several "
            "requests for several choices",
            "n",
        )
    for name in ("presence_penalty", "frequency_penalty"):
        value = doc.get(name)
        if value is not None and _number(value, name) != 0:
            raise InvalidParameter(f"{name} is not supported; leave it out or send 0", name)
    _refuse(doc, "logit_bias", lambda v: v not in (None, {}), "logit_bias is not supported")
    _refuse(doc, "logprobs", lambda v: v not in (None, False, 0), "logprobs is not supported")
    user = doc.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidParameter("user must be a string", "user")

    parameters: dict[str, Any] = {}
    if doc.get("max_tokens") is not None:
        parameters["max_new_tokens"] = _integer(doc["max_tokens"], "max_tokens", 1, None)
    if doc.get("temperature") is not None:
        temperature = _number(doc["temperature"], "temperature")
        if not 0 <= temperature <= 2:
            raise InvalidParameter(
                f"temperature must be from 0 to 2, got {temperature}", "temperature"
            )
        parameters["temperature"] = temperature
    if doc.get("top_p") is not None:
        top_p = _number(doc["top_p"], "top_p")
        if not 0 < top_p <= 1:
            raise InvalidParameter(f"top_p must be in (0, 1], got {top_p}", "top_p")
        parameters["top_p"] = top_p
    if doc.get("top_k") is not None:
        parameters["top_k"] = _integer(doc["top_k"], "top_k", 0, None)
    if doc.get("seed") is not None:
        parameters["seed"] = _integer(doc["seed"], "seed", 0, _MAX_SEED)
    stop = doc.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise InvalidParameter("stop must be a string or a list of strings", "stop")
        if stops:
            parameters["stop"] = stops
    return model, stream, include_usage, parameters


def _prompt(doc: dict[str, Any]) -> str | list[int]:
    if "prompt" not in doc:
        raise InvalidParameter("prompt is required", "prompt")
    prompt = doc["prompt"]
    if isinstance(prompt, str):
        return prompt
    tokens = _token_ids(prompt)
    if tokens is not None:
        return tokens
    if isinstance(prompt, list) and len(prompt) == 1:
        (only,) = prompt
        if isinstance(only, str):
            return only
        tokens = _token_ids(only)
        if tokens is not None:
            return tokens
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise InvalidParameter(
            f"prompt holds {len(prompt)} prompts; inferd takes one prompt per request", "prompt"
        )
    raise InvalidParameter(
        "prompt must be a string, or a list of token ids (a list with one of either is "
        "accepted too)",
        "prompt",
    )


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise InvalidParameter("messages must be a non-empty list of messages", "messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidParameter(f"{where} must be an object with role and content", where)
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise InvalidParameter(
                f"{where}.{sorted(extra)[0]} is not supported (tool calls and audio are not)",
                f"{where}.{sorted(extra)[0]}",
            )
        role = message.get("role")
        if role not in ROLES:
            raise InvalidParameter(
                f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role"
            )
        entry = {"role": str(role), "content": _content(message.get("content"), where)}
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise InvalidParameter(f"{where}.name must be a string", f"{where}.name")
            entry["name"] = name
        messages.append(entry)
    return messages


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidParameter(
                    f"{where}.content[{j}] must be a text part ({{'type': 'text', 'text': ...}})"
                    "; images and audio are not supported",
                    f"{where}.content",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidParameter(
                    f"{where}.content[{j}].text must be a string", f"{where}.content"
                )
            texts.append(text)
        return "".join(texts)
    raise InvalidParameter(
        f"{where}.content must be a string or a list of text parts", f"{where}.content"
    )


def _flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidParameter(f"{name} must be true or false", name)
    return value


def _token_ids(value: Any) -> list[int] | None:
    """A non-empty list of integers (3.0 is 3 in JSON), or None."""
    if not isinstance(value, list) or not value:
        return None
    ids = [int(t) if isinstance(t, float) and t.is_integer() else t for t in value]
    return ids if all(_is_int(t) for t in ids) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(value: Any, name: str, low: int, high: int | None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 3.0 is the integer 3 in JSON
    if not _is_int(value):
        raise InvalidParameter(f"{name} must be an integer", name)
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise InvalidParameter(f"{name} must be {bound}, got {value}", name)
    return int(value)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidParameter(f"{name} must be a number", name)
    if not math.isfinite(value):
        raise InvalidParameter(f"{name} must be a finite number", name)
    return float(value)


# ---------------------------------------------------------------------------------- responses
def finish_reason(reason: FinishReason | None) -> str | None:
    """OpenAI's finish reason: ``stop`` (end of text or a stop string) or ``length``."""
    if reason in ("eos", "stop"):
        return "stop"
    return None if reason is None else "length"


def usage_doc(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_doc(
    head: dict[str, Any], text: str, reason: str | None, usage: dict[str, int]
) -> dict[str, Any]:
    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": reason}
    return {
        "id": head["id"],
        "object": "text_completion",
        **head,
        "choices": [choice],
        "usage": usage,
    }


def completion_chunk(head: dict[str, Any], text: str, reason: str | None) -> dict[str, Any]:
    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": reason}
    return {"id": head["id"], "object": "text_completion", **head, "choices": [choice]}


def chat_doc(
    head: dict[str, Any], text: str, reason: str | None, usage: dict[str, int]
) -> dict[str, Any]:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": reason,
    }
    return {
        "id": head["id"],
        "object": "chat.completion",
        **head,
        "choices": [choice],
        "usage": usage,
    }


def chat_chunk(head: dict[str, Any], delta: dict[str, str], reason: str | None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    return {"id": head["id"], "object": "chat.completion.chunk", **head, "choices": [choice]}


def sse(doc: dict[str, Any]) -> bytes:
    """One event of an OpenAI stream."""
    return b"data: " + orjson.dumps(doc) + b"\n\n"


# ---------------------------------------------------------------------------------- errors
_TYPES = {
    401: "authentication_error",
    403: "permission_error",
}


def error_doc(error: InferdError) -> tuple[int, dict[str, Any]]:
    """``(status, body)`` of an error in OpenAI's shape. A request that was read but is
    invalid (inferd's 422) is OpenAI's 400."""
    status = 400 if error.status_code == 422 else error.status_code
    if status == 429:
        kind = "insufficient_quota" if error.code == "quota_exceeded" else "rate_limit_error"
    elif status >= 500:
        kind = "server_error"
    else:
        kind = _TYPES.get(status, "invalid_request_error")
    param = getattr(error, "param", None)
    body = {"error": {"message": error.message, "type": kind, "param": param, "code": error.code}}
    return status, body
