"""What tracing costs a request when it is on, measured in-process (no server, no network).

    python bench/tracing_cost.py [--requests 5000] [--batch 1,25]

For each batch size: the CPU time (``time.process_time``, every thread) to make one request's
spans (the server span and its five phases, as the middleware and the data plane make them,
plus its share of the batch's two spans) and hand them to the batch span processor, as a
server does; then to encode them as the OTLP/HTTP exporter does (protobuf, in batches of 512
spans, its default). The exporter's HTTP post is left out. Best of 5. The last row: requests
that are not sampled (``OTEL_TRACES_SAMPLER=always_off``), which make no span but still return
a ``traceparent``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from inferd import tracing

HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"35")]
ATTRIBUTES = {
    "inferd.request_id": "6c1e5a0b9f2d-1",
    "inferd.model": "iris",
    "inferd.model_version": "1",
    "inferd.batch_size": 25,
    "inferd.queue_depth": 3,
    "http.request.method": "POST",
    "http.route": "/predict",
    "url.path": "/predict",
    "http.response.status_code": 200,
}


class Keep(SpanExporter):
    """Holds the spans (to be encoded after the fact)."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def requests(n: int, batch: int) -> None:
    """``n`` requests' spans, in batches of ``batch`` requests."""
    for _ in range(0, n, batch):
        t0 = time.perf_counter()
        traces = [tracing.RequestTrace.server("POST", HEADERS, t0) for _ in range(batch)]
        batch_trace = tracing.BatchTrace.start(traces, "iris", batch, batch, t0)
        if batch_trace is not None:  # None: nothing sampled
            batch_trace.model_started = t0
            batch_trace.model_call(t0)
            batch_trace.end()
        for trace in traces:
            trace.traceparent()  # the response header
            trace.admitted = trace.answered = trace.write_started = trace.write_ended = t0
            trace.end(t0, t0, t0, ATTRIBUTES, None, "POST /predict")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--batch", default="1,25", help="requests per batch, comma-separated")
    a = p.parse_args()
    # Nothing dropped, nothing exported until the end (then to memory).
    os.environ["OTEL_BSP_MAX_QUEUE_SIZE"] = str(20 * a.requests)
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "600000"
    print("| sampled | requests/batch | spans/request | make µs/req | encode µs/req | total |")
    print("|---|--:|--:|--:|--:|--:|")
    runs = [("every request", int(b)) for b in a.batch.split(",")] + [("none", 25)]
    for sampled, batch in runs:
        if sampled == "none":
            os.environ["OTEL_TRACES_SAMPLER"] = "always_off"
        make, encode, spans = [], [], 0
        for _ in range(5):
            keep = Keep()
            tracing.configure(keep)
            t = time.process_time()
            requests(a.requests, batch)
            tracing.shutdown()  # hands every span to the exporter
            make.append((time.process_time() - t) / a.requests * 1e6)
            t = time.process_time()
            for i in range(0, len(keep.spans), 512):
                encode_spans(keep.spans[i : i + 512]).SerializeToString()
            encode.append((time.process_time() - t) / a.requests * 1e6)
            spans = len(keep.spans)
        m, e = min(make), min(encode)
        per = spans / a.requests
        print(f"| {sampled} | {batch} | {per:.2f} | {m:.1f} | {e:.1f} | {m + e:.1f} |")


if __name__ == "__main__":
    main()
