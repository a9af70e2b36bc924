"""What one call carries through the data plane, whatever protocol it came by.

The transport makes a :class:`RequestContext` when a request arrives (the HTTP middleware, the
gRPC servicer, a worker running a job); the data plane and the route fill it in, and the
transport writes the access line and the request metrics from it at the end.
"""

from __future__ import annotations

from typing import Any

from inferd.batching.fair import NORMAL
from inferd.tenancy.limits import limit_header_fields
from inferd.tracing import RequestTrace

__all__ = ["ClientGone", "RequestContext"]


class ClientGone(Exception):
    """The client disconnected while its request waited; there is nobody to answer."""


class RequestContext:
    """What one request's access line and metrics need; handlers write into it."""

    __slots__ = (
        "batch_size",
        "dequeued",
        "detail",
        "endpoint",
        "headers",
        "key",
        "limit_headers",
        "model",
        "priority",
        "queue_depth",
        "quota",
        "rate",
        "request_id",
        "started",
        "started_loop",
        "status",
        "submitted",
        "tenant",
        "trace",
        "version",
    )

    def __init__(self, request_id: str, started: float, started_loop: float) -> None:
        self.request_id = request_id
        self.started = started
        """``time.perf_counter()`` when the request arrived."""
        self.started_loop = started_loop
        """The event loop's clock when the request arrived: deadlines count from it."""
        self.endpoint: str | None = None
        self.status = 0
        self.queue_depth: int | None = None
        self.batch_size: int | None = None
        self.submitted: float | None = None
        """``time.perf_counter()`` when the request joined its model's queue."""
        self.dequeued: float | None = None
        """``time.perf_counter()`` when the batch it ran in started (it left the queue)."""
        self.trace: RequestTrace | None = None
        """The request's trace while tracing is on (:mod:`inferd.tracing`); None when off."""
        self.detail: str | None = None
        self.model: str | None = None
        self.version: str | None = None
        self.key: Any = None  # the verified ApiKey when authentication is on
        self.rate: Any = None  # the rate decision of this request, for the quota's headers
        self.quota: Any = None  # the daily-budget decision, once the request was charged
        self.limit_headers: list[tuple[bytes, bytes]] | None = None
        self.tenant = ""
        """Whose share of the model's queue the request takes: its key's id ("" without)."""
        self.priority = NORMAL
        """Its priority in the model's queue (an index of :data:`inferd.batching.PRIORITIES`)."""
        self.headers: list[tuple[bytes, bytes]] | None = None
        """The request's header fields (lower-case names) where the transport has them: what
        a traffic split reads (``X-Inferd-Variant``, a sticky header)."""

    def rate_limit_headers(self) -> list[tuple[bytes, bytes]]:
        """RateLimit-Policy and RateLimit for this request's decisions, built once."""
        if self.limit_headers is None:
            self.limit_headers = limit_header_fields(self.rate, self.quota)
        return self.limit_headers

    @property
    def queue_ms(self) -> float | None:
        """Milliseconds the request waited in its model's queue, if it was queued and ran."""
        if self.submitted is None or self.dequeued is None:
            return None
        return round((self.dequeued - self.submitted) * 1000.0, 3)

    def end_trace(self, name: str | None = None, **attributes: Any) -> None:
        """End the request's trace (when traced) with what the context says of it."""
        trace = self.trace
        if trace is None:
            return
        trace.end(
            self.started,
            self.submitted,
            self.dequeued,
            {
                "inferd.request_id": self.request_id,
                "inferd.model": self.model,
                "inferd.model_version": self.version,
                "inferd.batch_size": self.batch_size,
                "inferd.queue_depth": self.queue_depth,
                **attributes,
            },
            self.detail if self.status >= 500 else None,
            name,
        )
