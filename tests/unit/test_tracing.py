"""Tracing's parts on their own: where spans go, a request's phases, a batch's links."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from inferd import tracing
from inferd.batching.batcher import Batcher


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    tracing.configure(memory, batch=False)
    yield memory
    tracing.shutdown()


def test_the_standard_variables_name_the_endpoint() -> None:
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}
    signal = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://other:4318/v1/traces"}
    assert tracing.endpoint_from_env({}) is None
    assert tracing.endpoint_from_env(base) == "http://collector:4318/v1/traces"
    assert tracing.endpoint_from_env(base | signal) == "http://other:4318/v1/traces"
    assert tracing.endpoint_from_env(base | {"OTEL_SDK_DISABLED": "true"}) is None
    assert tracing.endpoint_from_env(base | {"OTEL_TRACES_EXPORTER": "none"}) is None
    assert tracing.traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert tracing.traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"


def test_off_unless_an_endpoint_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert tracing.configure_from_env(None) is False
    assert tracing.tracer is None
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.configure_from_env("http://127.0.0.1:4318") is False
    assert tracing.tracer is None
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    try:
        assert tracing.configure_from_env("http://127.0.0.1:4318") is True
        assert tracing.tracer is not None
    finally:
        tracing.shutdown()
    assert tracing.tracer is None


def test_a_request_trace_makes_its_phases_from_the_times_given(
    exporter: InMemorySpanExporter,
) -> None:
    caller = [(b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]
    t0 = time.perf_counter()
    trace = tracing.RequestTrace.server("POST", caller, t0)
    trace.admitted = t0 + 0.001
    submitted, dequeued = t0 + 0.002, t0 + 0.0125
    trace.answered = t0 + 0.020
    trace.write_started, trace.write_ended = t0 + 0.021, t0 + 0.022
    trace.end(t0, submitted, dequeued, {"inferd.request_id": "r-1", "inferd.model": None},
              None, "POST /predict")  # fmt: skip
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"POST /predict", "admission", "decode", "queue", "model", "write"}
    root = spans["POST /predict"]
    assert root.kind is SpanKind.SERVER
    assert f"{root.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert root.parent is not None and f"{root.parent.span_id:016x}" == "b7ad6b7169203331"
    assert root.attributes == {"inferd.request_id": "r-1"}  # None values are left out
    for name in ("admission", "decode", "queue", "model", "write"):
        assert spans[name].parent is not None
        assert spans[name].parent.span_id == root.context.span_id
    queue = spans["queue"]
    assert queue.end_time is not None and queue.start_time is not None
    assert queue.end_time - queue.start_time == pytest.approx(10.5e6, abs=2)  # ns
    assert trace.traceparent() == (
        f"00-0af7651916cd43dd8448eb211c80319c-{root.context.span_id:016x}-01".encode()
    )


def test_an_unsampled_request_makes_no_phase_spans(exporter: InMemorySpanExporter) -> None:
    caller = [(b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")]
    t0 = time.perf_counter()
    trace = tracing.RequestTrace.server("POST", caller, t0)
    trace.admitted = t0
    trace.end(t0, t0, t0, {})
    assert exporter.get_finished_spans() == ()
    assert trace.traceparent().endswith(b"-00")  # the caller's decision is passed on


async def test_a_batch_span_links_every_request_in_it(exporter: InMemorySpanExporter) -> None:
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def model(batch: Any) -> Any:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
        return batch * 2

    batcher: Batcher[Any, Any] = Batcher(model, name="m", max_batch_size=8, window=0.0)
    batcher.start()
    try:
        first = batcher.submit(np.ones((1, 2)), 1, loop.time() + 10)  # untraced
        await asyncio.sleep(0.01)  # running: the next three make one batch
        now = time.perf_counter()
        traces = [tracing.RequestTrace.server("POST", [], now) for _ in range(3)]
        futures = [
            batcher.submit(np.full((1, 2), i), 1, loop.time() + 10, None, t)
            for i, t in enumerate(traces)
        ]
        release.set()
        assert (await first)[3] is None  # nothing traced in its batch: no batch span
        results = [await f for f in futures]
    finally:
        await batcher.stop()
    spans = exporter.get_finished_spans()
    batches = [s for s in spans if s.name == "batch"]
    assert len(batches) == 1
    batch = batches[0]
    assert batch.parent is None  # a trace of its own
    linked = {link.context.span_id for link in batch.links}
    assert linked == {t.span.get_span_context().span_id for t in traces}
    assert batch.attributes is not None and batch.attributes["inferd.batch.requests"] == 3
    (call,) = [s for s in spans if s.name == "model.call"]
    assert call.parent is not None and call.parent.span_id == batch.context.span_id
    for _output, rows, started, link in results:
        assert rows == 3 and link == batch.context
        assert batch.start_time == tracing.to_ns(started)


async def test_off_a_batch_makes_no_span() -> None:
    assert tracing.tracer is None
    loop = asyncio.get_running_loop()
    batcher: Batcher[Any, Any] = Batcher(lambda b: b, name="m")
    batcher.start()
    try:
        _output, rows, started, link = await batcher.submit(np.ones((1, 2)), 1, loop.time() + 5)
    finally:
        await batcher.stop()
    assert rows == 1 and link is None and started <= time.perf_counter()


def test_the_endpoint_setting_must_be_an_http_url() -> None:
    from pydantic import ValidationError

    from inferd.settings import Settings

    assert Settings(_env_file=None, otel_endpoint=" ").otel_endpoint is None  # type: ignore[call-arg]
    ok = Settings(_env_file=None, otel_endpoint="http://127.0.0.1:4318")  # type: ignore[call-arg]
    assert ok.otel_endpoint == "http://127.0.0.1:4318"
    with pytest.raises(ValidationError, match="otel_endpoint must be an http"):
        Settings(_env_file=None, otel_endpoint="127.0.0.1:4318")  # type: ignore[call-arg]
