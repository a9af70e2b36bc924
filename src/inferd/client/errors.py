"""Exceptions of the client, one per error code the server sends.

Every error body of the server is ``{"error": {"code", "message", "retryable"}}``; the client
raises the subclass of :class:`InferdClientError` that matches the code (or, for a code this
client does not know yet, the status), so callers catch what they can act on::

    try:
        client.predict([5.1, 3.5, 1.4, 0.2], model="iris")
    except NotFound:
        ...  # no such model
    except Unavailable:
        ...  # still overloaded after the retry budget was spent
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = [
    "BadRequest",
    "Conflict",
    "ConnectionFailed",
    "DeadlineExceeded",
    "Forbidden",
    "InferdClientError",
    "ModelNotReady",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "QuotaExceeded",
    "RateLimited",
    "RequestFailed",
    "ServerError",
    "StreamInterrupted",
    "Timeout",
    "Unauthorized",
    "Unavailable",
    "UnsupportedMediaType",
    "ValidationError",
    "error_from_response",
]


class InferdClientError(Exception):
    """Root of the client's errors.

    ``code`` is the server's stable error code (``"model_not_found"``, ``"overloaded"``...) or
    one of the client's own (``"connection_error"``, ``"timeout"``); ``status`` is the HTTP
    status, None when no response came; ``retryable`` is what the server said (or, for a
    connection problem, True); ``retry_after`` is the ``Retry-After`` header in seconds."""

    default_code = "error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.request_id = request_id

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, status={self.status!r}, "
            f"message={self.message!r})"
        )


class BadRequest(InferdClientError):
    """400: the request could not be read (malformed JSON, a bad header or query value)."""

    default_code = "bad_request"


class ValidationError(BadRequest):
    """422: the request was read but its content is wrong (feature count, types, NaN)."""

    default_code = "validation_failed"


class PayloadTooLarge(BadRequest):
    """413: the body or the number of rows is over the server's limit."""

    default_code = "payload_too_large"


class UnsupportedMediaType(BadRequest):
    """415: the route does not accept this Content-Type."""

    default_code = "unsupported_media_type"


class Unauthorized(InferdClientError):
    """401: no API key, or one the server does not accept (set ``api_key`` or INFERD_API_KEY)."""

    default_code = "unauthorized"


class Forbidden(InferdClientError):
    """403: the API key lacks the scope the route needs."""

    default_code = "forbidden"


class NotFound(InferdClientError):
    """404: no such model, version or request (or it belongs to someone else)."""

    default_code = "not_found"


class Conflict(InferdClientError):
    """409: an idempotency key was used before with a different request body."""

    default_code = "idempotency_conflict"


class RateLimited(InferdClientError):
    """429: over the key's request rate; ``retry_after`` says when a request fits again."""

    default_code = "rate_limited"


class QuotaExceeded(RateLimited):
    """429: the key's daily token budget is spent; it resets at UTC midnight."""

    default_code = "quota_exceeded"


class Unavailable(InferdClientError):
    """503: the server cannot take the request now (overloaded, loading, a backend down)."""

    default_code = "unavailable"


class Overloaded(Unavailable):
    """503: the model's queue is past its shedding threshold; back off and retry."""

    default_code = "overloaded"


class ModelNotReady(Unavailable):
    """503: the model is still loading or warming up."""

    default_code = "model_not_ready"


class DeadlineExceeded(InferdClientError):
    """504: the request's deadline passed before the model answered."""

    default_code = "deadline_exceeded"


class ServerError(InferdClientError):
    """500 and other server failures (the model raised, an internal error)."""

    default_code = "internal_error"


class ConnectionFailed(InferdClientError):
    """No answer: the server could not be reached or the connection broke."""

    default_code = "connection_error"


class Timeout(ConnectionFailed):
    """The client's own timeout passed before the server answered."""

    default_code = "timeout"


class StreamInterrupted(ConnectionFailed):
    """An event stream kept breaking before its last event, past the reconnect budget."""

    default_code = "stream_interrupted"


class RequestFailed(InferdClientError):
    """A long-running request ended without succeeding (``failed``, ``dead`` or
    ``cancelled``); raised by ``follow``. ``request_status`` is that status."""

    default_code = "request_failed"

    def __init__(self, message: str, *, request_id: str, request_status: str) -> None:
        super().__init__(message, request_id=request_id)
        self.request_status = request_status


_BY_CODE: dict[str, type[InferdClientError]] = {
    "bad_request": BadRequest,
    "validation_failed": ValidationError,
    "payload_too_large": PayloadTooLarge,
    "unsupported_media_type": UnsupportedMediaType,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "not_found": NotFound,
    "model_not_found": NotFound,
    "idempotency_conflict": Conflict,
    "rate_limited": RateLimited,
    "quota_exceeded": QuotaExceeded,
    "overloaded": Overloaded,
    "model_not_ready": ModelNotReady,
    "store_unavailable": Unavailable,
    "limiter_unavailable": Unavailable,
    "deadline_exceeded": DeadlineExceeded,
    "model_error": ServerError,
    "internal_error": ServerError,
}

_BY_STATUS: dict[int, type[InferdClientError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: ValidationError,
    429: RateLimited,
    503: Unavailable,
    504: DeadlineExceeded,
}


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds; None when absent or not a number of seconds (the server
    sends seconds; an HTTP date from a proxy is ignored rather than guessed at)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 and seconds == seconds else None


def error_from_response(response: httpx.Response) -> InferdClientError:
    """The exception for an error response: by the body's ``code``, else by the status."""
    status = response.status_code
    code: str | None = None
    message = f"HTTP {status}"
    retryable = status in (429, 503)
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        code = detail.get("code") if isinstance(detail.get("code"), str) else None
        if isinstance(detail.get("message"), str):
            message = detail["message"]
        if isinstance(detail.get("retryable"), bool):
            retryable = detail["retryable"]
    elif isinstance(body, dict) and isinstance(body.get("error"), str):
        message = body["error"]  # the Open Inference Protocol's {"error": "..."}
    elif response.text:
        message = f"HTTP {status}: {response.text[:200]}"
    cls = (_BY_CODE.get(code) if code else None) or _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else InferdClientError
    return cls(
        message,
        code=code,
        status=status,
        retryable=retryable,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
        request_id=response.headers.get("x-request-id"),
    )
