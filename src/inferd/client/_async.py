"""The asyncio client: the same methods as :class:`~inferd.client.Client`, awaited."""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from inferd.client import _calls as calls
from inferd.client._retry import RetryPolicy
from inferd.client._sse import Follow
from inferd.client.errors import (
    InferdClientError,
    RequestFailed,
    StreamInterrupted,
    error_from_response,
)
from inferd.client.types import (
    Classification,
    ErrorEvent,
    Event,
    Health,
    InferResult,
    ModelInfo,
    Prediction,
    RequestInfo,
    ResponseEvent,
    Submitted,
    Usage,
)

__all__ = ["AsyncClient"]

T = TypeVar("T")


class AsyncClient:
    """An asyncio client of an inferd server (see :class:`~inferd.client.Client`).

    ``base_url`` defaults to INFERD_URL, else ``http://127.0.0.1:8000``; ``api_key`` to
    INFERD_API_KEY (sent as ``Authorization: Bearer``). ``timeout`` bounds each HTTP call;
    ``stream_timeout`` is the longest silence tolerated on an event stream (the server sends
    a keep-alive every 15 s by default). ``retry`` is the budget of retries on 503/429 and
    broken connections; ``max_reconnects`` bounds reconnections of an event stream that
    brings nothing new. ``auto_idempotency_keys`` gives every ``submit`` without a key a
    fresh one, so that retrying it can never create a second request.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        stream_timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        max_reconnects: int = 5,
        auto_idempotency_keys: bool = True,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url, sent = calls.settings(base_url, api_key, headers)
        self.retry = retry or RetryPolicy()
        self.max_reconnects = max_reconnects
        self.auto_idempotency_keys = auto_idempotency_keys
        self._stream_timeout = httpx.Timeout(timeout, read=stream_timeout)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=sent, timeout=timeout, transport=transport
        )
        self._default: str | None = None

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def _run(self, call: calls.Call[T]) -> T:
        """Send ``call``, retrying within the budget; its parsed answer or the error."""
        attempts = self.retry.attempts(call.idempotent)
        while True:
            try:
                response = await self._http.request(
                    call.method,
                    call.path,
                    json=call.json,
                    content=call.content,
                    params=call.params,
                    headers=call.headers,
                )
            except httpx.TransportError as exc:
                error = calls.transport_error(exc, self.base_url)
            else:
                if response.is_success or response.status_code in call.accept:
                    return call.parse(response)
                error = error_from_response(response)
            delay = attempts.next_delay(error)
            if delay is None:
                raise error
            await self._sleep(delay)

    # ------------------------------------------------------------ synchronous predictions

    async def predict(
        self,
        features: Sequence[float] | Any,
        model: str | None = None,
        version: str | int | None = None,
        *,
        request_id: str | None = None,
    ) -> Prediction:
        """Predict one row; with no ``model``, the server's default model."""
        if model is None and version is not None:
            model = await self._default_model()
        return await self._run(calls.predict(features, model, version, request_id))

    async def predict_batch(
        self,
        rows: Sequence[Sequence[float]] | Any,
        model: str | None = None,
        version: str | int | None = None,
        *,
        request_id: str | None = None,
    ) -> builtins.list[Prediction]:
        """Predict many rows in one request; one :class:`Prediction` per row, in order."""
        name = model or await self._default_model()
        return await self._run(calls.predict_batch(rows, name, version, request_id))

    async def classify(
        self, image: bytes | str | Path, model: str, top_k: int | None = None
    ) -> Classification:
        """Classify an image (its bytes, or a file's path) with a vision model."""
        return await self._run(calls.classify(await _read(image), model, top_k))

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, Any] | Sequence[Any],
        version: str | int | None = None,
        *,
        parameters: dict[str, Any] | None = None,
        outputs: Sequence[str] | None = None,
        request_id: str | None = None,
    ) -> InferResult:
        """Open Inference Protocol (V2) inference: ``inputs`` maps names to arrays (or is a
        list of arrays, named after the model's declared inputs); outputs come back as numpy
        arrays."""
        declared = None
        if not isinstance(inputs, Mapping) and any(not isinstance(i, Mapping) for i in inputs):
            declared = await self._run(calls.v2_input_names(model, version))
        return await self._run(
            calls.infer(model, inputs, version, declared, parameters, request_id, outputs)
        )

    # ------------------------------------------------------------ long-running requests

    async def submit(
        self,
        model: str,
        input: Any,
        parameters: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        ttl_seconds: float | None = None,
    ) -> Submitted:
        """Queue a long-running request. With a key (given, or generated), a retry after a
        lost answer returns the same request instead of creating another. ``ttl_seconds``:
        not started by then, it ends ``expired`` (the server's default when None)."""
        auto = self.auto_idempotency_keys
        return await self._run(
            calls.submit(model, input, parameters, idempotency_key, auto, ttl_seconds)
        )

    async def get(self, request_id: str) -> RequestInfo:
        """A request's stored record: status, attempts, responses, result or error."""
        return await self._run(calls.get(request_id))

    async def cancel(self, request_id: str) -> RequestInfo:
        """Cancel a request: a queued one never runs, a running one stops soon."""
        return await self._run(calls.cancel(request_id))

    async def list(
        self, limit: int | None = None, *, page_size: int = 50
    ) -> AsyncIterator[RequestInfo]:
        """The caller's requests, newest first, fetching page after page through the cursor;
        at most ``limit`` of them (None: all)."""
        cursor: str | None = None
        seen = 0
        while limit is None or seen < limit:
            size = calls.page_size(limit, page_size, seen)
            items, cursor = await self._run(calls.page(cursor, size))
            for item in items:
                yield item
                seen += 1
                if limit is not None and seen >= limit:
                    return
            if not cursor or not items:
                return

    async def stream(
        self, request_id: str, last_event_id: int | None = None
    ) -> AsyncIterator[Event]:
        """A request's events, stored then live, until its ``done`` or ``error`` event.

        A dropped connection, or a stream that ends before the last event, is reopened with
        ``Last-Event-ID``: every event comes once, in order. Raises
        :class:`~inferd.client.errors.StreamInterrupted` after ``max_reconnects`` failures
        in a row without a new event."""
        follow = Follow(last_event_id, self.max_reconnects, self.retry)
        path = calls.events_path(request_id)
        while True:
            error: InferdClientError
            try:
                async with self._http.stream(
                    "GET", path, headers=follow.open(), timeout=self._stream_timeout
                ) as response:
                    if response.status_code != 200:
                        await response.aread()
                        raise error_from_response(response)
                    async for chunk in response.aiter_bytes():
                        for event in follow.feed(chunk):
                            yield event
                            if event.terminal:
                                return
                error = StreamInterrupted(
                    "the event stream ended before the request's last event", retryable=True
                )
            except httpx.TransportError as exc:
                error = calls.transport_error(exc, self.base_url)
            except InferdClientError as exc:
                error = exc
            await self._sleep(follow.next_delay(error))

    async def follow(self, request_id: str, last_event_id: int | None = None) -> AsyncIterator[Any]:
        """The request's response chunks as they arrive (see :meth:`stream`); raises
        :class:`~inferd.client.errors.RequestFailed` if it fails, dies or is cancelled."""
        async for event in self.stream(request_id, last_event_id):
            if isinstance(event, ResponseEvent):
                yield event.response
            elif isinstance(event, ErrorEvent):
                raise RequestFailed(
                    f"request {request_id} {event.status}: {event.error}",
                    request_id=request_id,
                    request_status=event.status,
                )

    # ------------------------------------------------------------ metadata

    async def usage(self) -> Usage:
        """The caller's limits and what is left of them today."""
        return await self._run(calls.usage())

    async def models(self) -> builtins.list[ModelInfo]:
        """The served models with their state."""
        default, found = await self._run(calls.models())
        self._default = default
        return found

    async def model(self, name: str) -> ModelInfo:
        """One served model's metadata."""
        return await self._run(calls.model(name))

    async def health(self) -> Health:
        """Readiness: whether every configured model is loaded and warm."""
        return await self._run(calls.health())

    async def _default_model(self) -> str:
        if self._default is None:
            self._default, _ = await self._run(calls.models())
            if self._default is None:
                raise calls.no_default_model()
        return self._default


async def _read(image: bytes | str | Path) -> bytes:
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    return await asyncio.to_thread(calls.read_image, image)  # a file read off the event loop
