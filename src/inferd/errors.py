"""One error hierarchy. Every failure a client can see is an :class:`InferdError`.

The HTTP layer renders any of them as ``{"error": {"code", "message", "retryable"}}`` with
:attr:`InferdError.status_code`; anything else becomes a 500 that does not leak internals.
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "ConfigError",
    "DeadlineExceeded",
    "IdempotencyConflict",
    "InferdError",
    "InvalidState",
    "MethodNotAllowed",
    "ModelError",
    "ModelLoadError",
    "ModelNotFound",
    "ModelNotReady",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "QueueFull",
    "StoreUnavailable",
    "TooManyQueued",
    "UnsupportedMediaType",
    "ValidationFailed",
]


class InferdError(Exception):
    """Root of inferd's errors: an HTTP status, a stable machine code and a human message."""

    status_code: int = 500
    code: str = "internal_error"
    retryable: bool = False

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        """Extra response headers this error carries (``Retry-After`` for back-off)."""
        if self.retry_after is None:
            return {}
        return {"retry-after": str(max(0, round(self.retry_after)))}


class ConfigError(InferdError):
    """The settings or the model repository are wrong; the process cannot start as asked."""

    code = "config_error"


class BadRequest(InferdError):
    """The request could not be read (malformed JSON, bad header)."""

    status_code = 400
    code = "bad_request"


class PayloadTooLarge(InferdError):
    """The body or the number of instances is over the configured limit."""

    status_code = 413
    code = "payload_too_large"


class MethodNotAllowed(InferdError):
    """The path exists, but not with this method; ``Allow`` lists the methods it has."""

    status_code = 405
    code = "method_not_allowed"

    def __init__(self, message: str, allow: list[str]) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"allow": ", ".join(self.allow)}


class UnsupportedMediaType(InferdError):
    """The request's ``Content-Type`` is not one the route accepts."""

    status_code = 415
    code = "unsupported_media_type"


class ValidationFailed(InferdError):
    """The request was read but its content is wrong (feature count, types, NaN)."""

    status_code = 422
    code = "validation_failed"


class ModelNotFound(InferdError):
    """No model (or version) of that name is served."""

    status_code = 404
    code = "model_not_found"


class ModelNotReady(InferdError):
    """The model exists but is still loading or warming up."""

    status_code = 503
    code = "model_not_ready"
    retryable = True


class Overloaded(InferdError):
    """The model's queue is past its shedding threshold or full; back off and retry."""

    status_code = 503
    code = "overloaded"
    retryable = True


class DeadlineExceeded(InferdError):
    """The request's deadline passed before the model answered."""

    status_code = 504
    code = "deadline_exceeded"
    retryable = True


class ModelError(InferdError):
    """The model raised while computing the batch this request was in."""

    status_code = 500
    code = "model_error"
    retryable = True


class ModelLoadError(ConfigError):
    """A model's artifact is missing, corrupt, or does not match its declared schema."""

    code = "model_load_error"


class NotFound(InferdError):
    """No such resource (or it belongs to someone else)."""

    status_code = 404
    code = "not_found"


class IdempotencyConflict(InferdError):
    """The idempotency key was used before with a different request body."""

    status_code = 409
    code = "idempotency_conflict"


class StoreUnavailable(InferdError):
    """The database could not be reached; the request was not accepted."""

    status_code = 503
    code = "store_unavailable"
    retryable = True


class QueueFull(InferdError):
    """The model's queue of long-running requests holds ``max_queued_requests``; nothing
    was stored. Back off (``Retry-After``) and submit again."""

    status_code = 503
    code = "queue_full"
    retryable = True


class TooManyQueued(InferdError):
    """The API key already has ``max_queued_requests_per_key`` requests waiting; nothing was
    stored. Submit again once some have started."""

    status_code = 429
    code = "too_many_queued"
    retryable = True


class InvalidState(InferdError):
    """The resource is not in a state that allows this action (requeue a running request)."""

    status_code = 409
    code = "invalid_state"
