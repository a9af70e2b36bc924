"""A client that hangs up while its request is queued costs the model nothing."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.models import write_scripted_model


def raw_request(port: int, first: int) -> socket.socket:
    body = b'{"features": [%d, 0, 0, 0]}' % first
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/models/slow/predict HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return sock


def test_queued_request_of_a_gone_client_never_runs(
    start_server: Any, models_dir: Path, tmp_path: Path
) -> None:
    record = tmp_path / "batches.txt"
    write_scripted_model(
        models_dir, "slow", batching={"max_batch_size": 1}, delay_s=0.4, record_to=str(record)
    )
    config = tmp_path / "inferd.toml"
    config.write_text(f'models_dir = "{models_dir}"\nrequest_timeout_ms = 5000\n')
    server = start_server(["--config", str(config)])
    server.wait_ready()
    record.write_text("")  # forget the warm-up batch

    busy = raw_request(server.port, 1)  # occupies the model for 0.4 s
    time.sleep(0.1)
    leaving = raw_request(server.port, 2)  # queued behind it
    time.sleep(0.1)
    leaving.close()  # the client hangs up while queued
    assert b"200 OK" in busy.recv(4096)
    busy.close()
    after = httpx.post(server.url + "/v1/models/slow/predict", json={"features": [3, 0, 0, 0]})
    assert after.status_code == 200

    ran = record.read_text().split()
    assert ran == ["1.0", "3.0"]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'inference_client_disconnects_total{model="slow",version="1"} 1.0' in metrics
