"""Tracing with OpenTelemetry: where one request spent its time, exported over OTLP/HTTP.

Off by default. :func:`configure_from_env` turns it on when given an endpoint
(``INFERD_OTEL_ENDPOINT``) or when the standard variables name one
(``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_EXPORTER_OTLP_ENDPOINT``);
``OTEL_SDK_DISABLED=true`` keeps it off. The SDK reads the
other standard variables itself: ``OTEL_SERVICE_NAME`` (default ``inferd``),
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and ``OTEL_TRACES_SAMPLER_ARG``,
``OTEL_BSP_*`` (the batch span processor), ``OTEL_EXPORTER_OTLP_HEADERS`` and the like.

While tracing is off the request path makes a few checks: ``tracer is None`` in the
middleware and the batcher (once per batch), ``RequestContext.trace is None`` in the data
plane. No span, no context and no clock reading is made for a
request then. When it is on, a request's phases are timed with ``time.perf_counter()`` where
the data plane already reads it, and its spans are made once it is over, with those times
(:meth:`RequestTrace.end`):

    POST /predict (server span; the caller's ``traceparent`` is its parent)
    ├── admission   arrival, authentication, rate limit, model lookup, load shedding
    ├── decode      read the body, parse and validate it, charge the daily budget
    ├── queue       waiting in the model's queue for a batch
    ├── model       the batch this request ran in (linked to the batch span)
    └── write       sending the response

    batch (one per batch, a trace of its own, linked to the span of every request in it)
    └── model.call  the model's call on the collated rows, in the batcher's thread

A long-running request carries its submit's context through the store (``traceparent`` and
``tracestate``, see :func:`carrier`); the worker's span of each run is its child, with one
event per stored chunk.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "BatchTrace",
    "RequestTrace",
    "carrier",
    "configure",
    "configure_from_env",
    "detach",
    "end_job_span",
    "endpoint",
    "endpoint_from_env",
    "extract",
    "job_span",
    "shutdown",
    "to_ns",
    "traceparent",
    "tracer",
    "traces_url",
    "use_span",
]

tracer: trace.Tracer | None = None
"""The tracer while tracing is on; None while it is off (the one check the hot path makes)."""

_provider: TracerProvider | None = None
_propagator = TraceContextTextMapPropagator()
_offset_ns = 0  # epoch nanoseconds minus perf_counter nanoseconds, measured by configure()
_SERVICE = "inferd"


def to_ns(perf: float) -> int:
    """A ``time.perf_counter()`` reading as epoch nanoseconds (what spans are stamped with)."""
    return int(perf * 1e9) + _offset_ns


def endpoint_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The OTLP/HTTP traces URL the standard variables name, or None."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    signal = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if signal:
        return signal
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    return traces_url(base) if base else None


def traces_url(endpoint: str) -> str:
    """``endpoint`` as the URL spans are posted to: a base URL gets ``/v1/traces``."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


def endpoint(setting: str | None) -> str | None:
    """Where spans would be sent: the setting's URL, else the standard variables'."""
    return traces_url(setting) if setting else endpoint_from_env()


def configure_from_env(setting: str | None) -> bool:
    """Turn tracing on if ``setting`` (``INFERD_OTEL_ENDPOINT``) or the standard variables
    name a collector, unless ``OTEL_SDK_DISABLED`` is true. Returns whether it turned it on
    (the caller then owns :func:`shutdown`); leaves tracing as it was otherwise."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    url = endpoint(setting)
    if url is None:
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    configure(OTLPSpanExporter(endpoint=url))
    return True


def configure(exporter: SpanExporter, *, batch: bool = True) -> None:
    """Turn tracing on, exporting to ``exporter`` (through a batch span processor unless
    ``batch`` is false: tests export each span as it ends). Replaces a previous set-up."""
    global tracer, _provider, _offset_ns
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    shutdown()
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: _SERVICE}
    provider = TracerProvider(resource=Resource.create(attributes))  # sampler: OTEL_TRACES_*
    processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    _offset_ns = time.time_ns() - time.perf_counter_ns()
    _provider = provider
    tracer = provider.get_tracer("inferd")


def shutdown() -> None:
    """Export what is buffered and turn tracing off (blocking: up to the exporter's timeout)."""
    global tracer, _provider
    provider, _provider, tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


# --- propagation ----------------------------------------------------------------------------


class _AsgiHeaders:
    """Reads ``traceparent``/``tracestate`` from an ASGI header list."""

    def get(self, carrier: list[tuple[bytes, bytes]], key: str) -> list[str] | None:
        name = key.encode()
        values = [v.decode("latin-1") for k, v in carrier if k == name]
        return values or None

    def keys(self, carrier: list[tuple[bytes, bytes]]) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier]


_ASGI = _AsgiHeaders()


def extract(carrier: Mapping[str, str] | None) -> otel_context.Context:
    """The context a stored :func:`carrier` (or any header mapping) names."""
    return _propagator.extract(dict(carrier or {}))


def carrier(span: trace.Span | None = None) -> dict[str, str] | None:
    """``traceparent`` (and ``tracestate``) of ``span``, or of the current span; None when
    tracing is off or there is no span to carry."""
    if tracer is None:
        return None
    ctx = trace.set_span_in_context(span) if span is not None else None
    out: dict[str, str] = {}
    _propagator.inject(out, context=ctx)
    return out or None


def traceparent(span: trace.Span) -> str:
    """The W3C ``traceparent`` header value naming ``span``."""
    c = span.get_span_context()
    return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"


# --- one request ----------------------------------------------------------------------------


class RequestTrace:
    """The root span of one request and the times of its phases (``time.perf_counter()``).

    The data plane and the transport write the times; :meth:`end` makes the phases' spans
    from them, all at once (no span is open while the request runs, and nothing is attached
    to the event loop's context on the data plane's path).
    """

    __slots__ = (
        "admitted",
        "answered",
        "batch",
        "recording",
        "span",
        "token",
        "write_ended",
        "write_started",
    )

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self.recording = span.is_recording()
        self.admitted: float | None = None
        """When the request was let in (the model's queue had room)."""
        self.answered: float | None = None
        """When its batch's output reached it."""
        self.batch: trace.SpanContext | None = None
        """The span of the batch it ran in."""
        self.write_started: float | None = None
        self.write_ended: float | None = None
        self.token: Any = None  # the context token while the span is the current one

    @classmethod
    def server(
        cls, method: str, headers: list[tuple[bytes, bytes]], started: float
    ) -> RequestTrace:
        """The server span of an HTTP request, child of the caller's ``traceparent``."""
        assert tracer is not None
        parent = _propagator.extract(headers, getter=_ASGI)  # type: ignore[arg-type]
        span = tracer.start_span(
            method, parent, SpanKind.SERVER, start_time=to_ns(started), record_exception=False
        )
        return cls(span)

    @classmethod
    def internal(cls, name: str, started: float, attributes: dict[str, Any]) -> RequestTrace:
        """A span of work that did not arrive by HTTP (a job's prediction), under the
        current span."""
        assert tracer is not None
        span = tracer.start_span(name, attributes=attributes, start_time=to_ns(started))
        return cls(span)

    def attach(self) -> None:
        """Make the span the current one (for what runs under it: a submit stores it)."""
        self.token = otel_context.attach(trace.set_span_in_context(self.span))

    def detach(self) -> None:
        if self.token is not None:
            otel_context.detach(self.token)
            self.token = None

    def traceparent(self) -> bytes:
        return traceparent(self.span).encode()

    def trace_id(self) -> str:
        return f"{self.span.get_span_context().trace_id:032x}"

    def end(
        self,
        started: float,
        submitted: float | None,
        dequeued: float | None,
        attributes: dict[str, Any],
        error: str | None = None,
        name: str | None = None,
    ) -> None:
        """Make the phases' spans from the times recorded and end the request's span now."""
        span = self.span
        now = time.perf_counter()
        if self.recording:
            assert tracer is not None
            parent = trace.set_span_in_context(span)
            admitted = self.admitted
            if admitted is not None:
                _phase(parent, "admission", started, admitted)
                _phase(parent, "decode", admitted, submitted if submitted is not None else now)
            if submitted is not None:
                _phase(parent, "queue", submitted, dequeued if dequeued is not None else now)
            if dequeued is not None:
                links = [Link(self.batch)] if self.batch is not None else None
                _phase(parent, "model", dequeued, self.answered or now, links)
            if self.write_started is not None:
                _phase(parent, "write", self.write_started, self.write_ended or now)
            if name is not None:
                span.update_name(name)
            span.set_attributes({k: v for k, v in attributes.items() if v is not None})
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, error))
        span.end(to_ns(now))


def _phase(
    parent: otel_context.Context,
    name: str,
    start: float,
    end: float,
    links: list[Link] | None = None,
) -> None:
    assert tracer is not None
    span = tracer.start_span(name, parent, links=links, start_time=to_ns(start))
    span.end(to_ns(max(start, end)))


# --- batches --------------------------------------------------------------------------------


class BatchTrace:
    """The span of one batch, linked to the span of every traced request in it."""

    __slots__ = ("context", "model_started", "span")

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self.context = span.get_span_context()
        self.model_started = 0.0

    @classmethod
    def start(
        cls, traces: Iterable[Any], name: str, rows: int, requests: int, started: float
    ) -> BatchTrace | None:
        """The batch's span if any request in it is traced and recorded, else None."""
        if tracer is None:
            return None
        links = [Link(t.span.get_span_context()) for t in traces if t is not None and t.recording]
        if not links:
            return None
        span = tracer.start_span(
            "batch",
            trace.set_span_in_context(trace.INVALID_SPAN),  # a root: its requests are links
            links=links,
            attributes={
                "inferd.model": name,
                "inferd.batch.rows": rows,
                "inferd.batch.requests": requests,
            },
            start_time=to_ns(started),
        )
        return cls(span)

    def model_call(self, ended: float) -> None:
        """The model's call, from :attr:`model_started` to ``ended``."""
        assert tracer is not None
        parent = trace.set_span_in_context(self.span)
        _phase(parent, "model.call", self.model_started, ended)

    def fail(self, error: str) -> None:
        self.span.set_status(Status(StatusCode.ERROR, error))

    def end(self) -> None:
        self.span.end(to_ns(time.perf_counter()))


# --- long-running requests ------------------------------------------------------------------


def job_span(
    stored: Mapping[str, str] | None, request_id: str, model: str, attempt: int, worker: str
) -> trace.Span:
    """The span of one run of a long-running request, child of its submit's span."""
    assert tracer is not None
    return tracer.start_span(
        "job",
        extract(stored),
        SpanKind.CONSUMER,
        attributes={
            "inferd.request_id": request_id,
            "inferd.model": model,
            "inferd.job.attempt": attempt,
            "inferd.worker": worker,
        },
        record_exception=False,
    )


def end_job_span(span: trace.Span, outcome: str, chunks: int, error: BaseException | None) -> None:
    """End a job run's span with its outcome (``succeeded``, ``failed: ...``, ``released``)."""
    span.set_attributes({"inferd.job.outcome": outcome.split(":", 1)[0], "inferd.chunks": chunks})
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, outcome[:200]))
    span.end()


def use_span(span: trace.Span) -> Any:
    """Attach ``span`` as the current one; returns the token for :func:`detach`."""
    return otel_context.attach(trace.set_span_in_context(span))


def detach(token: Any) -> None:
    otel_context.detach(token)
