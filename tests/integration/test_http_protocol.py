"""inferd's HTTP/1.1 protocol (inferd.http.protocol) on a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn

from inferd.http.protocol import HttpProtocol

WRITES: list[bytes] = []


class _RecordingTransport:
    """The real transport, noting each write (the protocol under test is unchanged)."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        WRITES.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Recording(HttpProtocol):
    def connection_made(self, transport: Any) -> None:
        super().connection_made(_RecordingTransport(transport))


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    path = scope["path"]
    if path == "/stream":  # a streamed answer: the head at once, the body later
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.5)
        await send({"type": "http.response.body", "body": b"late", "more_body": False})
        return
    if path == "/bad-header":
        headers = [(b"content-length", b"2"), (b"x-bad", b"a\r\nx-injected: 1")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"no"})
        return
    answer = b"echo:" + body if body else b"path:" + path.encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


@pytest.fixture
async def server() -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        http=_Recording,
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_keep_alive=0.5,
    )
    srv = uvicorn.Server(config)
    task = asyncio.create_task(srv.serve(sockets=[sock]))
    for _ in range(500):  # uvicorn offers no event for it
        if srv.started:
            break
        await asyncio.sleep(0.01)
    WRITES.clear()
    yield port
    srv.should_exit = True
    await task


async def _exchange(port: int, raw: bytes, until: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    data = b""
    async with asyncio.timeout(5):
        while until not in data:
            chunk = await reader.read(65536)
            if not chunk:
                break
            data += chunk
    writer.close()
    return data


async def test_a_fixed_length_answer_is_one_write(server: int) -> None:
    data = await _exchange(
        server, b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\nhi", b"echo:hi"
    )
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 7" in head and b"content-type: text/plain" in head
    assert b"date: " in head  # uvicorn's default headers are kept
    assert body == b"echo:hi"
    assert len(WRITES) == 1 and WRITES[0] == data


async def test_a_streamed_answer_sends_its_head_before_its_body(server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(b"GET /stream HTTP/1.1\r\nhost: a\r\n\r\n")
    loop = asyncio.get_running_loop()
    started = loop.time()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert loop.time() - started < 0.4  # not held back until the body
    assert b"transfer-encoding: chunked" in head
    rest = b""
    while b"0\r\n\r\n" not in rest:
        rest += await asyncio.wait_for(reader.read(65536), 5)
    assert b"late" in rest
    writer.close()


async def test_pipelined_requests_are_answered_in_order(server: int) -> None:
    raw = b"".join(b"GET /%d HTTP/1.1\r\nhost: a\r\n\r\n" % i for i in range(3))
    data = await _exchange(server, raw, b"path:/2")
    assert data.index(b"path:/0") < data.index(b"path:/1") < data.index(b"path:/2")


async def test_head_and_http10_and_connection_close(server: int) -> None:
    head = await _exchange(server, b"HEAD /h HTTP/1.1\r\nhost: a\r\n\r\n", b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(b"GET /old HTTP/1.0\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)  # the server closes the connection
    assert b"connection: close" in data and data.endswith(b"path:/old")
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(b"GET /bye HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    assert b"connection: close" in data and data.endswith(b"path:/bye")
    writer.close()


async def test_a_header_value_with_a_line_break_is_refused(server: int) -> None:
    data = await _exchange(server, b"GET /bad-header HTTP/1.1\r\nhost: a\r\n\r\n", b"Error")
    assert data.startswith(b"HTTP/1.1 500")  # nothing of the response was written before
    assert b"x-injected" not in data


async def test_keep_alive_lasts_while_requests_come_and_ends_when_idle(server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    for i in range(6):  # 6 x 0.2 s: longer than the 0.5 s timeout, never idle that long
        writer.write(b"GET /k%d HTTP/1.1\r\nhost: a\r\n\r\n" % i)
        data = b""
        while b"path:/k%d" % i not in data:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            assert chunk, f"closed after {i} requests"
            data += chunk
        await asyncio.sleep(0.2)
    loop = asyncio.get_running_loop()
    idle = loop.time()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    assert 0.25 < loop.time() - idle < 1.5
    writer.close()
