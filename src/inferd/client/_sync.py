"""The blocking client."""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterator, Mapping, Sequence
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

__all__ = ["Client"]

T = TypeVar("T")


class Client:
    """A blocking client of an inferd server.

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
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url, sent = calls.settings(base_url, api_key, headers)
        self.retry = retry or RetryPolicy()
        self.max_reconnects = max_reconnects
        self.auto_idempotency_keys = auto_idempotency_keys
        self._stream_timeout = httpx.Timeout(timeout, read=stream_timeout)
        self._http = httpx.Client(
            base_url=self.base_url, headers=sent, timeout=timeout, transport=transport
        )
        self._default: str | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def _run(self, call: calls.Call[T]) -> T:
        """Send ``call``, retrying within the budget; its parsed answer or the error."""
        attempts = self.retry.attempts(call.idempotent)
        while True:
            try:
                response = self._http.request(
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
            self._sleep(delay)

    # ------------------------------------------------------------ synchronous predictions

    def predict(
        self,
        features: Sequence[float] | Any,
        model: str | None = None,
        version: str | int | None = None,
        *,
        request_id: str | None = None,
    ) -> Prediction:
        """Predict one row; with no ``model``, the server's default model."""
        if model is None and version is not None:
            model = self._default_model()
        return self._run(calls.predict(features, model, version, request_id))

    def predict_batch(
        self,
        rows: Sequence[Sequence[float]] | Any,
        model: str | None = None,
        version: str | int | None = None,
        *,
        request_id: str | None = None,
    ) -> builtins.list[Prediction]:
        """Predict many rows in one request; one :class:`Prediction` per row, in order."""
        name = model or self._default_model()
        return self._run(calls.predict_batch(rows, name, version, request_id))

    def classify(
        self, image: bytes | str | Path, model: str, top_k: int | None = None
    ) -> Classification:
        """Classify an image (its bytes, or a file's path) with a vision model."""
        return self._run(calls.classify(calls.read_image(image), model, top_k))

    def infer(
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
            declared = self._run(calls.v2_input_names(model, version))
        return self._run(
            calls.infer(model, inputs, version, declared, parameters, request_id, outputs)
        )

    # ------------------------------------------------------------ long-running requests

    def submit(
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
        return self._run(calls.submit(model, input, parameters, idempotency_key, auto, ttl_seconds))

    def get(self, request_id: str) -> RequestInfo:
        """A request's stored record: status, attempts, responses, result or error."""
        return self._run(calls.get(request_id))

    def cancel(self, request_id: str) -> RequestInfo:
        """Cancel a request: a queued one never runs, a running one stops soon."""
        return self._run(calls.cancel(request_id))

    def list(self, limit: int | None = None, *, page_size: int = 50) -> Iterator[RequestInfo]:
        """The caller's requests, newest first, fetching page after page through the cursor;
        at most ``limit`` of them (None: all)."""
        cursor: str | None = None
        seen = 0
        while limit is None or seen < limit:
            size = calls.page_size(limit, page_size, seen)
            items, cursor = self._run(calls.page(cursor, size))
            for item in items:
                yield item
                seen += 1
                if limit is not None and seen >= limit:
                    return
            if not cursor or not items:
                return

    def stream(self, request_id: str, last_event_id: int | None = None) -> Iterator[Event]:
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
                with self._http.stream(
                    "GET", path, headers=follow.open(), timeout=self._stream_timeout
                ) as response:
                    if response.status_code != 200:
                        response.read()
                        raise error_from_response(response)
                    for chunk in response.iter_bytes():
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
            self._sleep(follow.next_delay(error))

    def follow(self, request_id: str, last_event_id: int | None = None) -> Iterator[Any]:
        """The request's response chunks as they arrive (see :meth:`stream`); raises
        :class:`~inferd.client.errors.RequestFailed` if it fails, dies or is cancelled."""
        for event in self.stream(request_id, last_event_id):
            if isinstance(event, ResponseEvent):
                yield event.response
            elif isinstance(event, ErrorEvent):
                raise RequestFailed(
                    f"request {request_id} {event.status}: {event.error}",
                    request_id=request_id,
                    request_status=event.status,
                )

    # ------------------------------------------------------------ metadata

    def usage(self) -> Usage:
        """The caller's limits and what is left of them today."""
        return self._run(calls.usage())

    def models(self) -> builtins.list[ModelInfo]:
        """The served models with their state."""
        default, found = self._run(calls.models())
        self._default = default
        return found

    def model(self, name: str) -> ModelInfo:
        """One served model's metadata."""
        return self._run(calls.model(name))

    def health(self) -> Health:
        """Readiness: whether every configured model is loaded and warm."""
        return self._run(calls.health())

    def _default_model(self) -> str:
        if self._default is None:
            self._default, _ = self._run(calls.models())
            if self._default is None:
                raise calls.no_default_model()
        return self._default
