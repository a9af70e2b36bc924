"""inferd's HTTP/1.1 protocol (inferd.http.protocol) on a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn

from inferd.http.protocol import DIRECT_MAX_BODY, Direct, HttpProtocol

WRITES: list[bytes] = []
SEEN: list[Any] = []  # what the direct routes saw: (path, route, type of send, messages)


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


class _DirectRoutes:
    """Routes under ``/d/`` served as direct requests (inferd.http.protocol.DirectApp)."""

    def match(self, scope: dict[str, Any]) -> Any:
        if scope["method"] == "POST" and scope["path"].startswith("/d/"):
            return ("route", scope["path"])
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any, route: Any) -> None:
        path = scope["path"]
        message = await receive()
        SEEN.append((path, route, type(send), message))
        body = message["body"]
        if path == "/d/slow":
            await asyncio.sleep(0.3)
        if path == "/d/fail":
            raise RuntimeError("the route failed")
        if path == "/d/silent":
            return
        if path == "/d/bad-header":
            headers = [(b"content-length", b"2"), (b"x-bad", b"a\r\nx-injected: 1")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            return
        if path == "/d/wait":  # answers once the client has gone
            SEEN.append(await receive())
            return
        answer = b"direct:" + body
        if path == "/d/asgi":  # ASGI messages, the body in parts, a length to be replaced
            headers = [(b"Content-Type", b"text/plain"), (b"content-length", b"999")]
            await send({"type": "http.response.start", "status": 201, "headers": headers})
            await send({"type": "http.response.body", "body": answer[:3], "more_body": True})
            await send({"type": "http.response.body", "body": answer[3:]})
            return
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(answer))]
        send.respond(200, headers, answer)


async def _app_with_direct(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await app(scope, receive, send)


_app_with_direct.direct = _DirectRoutes()  # type: ignore[attr-defined]


@pytest.fixture
async def server() -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        _app_with_direct,
        http=_Recording,
        lifespan="off",
        proxy_headers=False,  # uvicorn's middleware in front would hide the app's routes
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
    SEEN.clear()
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


async def test_a_direct_request_gets_its_body_at_once_and_answers_in_one_write(
    server: int,
) -> None:
    data = await _exchange(
        server, b"POST /d/x HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\nhi", b"direct:hi"
    )
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"date: " in data
    assert b"content-length: 9\r\n" in data and data.endswith(b"\r\n\r\ndirect:hi")
    assert [data] == WRITES
    path, route, sender, message = SEEN[0]
    assert (path, route, sender) == ("/d/x", ("route", "/d/x"), Direct)
    assert message == {"type": "http.request", "body": b"hi", "more_body": False}


async def test_a_direct_request_may_answer_with_asgi_messages(server: int) -> None:
    raw = b"POST /d/asgi HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc"
    data = await _exchange(server, raw, b"direct:abc")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 201 Created\r\n")
    assert b"content-type: text/plain" in head and b"content-length: 10" in head
    assert b"999" not in head and body == b"direct:abc"
    assert len(WRITES) == 1


async def test_direct_and_other_requests_pipelined_are_answered_in_order(server: int) -> None:
    raw = (
        b"POST /d/slow HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\n\r\n1"
        b"GET /plain HTTP/1.1\r\nhost: a\r\n\r\n"
        b"POST /d/fast HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\n\r\n3"
    )
    data = await _exchange(server, raw, b"direct:3")
    assert data.index(b"direct:1") < data.index(b"path:/plain") < data.index(b"direct:3")


async def test_large_chunked_or_expecting_bodies_take_the_asgi_cycle(server: int) -> None:
    big = b"x" * (DIRECT_MAX_BODY + 1)
    raw = b"POST /d/big HTTP/1.1\r\nhost: a\r\ncontent-length: %d\r\n\r\n" % len(big) + big
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(raw)
    data = b""
    while not data.endswith(b"echo:" + big):
        chunk = await asyncio.wait_for(reader.read(1 << 20), 5)
        assert chunk, data[:200]
        data += chunk
    writer.close()
    raw = (
        b"POST /d/chunked HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\n\r\n"
    )
    assert (await _exchange(server, raw, b"echo:hi")).endswith(b"echo:hi")
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(
        b"POST /d/expect HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n"
    )
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(
        b"HTTP/1.1 100 Continue"
    )
    writer.write(b"hi")
    data = b""
    while b"echo:hi" not in data:
        data += await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert SEEN == []  # none of them was a direct request


async def test_a_direct_request_honours_connection_close_and_http10(server: int) -> None:
    for raw in (
        b"POST /d/c HTTP/1.1\r\nhost: a\r\nconnection: close\r\ncontent-length: 1\r\n\r\nc",
        b"POST /d/c HTTP/1.0\r\ncontent-length: 1\r\n\r\nc",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", server)
        writer.write(raw)
        data = await asyncio.wait_for(reader.read(), 5)  # the server closes the connection
        assert b"connection: close\r\n" in data and data.endswith(b"direct:c")
        writer.close()


async def test_a_failing_silent_or_malformed_direct_route_gets_a_500(server: int) -> None:
    for path in (b"/d/fail", b"/d/silent", b"/d/bad-header"):
        raw = b"POST %s HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\n\r\n1" % path
        reader, writer = await asyncio.open_connection("127.0.0.1", server)
        writer.write(raw)
        data = await asyncio.wait_for(reader.read(), 5)  # answered, then closed
        assert data.startswith(b"HTTP/1.1 500 "), path
        assert b"x-injected" not in data
        writer.close()


async def test_a_direct_request_hears_its_client_leave(server: int) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(b"POST /d/wait HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\n\r\nw")
    for _ in range(200):
        if SEEN:
            break
        await asyncio.sleep(0.01)
    writer.close()
    for _ in range(200):
        if len(SEEN) == 2:
            break
        await asyncio.sleep(0.01)
    assert SEEN[1] == {"type": "http.disconnect"}


async def _inferd_on_loopback(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, **overrides: Any
) -> tuple[list[str], list[bytes]]:
    """inferd as ``inferd serve`` runs it, on a socket: a prediction of each protocol, the
    paths answered as direct requests and the answers."""
    from inferd.app import create_app
    from inferd.server import uvicorn_config

    responded: list[str] = []
    respond = Direct.respond

    def noting(self: Direct, status: int, headers: Any, body: bytes) -> None:
        responded.append(self.scope["path"])
        respond(self, status, headers, body)

    monkeypatch.setattr(Direct, "respond", noting)
    settings = make_settings(**overrides)
    asgi = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn_config(asgi, settings))
    task = asyncio.create_task(srv.serve(sockets=[sock]))
    try:
        await asgi.wait_ready(within=30)
        v1 = b'{"features": [5.1, 3.5, 1.4, 0.2]}'
        v2 = (
            b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64", '
            b'"data": [5.1, 3.5, 1.4, 0.2]}]}'
        )
        answers = []
        for path, body in (
            (b"/predict", v1),
            (b"/v2/models/iris/infer", v2),
            (b"/predict", b"{"),
        ):
            raw = (
                b"POST %s HTTP/1.1\r\nhost: a\r\norigin: http://app.example\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (path, len(body), body)
            )
            answers.append(await _exchange(port, raw, b"}"))
        return responded, answers
    finally:
        srv.should_exit = True
        await task


async def test_inferd_serves_its_prediction_routes_as_direct_requests(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    responded, answers = await _inferd_on_loopback(make_settings, monkeypatch)
    assert responded == ["/predict", "/v2/models/iris/infer", "/predict"]
    ok, v2, bad = answers
    assert ok.startswith(b"HTTP/1.1 200 ") and b'"prediction"' in ok and b"x-request-id: " in ok
    assert v2.startswith(b"HTTP/1.1 200 ") and b'"outputs"' in v2
    assert bad.startswith(b"HTTP/1.1 400 ") and b'"error"' in bad


async def test_with_cors_every_request_takes_the_asgi_cycle(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    responded, answers = await _inferd_on_loopback(
        make_settings, monkeypatch, cors_origins=["http://app.example"]
    )
    assert responded == []
    assert all(b"access-control-allow-origin: http://app.example" in a for a in answers)
