"""``inferd serve`` sends its traces over OTLP/HTTP to a receiver on loopback."""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP traces endpoint: decodes each ExportTraceServiceRequest it is sent."""

    def __init__(self) -> None:
        self.exports: list[ExportTraceServiceRequest] = []
        self.paths: list[str] = []
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                received.paths.append(self.path)
                received.exports.append(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """(resource attributes, span) of every span received."""
        out = []
        for export in self.exports:
            for resource_spans in export.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    out.extend((resource, span) for span in scope_spans.spans)
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_serve_exports_the_span_tree_over_otlp_http(
    start_server: Any,
    models_dir: Path,
    tmp_path: Path,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = tmp_path / "inferd.toml"
    config.write_text(f'models_dir = "{models_dir}"\notel_endpoint = "{receiver.url}"\n')
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # standard variables apply
    server = start_server(["--config", str(config)])
    server.wait_ready()
    r = httpx.post(
        server.url + "/v1/models/iris/predict",
        json={"features": [5.1, 3.5, 1.4, 0.2]},
        headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "X-Request-ID": "e2e-1"},
    )
    assert r.status_code == 200
    assert server.stop() == 0  # SIGTERM: buffered spans are exported before the exit
    output = server.output()
    assert "tracing on" in output

    spans = receiver.spans()
    assert spans, f"no spans received; server output:\n{output[-3000:]}"
    assert set(receiver.paths) == {"/v1/traces"}
    assert {resource["service.name"] for resource, _ in spans} == {"inferd"}
    by_id = {span.span_id.hex(): span for _, span in spans}
    (root,) = [s for _, s in spans if s.name == "POST /v1/models/{name}/predict"]
    assert root.trace_id.hex() == CALLER_TRACE
    assert root.parent_span_id.hex() == CALLER_SPAN
    assert r.headers["traceparent"] == f"00-{CALLER_TRACE}-{root.span_id.hex()}-01"
    attributes = {a.key: a.value for a in root.attributes}
    assert attributes["inferd.request_id"].string_value == "e2e-1"
    assert attributes["http.response.status_code"].int_value == 200
    phases = {s.name: s for s in by_id.values() if s.parent_span_id == root.span_id}
    assert set(phases) == {"admission", "decode", "queue", "model", "write"}
    assert all(s.trace_id == root.trace_id for s in phases.values())
    (link,) = phases["model"].links
    batch = by_id[link.span_id.hex()]
    assert batch.name == "batch"
    assert [x.span_id for x in batch.links] == [root.span_id]
    assert [s.name for s in by_id.values() if s.parent_span_id == batch.span_id] == ["model.call"]

    # The access line names the request and its trace.
    lines = [orjson.loads(line) for line in output.splitlines() if line.startswith("{")]
    (access,) = [line for line in lines if line.get("request_id") == "e2e-1"]
    assert access["trace_id"] == CALLER_TRACE
    assert access["queue_ms"] is not None
