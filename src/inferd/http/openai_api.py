"""The OpenAI-compatible API of text models, under ``/openai/v1``.

``POST /openai/v1/completions``, ``POST /openai/v1/chat/completions`` (``stream: true`` is
Server-Sent Events in OpenAI's chunk format, ending with ``data: [DONE]``) and
``GET /openai/v1/models``, so that the ``openai`` SDK works with
``base_url="http://host:port/openai/v1"`` and nothing else changed. The prefix keeps inferd's
own ``GET /v1/models`` (a different shape) where it is.

Generation goes through the version's continuous-batching scheduler by way of
:meth:`inferd.serving.DataPlane.generate` (admission, budget, metrics); this module parses the
request (:mod:`inferd.http.openai_codec`), prepares the prompt and renders the answer. A model
is named ``"<name>"`` (its default version) or ``"<name>:<version>"``. See docs/protocols.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect

from inferd.concurrency import run_blocking
from inferd.errors import (
    InferdError,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)
from inferd.generation import GenerationRequest, Step
from inferd.generation.chat import ROLES, ChatPrompt, render_chat
from inferd.http import openai_codec as codec
from inferd.http.context import disconnect_probe
from inferd.http.responses import method_not_allowed
from inferd.models.loading import LoadedModel
from inferd.serving import ClientGone, DataPlane, RequestContext
from inferd.settings import Settings

__all__ = ["PREFIX", "OpenAIErrorShape", "OpenAIService", "build_openai_router"]

PREFIX = "/openai/v1"
_JSON = "application/json"
_OWNER = "inferd"
_PARAMETER = re.compile(r"parameters\.(\w+)")
_OPENAI_NAMES = {"max_new_tokens": "max_tokens"}


class OpenAIService:
    """The routes' work over the registry; :func:`build_openai_router` mounts them."""

    def __init__(self, plane: DataPlane, settings: Settings) -> None:
        self.plane = plane
        self.registry = plane.registry
        self.max_body = settings.max_body_bytes

    # ------------------------------------------------------------------ models
    def lookup(self, model_id: str) -> LoadedModel:
        """The served version named by ``model_id`` (``name`` or ``name:version``)."""
        name, _, version = model_id.partition(":")
        wanted: int | None = None
        if version:
            if not version.isdigit() or int(version) < 1:
                raise codec.UnknownModel(f"model {model_id!r}: a version is a positive integer")
            wanted = int(version)
        try:
            loaded = self.registry.get(name, wanted)
        except ModelNotFound as exc:
            raise codec.UnknownModel(exc.message) from None
        if loaded.scheduler is None:
            # Not in this API's list of models: a 404, as OpenAI answers for a model it lacks.
            raise codec.UnknownModel(
                f"model {name!r} is not a text-generation model of the transformers runtime; "
                "the OpenAI-compatible API serves those only (GET /openai/v1/models lists them)"
            )
        return loaded

    def models(self) -> dict[str, Any]:
        """``GET /models``: each text model by name (its default version) and each served
        version as ``name:version``."""
        data = []
        for name in sorted({m.name for m in self.registry.all()}):
            versions = [m for m in self.registry.versions(name) if m.scheduler is not None]
            if not versions:
                continue
            default = self.registry.default_version(name)
            chosen = next((m for m in versions if m.version == default), versions[-1])
            data.append(_model_entry(name, chosen))
            data.extend(_model_entry(f"{name}:{m.version_str}", m) for m in versions)
        return {"object": "list", "data": data}

    def model(self, model_id: str) -> dict[str, Any]:
        return _model_entry(model_id, self.lookup(model_id))

    # ------------------------------------------------------------------ generation
    async def completions(self, request: Request, ctx: RequestContext) -> Response:
        body = codec.parse_completion(await self.read_body(request))
        return await self._answer(request, ctx, body, chat=False)

    async def chat_completions(self, request: Request, ctx: RequestContext) -> Response:
        body = codec.parse_chat(await self.read_body(request))
        return await self._answer(request, ctx, body, chat=True)

    async def _prepare(
        self, body: codec.CompletionBody | codec.ChatBody, ctx: RequestContext
    ) -> tuple[LoadedModel, GenerationRequest]:
        """The version to run and the request for it: the prompt rendered and tokenized by
        that version's tokenizer, in a thread."""
        for _ in range(2):
            loaded = self.lookup(body.model)
            ctx.model, ctx.version = loaded.name, loaded.version_str
            assert loaded.scheduler is not None
            loaded.scheduler.check_admission()  # shed before the prompt is tokenized
            if isinstance(body, codec.ChatBody):
                chat = await run_blocking(_render, loaded, body.messages)
                prepared = await run_blocking(_tokenize, loaded, chat, body.parameters, "messages")
            else:
                prepared = await run_blocking(
                    _tokenize, loaded, body.prompt, body.parameters, "prompt"
                )
            if loaded.ready:
                break
            # Swapped for another version meanwhile: prepare again for the one serving now.
        return loaded, prepared

    async def _answer(
        self,
        request: Request,
        ctx: RequestContext,
        body: codec.CompletionBody | codec.ChatBody,
        chat: bool,
    ) -> Response:
        loaded, prepared = await self._prepare(body, ctx)
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{ctx.request_id}",
            "created": int(time.time()),
            "model": body.model,
            "system_fingerprint": f"inferd-{loaded.name}-{loaded.version_str}",
        }
        steps = self.plane.generate(ctx, loaded, prepared, disconnect_probe(request.receive))
        try:
            first = await anext(steps)  # errors until here are the response's status
        except BaseException:
            await steps.aclose()
            raise
        prompt_tokens = len(prepared.prompt_ids)
        if body.stream:
            stream = _stream(steps, first, head, chat, body.include_usage, prompt_tokens)
            return StreamingResponse(
                stream,
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            )
        async with contextlib.aclosing(steps):
            pieces, last = [first.text], first
            async for step in steps:
                pieces.append(step.text)
                last = step
        if last.finish_reason == "cancelled":
            return Response(status_code=499)  # the client went away: nobody to answer
        usage = codec.usage_doc(prompt_tokens, last.tokens)
        reason = codec.finish_reason(last.finish_reason)
        render = codec.chat_doc if chat else codec.completion_doc
        return _json(render(head, "".join(pieces), reason, usage))

    async def read_body(self, request: Request) -> bytes:
        """The JSON body, counted against ``max_body_bytes``."""
        kind = request.headers.get("content-type")
        if kind is not None and kind.split(";")[0].strip().lower() != _JSON:
            raise UnsupportedMediaType(f"send the request as {_JSON}, not {kind!r}")
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body:
                    raise PayloadTooLarge(
                        f"request body is over the limit of {self.max_body} bytes"
                    )
                chunks.append(chunk)
        except ClientDisconnect:
            raise ClientGone from None
        return b"".join(chunks)


# ---------------------------------------------------------------------------------- prompts
def _render(loaded: LoadedModel, messages: list[dict[str, str]]) -> ChatPrompt:
    """Blocking: the conversation as the model's prompt."""
    try:
        return render_chat(getattr(loaded.model, "tokenizer", None), messages)
    except ValidationFailed as exc:
        raise codec.InvalidParameter(exc.message, "messages") from None


def _tokenize(
    loaded: LoadedModel, prompt: str | list[int] | ChatPrompt, parameters: Any, where: str
) -> GenerationRequest:
    """Blocking: check the parameters against the model, tokenize the prompt, and work out how
    many tokens the request may generate. Errors name the OpenAI parameter."""
    model: Any = loaded.model
    try:
        limit = loaded.spec.generation.max_new_tokens_limit
        asked = parameters.get("max_new_tokens")
        if asked is not None and asked > limit:
            raise codec.InvalidParameter(
                f"max_tokens is {asked}; model {loaded.name!r} generates at most {limit} "
                "tokens per request",
                "max_tokens",
            )
        text = prompt.text if isinstance(prompt, ChatPrompt) else prompt
        settings = model.request_settings(text if isinstance(text, str) else "", parameters)
        if isinstance(prompt, ChatPrompt):
            ids = list(model.tokenizer.encode(prompt.text, add_special_tokens=False))
            ids = ids or model.prompt_ids("")
            if prompt.stop:
                stops = tuple(dict.fromkeys([*settings.stop, *prompt.stop]))
                settings = dataclasses.replace(settings, stop=stops)
        elif isinstance(prompt, list):
            vocabulary = len(model.tokenizer)
            if any(not 0 <= t < vocabulary for t in prompt):
                raise codec.InvalidParameter(
                    f"prompt token ids must be from 0 to {vocabulary - 1} for model "
                    f"{loaded.name!r}",
                    "prompt",
                )
            ids = list(prompt)
        else:
            ids = model.prompt_ids(prompt)
        return GenerationRequest(ids, settings, model.budget(ids, settings))
    except ValidationFailed as exc:
        found = _PARAMETER.search(exc.message)
        if found is None:  # the prompt: too long for the input limit or the context
            raise codec.InvalidParameter(exc.message, where) from None
        name = found.group(1)
        param = _OPENAI_NAMES.get(name, name)
        raise codec.InvalidParameter(_PARAMETER.sub(param, exc.message), param) from None


# ---------------------------------------------------------------------------------- rendering
async def _stream(
    steps: AsyncGenerator[Step, None],
    first: Step,
    head: dict[str, Any],
    chat: bool,
    include_usage: bool,
    prompt_tokens: int,
) -> AsyncIterator[bytes]:
    """The SSE body: a chunk per piece of text, a last chunk with the finish reason, the usage
    when asked for, then ``[DONE]``. An error after the first chunk is sent as an event."""
    extra = {"usage": None} if include_usage else {}
    head = {**head, **extra}

    def chunk(text: str | None, reason: str | None) -> bytes:
        if chat:
            delta = {} if text is None else {"content": text}
            return codec.sse(codec.chat_chunk(head, delta, reason))
        return codec.sse(codec.completion_chunk(head, text or "", reason))

    async with contextlib.aclosing(steps):
        try:
            if chat:
                yield codec.sse(codec.chat_chunk(head, {"role": "assistant", "content": ""}, None))
            step = first
            while True:
                if step.text:
                    yield chunk(step.text, None)
                if step.finish_reason is not None:
                    if step.finish_reason == "cancelled":
                        return
                    yield chunk(None, codec.finish_reason(step.finish_reason))
                    if include_usage:
                        usage = codec.usage_doc(prompt_tokens, step.tokens)
                        kind = "chat.completion.chunk" if chat else "text_completion"
                        yield codec.sse(
                            {
                                "id": head["id"],
                                "object": kind,
                                **head,
                                "choices": [],
                                "usage": usage,
                            }
                        )
                    yield codec.DONE
                    return
                step = await anext(steps)
        except InferdError as error:
            yield codec.sse(codec.error_doc(error)[1])


def _model_entry(model_id: str, loaded: LoadedModel) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": int(loaded.loaded_at or 0),
        "owned_by": _OWNER,
    }


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status, headers=headers, media_type=_JSON)


def _error(error: InferdError) -> Response:
    status, body = codec.error_doc(error)
    return _json(body, status, error.headers())


def _context(request: Request) -> RequestContext:
    ctx = request.scope.get("inferd")
    if isinstance(ctx, RequestContext):
        return ctx
    # Mounted without the middleware (tests of the bare router): a context of its own.
    ctx = RequestContext("-", time.perf_counter(), asyncio.get_running_loop().time())
    request.scope["inferd"] = ctx
    return ctx


# ---------------------------------------------------------------------------------- errors
class OpenAIErrorShape:
    """ASGI wrapper: errors answered on ``/openai/`` before a route ran (401, 403 and the
    rate limit's 429 from the request middleware, an unhandled 500) get OpenAI's shape too.
    Other paths pass through untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Awaitable[None]:
        if scope["type"] != "http" or not scope["path"].startswith("/openai/"):
            # The app's own coroutine, awaited by the caller: no layer of this wrapper's on
            # every other request.
            passed: Awaitable[None] = self.app(scope, receive, send)
            return passed
        return self._shaped(scope, receive, send)

    async def _shaped(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        start: dict[str, Any] | None = None
        body = b""

        async def sending(message: dict[str, Any]) -> None:
            nonlocal start, body
            kind = message["type"]
            if kind == "http.response.start" and message["status"] >= 400:
                start = message  # held until the body is complete
                return
            if kind == "http.response.body" and start is not None:
                body += message.get("body", b"")
                if message.get("more_body", False):
                    return
                shaped = _openai_error(start["status"], body)
                headers = _with_length(start.get("headers", ()), len(shaped))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": shaped})
                start = None
                return
            await send(message)

        await self.app(scope, receive, sending)


def _openai_error(status: int, body: bytes) -> bytes:
    """An inferd error body (``{"error": {"code", "message", "retryable"}}``) in OpenAI's
    shape; anything else as it was."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    inner = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(inner, dict) or "type" in inner or "message" not in inner:
        return body
    error = InferdError(str(inner["message"]))
    error.status_code, error.code = status, str(inner.get("code", "error"))
    return orjson.dumps(codec.error_doc(error)[1])


def _with_length(headers: Any, length: int) -> list[tuple[bytes, bytes]]:
    kept = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    return [*kept, (b"content-length", str(length).encode())]


# ---------------------------------------------------------------------------------- routes
def _maybe(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` or null (a null parameter is one left out)."""
    return {"anyOf": [schema, {"type": "null"}]}


_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
# What openai_codec accepts, said as JSON schemas (stream_options, which needs stream: true,
# is left out: see docs/protocols.md).
_COMMON_PARAMETERS: dict[str, Any] = {
    "model": {"type": "string", "minLength": 1, "examples": ["tiny"]},
    "stream": _maybe({"type": "boolean"}),
    "max_tokens": _maybe({"type": "integer", "minimum": 1}),
    "temperature": _maybe({"type": "number", "minimum": 0, "maximum": 2}),
    "top_p": _maybe({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
    "top_k": _maybe({"type": "integer", "minimum": 0}),
    # Up to 2^64-1; said as 2^63-1, which generators read as a float without going over.
    "seed": _maybe({"type": "integer", "minimum": 0, "maximum": 2**63 - 1}),
    "n": {"enum": [1, None]},
    "stop": _maybe({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}),
    "user": _maybe({"type": "string"}),
    "presence_penalty": {"enum": [0, None]},
    "frequency_penalty": {"enum": [0, None]},
    "logit_bias": _maybe({"type": "object", "maxProperties": 0}),
    "logprobs": {"enum": [False, 0, None]},
}
_COMPLETION_BODY = {
    "required": True,
    "content": {
        _JSON: {
            "schema": {
                "type": "object",
                "required": ["model", "prompt"],
                "properties": {
                    **_COMMON_PARAMETERS,
                    "prompt": {
                        "anyOf": [
                            {"type": "string"},
                            _TOKENS,
                            {
                                "type": "array",
                                "items": {"type": "string"},
                                "maxItems": 1,
                                "minItems": 1,
                            },
                            {"type": "array", "items": _TOKENS, "maxItems": 1, "minItems": 1},
                        ],
                        "examples": ["the quick"],
                    },
                    "echo": {"enum": [False, None]},
                    "best_of": {"enum": [1, None]},
                    "suffix": {"enum": ["", None]},
                },
                "additionalProperties": False,
            }
        }
    },
}
_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"enum": list(ROLES)},
        "content": {
            "anyOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type", "text"],
                        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                    },
                },
            ]
        },
        "name": _maybe({"type": "string"}),
    },
    "additionalProperties": False,
}
_CHAT_BODY = {
    "required": True,
    "content": {
        _JSON: {
            "schema": {
                "type": "object",
                "required": ["model", "messages"],
                "properties": {
                    **_COMMON_PARAMETERS,
                    "messages": {
                        "type": "array",
                        "items": _MESSAGE,
                        "minItems": 1,
                        "examples": [[{"role": "user", "content": "the quick"}]],
                    },
                    "max_completion_tokens": _maybe({"type": "integer", "minimum": 1}),
                    "top_logprobs": {"enum": [0, None]},
                    "response_format": _maybe(
                        {
                            "type": "object",
                            "required": ["type"],
                            "properties": {"type": {"const": "text"}},
                            "additionalProperties": False,
                        }
                    ),
                    "tools": _maybe({"type": "array", "maxItems": 0}),
                    "functions": _maybe({"type": "array", "maxItems": 0}),
                    "tool_choice": {"enum": ["none", None]},
                    "function_call": {"enum": ["none", None]},
                    "parallel_tool_calls": {},
                },
                "additionalProperties": False,
                # Both limits at once must agree: the schema says "one of them".
                "not": {"required": ["max_tokens", "max_completion_tokens"]},
            }
        }
    },
}


def build_openai_router(plane: DataPlane, settings: Settings) -> APIRouter:
    """The ``/openai/v1`` routes."""
    service = OpenAIService(plane, settings)
    router = APIRouter(prefix=PREFIX, tags=["openai-compatible"])

    async def guarded(request: Request, call: Any) -> Response:
        ctx = _context(request)
        try:
            result: Response = await call(ctx)
            return result
        except InferdError as error:
            ctx.detail = error.message
            return _error(error)
        except ClientGone:
            ctx.detail = "client disconnected before the request was read"
            return Response(status_code=499)

    @router.post(
        "/completions",
        summary="OpenAI-compatible text completion (stream: true for SSE)",
        openapi_extra={"requestBody": _COMPLETION_BODY},
    )
    async def completions(request: Request) -> Response:
        return await guarded(request, lambda ctx: service.completions(request, ctx))

    @router.post(
        "/chat/completions",
        summary="OpenAI-compatible chat completion (stream: true for SSE)",
        openapi_extra={"requestBody": _CHAT_BODY},
    )
    async def chat_completions(request: Request) -> Response:
        return await guarded(request, lambda ctx: service.chat_completions(request, ctx))

    @router.get("/models", summary="Text models in OpenAI's list shape")
    async def list_models(request: Request) -> Response:
        async def call(ctx: RequestContext) -> Response:
            return _json(service.models())

        return await guarded(request, call)

    @router.get("/models/{model_id}", summary="One text model in OpenAI's shape")
    async def get_model(request: Request, model_id: str) -> Response:
        async def call(ctx: RequestContext) -> Response:
            return _json(service.model(model_id))

        return await guarded(request, call)

    @router.api_route(
        "/{rest:path}", methods=["GET", "POST", "PUT", "DELETE"], include_in_schema=False
    )
    async def not_served(request: Request, rest: str) -> Response:
        wrong = method_not_allowed(router.routes, request.method, request.url.path)
        if wrong is not None:  # a route of its own with another method
            return _error(wrong)
        return _error(
            NotFound(
                f"{request.method} {request.url.path} is not served; inferd's OpenAI-compatible "
                f"API has POST {PREFIX}/completions, POST {PREFIX}/chat/completions and "
                f"GET {PREFIX}/models"
            )
        )

    return router
