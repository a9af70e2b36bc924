"""An OTLP/HTTP traces endpoint that accepts and discards, for the ``inferd-tracing`` target.

    python bench/baselines/otlp_sink.py PORT

``POST /v1/traces`` answers 200 with an empty ExportTraceServiceResponse; ``GET /stats`` says
how many exports and bytes it received. It decodes nothing: the cost being measured is the
server's (making spans, serializing and sending them), not a collector's.
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

received = {"exports": 0, "bytes": 0}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's session expects

    def do_POST(self) -> None:
        size = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(size)
        received["exports"] += 1
        received["bytes"] += size
        self.answer(b"", "application/x-protobuf")

    def do_GET(self) -> None:
        self.answer(json.dumps(received).encode(), "application/json")

    def answer(self, body: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
