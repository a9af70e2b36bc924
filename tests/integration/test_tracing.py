"""Traces of the whole app in-process, exported to memory: the span tree of a prediction,
``traceparent`` in and out, the queue span against the access log, long-running requests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from inferd import tracing
from tests.integration.test_requests_api import fast, wait_terminal
from tests.support.access import access_lines, capture_access_log
from tests.support.models import write_scripted_model, write_streaming_model

SETOSA = [5.1, 3.5, 1.4, 0.2]
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
PHASES = {"admission", "decode", "queue", "model", "write"}


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    tracing.configure(memory, batch=False)
    yield memory
    tracing.shutdown()


def children(spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> dict[str, ReadableSpan]:
    return {
        s.name: s
        for s in spans
        if s.parent is not None and s.parent.span_id == parent.context.span_id
    }


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


async def test_a_prediction_is_one_trace_under_the_callers_traceparent(
    serve: Callable[..., Any], exporter: InMemorySpanExporter
) -> None:
    async with serve() as s:
        sink = capture_access_log(s.app)
        r = await s.client.post(
            "/v1/models/iris/predict",
            json={"features": SETOSA},
            headers={"traceparent": TRACEPARENT, "X-Request-ID": "traced-1"},
        )
        lines = access_lines(s.app, sink)
    assert r.status_code == 200
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.name == "POST /v1/models/{name}/predict"]
    trace_id, span_id = hex_ids(root)
    # Honoured: the caller's span is the parent. Returned: the server span's traceparent.
    assert trace_id == CALLER_TRACE
    assert root.parent is not None and f"{root.parent.span_id:016x}" == CALLER_SPAN
    assert r.headers["traceparent"] == f"00-{CALLER_TRACE}-{span_id}-01"
    assert root.kind is SpanKind.SERVER
    assert root.attributes is not None
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["inferd.request_id"] == "traced-1"
    assert root.attributes["inferd.model"] == "iris"
    phases = children(spans, root)
    assert set(phases) == PHASES
    ordered = sorted(phases.values(), key=lambda s: s.start_time or 0)
    assert [s.name for s in ordered] == ["admission", "decode", "queue", "model", "write"]
    for span in phases.values():
        assert span.start_time is not None and span.end_time is not None
        assert root.start_time is not None and root.end_time is not None
        assert root.start_time <= span.start_time <= span.end_time <= root.end_time
    # The model span links to the batch's, which links back to the request.
    (batch,) = [s for s in spans if s.name == "batch"]
    assert [link.context.span_id for link in phases["model"].links] == [batch.context.span_id]
    assert [link.context.span_id for link in batch.links] == [root.context.span_id]
    assert set(children(spans, batch)) == {"model.call"}
    # The access line names the trace.
    (line,) = lines
    assert line["request_id"] == "traced-1"
    assert line["trace_id"] == CALLER_TRACE


async def test_without_a_traceparent_a_new_trace_starts(
    serve: Callable[..., Any], exporter: InMemorySpanExporter
) -> None:
    async with serve() as s:
        r = await s.client.post("/predict", json={"features": SETOSA})
        bad = await s.client.post("/predict", json={"features": [1, 2]})
        health = await s.client.get("/health")
    roots = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert sorted(s.name for s in roots) == ["GET /health", "POST /predict", "POST /predict"]
    assert all(span.parent is None for span in roots)
    returned = [x.headers["traceparent"].split("-")[1] for x in (r, bad, health)]
    assert sorted(returned) == sorted(hex_ids(span)[0] for span in roots)  # three traces
    (failed,) = [
        s for s in roots if s.attributes and s.attributes["http.response.status_code"] == 422
    ]
    assert hex_ids(failed)[0] == returned[1]


async def test_off_no_spans_no_header(
    serve: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = InMemorySpanExporter()
    tracing.configure(memory, batch=False)
    tracing.shutdown()  # what a server without an endpoint is: tracing never turned on
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    async with serve(workers=1) as s:
        sink = capture_access_log(s.app)
        r = await s.client.post(
            "/predict", json={"features": SETOSA}, headers={"traceparent": TRACEPARENT}
        )
        submitted = await s.client.post(
            "/v1/requests", json={"model": "iris", "input": {"features": SETOSA}}
        )
        record = await wait_terminal(s.client, submitted.json()["id"])
        lines = access_lines(s.app, sink)
        assert tracing.tracer is None
    assert r.status_code == 200 and record["status"] == "succeeded"
    assert "traceparent" not in r.headers and "traceparent" not in submitted.headers
    assert memory.get_finished_spans() == ()
    assert lines[0]["trace_id"] is None


async def test_the_queue_span_is_the_access_logs_queue_time(
    serve: Callable[..., Any], models_dir: Path, exporter: InMemorySpanExporter
) -> None:
    write_scripted_model(models_dir, "slow", delay_s=0.15, batching={"max_batch_size": 1})
    async with serve(request_timeout_ms=5000) as s:
        sink = capture_access_log(s.app)

        async def predict(n: int) -> Any:
            return await s.client.post(
                "/v1/models/slow/predict",
                json={"features": [n, 0, 0, 0]},
                headers={"X-Request-ID": f"slow-{n}"},
            )

        first = asyncio.create_task(predict(0))
        await asyncio.sleep(0.05)  # the first is in the model: the second waits its turn
        second = await predict(1)
        await first
        lines = {line["request_id"]: line for line in access_lines(s.app, sink)}
    assert second.status_code == 200
    waited = lines["slow-1"]
    assert waited["queue_ms"] > 50  # it did wait for the first one's batch
    trace_id = second.headers["traceparent"].split("-")[1]
    assert waited["trace_id"] == trace_id
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if hex_ids(s)[0] == trace_id and s.kind is SpanKind.SERVER]
    queue = children(spans, root)["queue"]
    assert queue.start_time is not None and queue.end_time is not None
    queue_ms = (queue.end_time - queue.start_time) / 1e6
    assert abs(queue_ms - waited["queue_ms"]) < 1.0
    assert lines["slow-0"]["queue_ms"] < waited["queue_ms"]


async def test_a_jobs_runs_are_in_its_submits_trace(
    serve: Callable[..., Any], models_dir: Path, exporter: InMemorySpanExporter
) -> None:
    write_streaming_model(models_dir, chunk_delay_s=0.0)
    async with serve(**fast()) as s:
        submits = {}
        for model, body in (
            ("iris", {"model": "iris", "input": {"features": SETOSA}}),
            ("streamer", {"model": "streamer", "input": "hi", "parameters": {"chunks": 3}}),
        ):
            r = await s.client.post("/v1/requests", json=body, headers={"traceparent": TRACEPARENT})
            assert r.status_code in (200, 201, 202), r.text
            submits[model] = r
        for r in submits.values():
            assert (await wait_terminal(s.client, r.json()["id"]))["status"] == "succeeded"
        # The worker ends a run's span just after its outcome is stored.
        for _ in range(500):
            spans = exporter.get_finished_spans()
            if sum(s.name == "job" for s in spans) == 2:
                break
            await asyncio.sleep(0.01)
    jobs = {s.attributes["inferd.model"]: s for s in spans if s.name == "job" and s.attributes}
    assert set(jobs) == {"iris", "streamer"}
    for model, r in submits.items():
        job = jobs[model]
        submit_span = r.headers["traceparent"].split("-")[2]
        assert hex_ids(job)[0] == CALLER_TRACE  # the submit's trace
        assert job.parent is not None and f"{job.parent.span_id:016x}" == submit_span
        assert job.kind is SpanKind.CONSUMER
        assert job.attributes is not None
        assert job.attributes["inferd.request_id"] == r.json()["id"]
        assert job.attributes["inferd.job.outcome"] == "succeeded"
        chunks = [e for e in job.events if e.name == "chunk"]
        assert len(chunks) == (1 if model == "iris" else 3)
    # The tabular job ran through the data plane: its phases are under the run's span.
    (predict,) = children(spans, jobs["iris"]).values()
    assert predict.name == "predict"
    assert {"admission", "decode", "queue", "model"} <= set(children(spans, predict))
