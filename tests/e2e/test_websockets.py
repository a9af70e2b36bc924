"""Long-running requests over WebSocket, with the ``websockets`` client against a real
``inferd serve`` (keys required): the same events as the SSE stream, resumed from a seq,
submitted over the socket, and refusals as close codes with a reason."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.e2e.conftest import Server
from tests.support.models import write_streaming_model


async def _create_key(database_url: str, user: str, scopes: list[str]) -> str:
    from inferd.db.migrate import migrate
    from inferd.jobs.sql import SqlStore
    from inferd.tenancy.keys import KeyStore

    await migrate(database_url)
    store = SqlStore(database_url)
    try:
        key, _ = await KeyStore(store.engine).create(user, scopes, None, None)
    finally:
        await store.close()
    return key


class Secured:
    def __init__(self, server: Server, keys: dict[str, str]) -> None:
        self.server = server
        self.keys = keys
        self.ws = server.url.replace("http://", "ws://")

    def headers(self, who: str = "sam") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def submit(self, text: str, chunks: int = 3, who: str = "sam") -> str:
        body = {"model": "streamer", "input": text, "parameters": {"chunks": chunks}}
        r = httpx.post(
            self.server.url + "/v1/requests", json=body, headers=self.headers(who), timeout=10
        )
        assert r.status_code == 202, r.text
        request_id: str = r.json()["id"]
        return request_id

    def sse(self, request_id: str, after: int = 0) -> list[tuple[int, str, Any]]:
        """The whole SSE stream of a request, as (id, event, data)."""
        headers = {**self.headers(), "Last-Event-ID": str(after)}
        url = f"{self.server.url}/v1/requests/{request_id}/events"
        events: list[tuple[int, str, Any]] = []
        with httpx.stream("GET", url, headers=headers, timeout=20) as r:
            assert r.status_code == 200
            fields: dict[str, list[str]] = {}
            for line in r.iter_lines():
                if line == "":
                    if "id" in fields:
                        data = json.loads("\n".join(fields["data"]))
                        events.append((int(fields["id"][0]), fields["event"][0], data))
                    fields = {}
                elif not line.startswith(":"):
                    name, _, value = line.partition(": ")
                    fields.setdefault(name, []).append(value)
        return events


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, demo_models: Path) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("ws")
    models = root / "models"
    shutil.copytree(demo_models, models)
    write_streaming_model(models, chunk_delay_s=0.05)
    database_url = f"sqlite+aiosqlite:///{root / 'inferd.db'}"
    (root / "inferd.toml").write_text(
        f'models_dir = "{models}"\ndatabase_url = "{database_url}"\nauth = "required"\n'
        "key_cache_seconds = 0\n"
    )
    keys = {
        "sam": asyncio.run(_create_key(database_url, "sam", ["requests"])),
        "alex": asyncio.run(_create_key(database_url, "alex", ["requests"])),
        "predictor": asyncio.run(_create_key(database_url, "pia", ["predict"])),
    }
    server = Server(["--config", str(root / "inferd.toml")], root)
    try:
        server.wait_ready()
        yield Secured(server, keys)
    finally:
        server.stop()


async def _messages(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every message until the server closes."""
    received: list[dict[str, Any]] = []
    try:
        while True:
            received.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
    except ConnectionClosed:
        return received


def _json_line(text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _events(messages: list[dict[str, Any]]) -> list[tuple[int, str, Any]]:
    return [(m["seq"], m["event"], m["data"]) for m in messages if "seq" in m]


async def _follow(
    url: str, headers: dict[str, str] | None = None, first: dict[str, Any] | None = None
) -> tuple[list[dict[str, Any]], int | None, str | None]:
    async with connect(url, additional_headers=headers or {}) as ws:
        if first is not None:
            await ws.send(json.dumps(first))
        messages = await _messages(ws)
        return messages, ws.close_code, ws.close_reason


def test_events_are_the_sse_events_and_resume_from_a_seq(secured: Secured) -> None:
    request_id = secured.submit("hi", chunks=3)
    url = f"{secured.ws}/v1/requests/{request_id}/ws"
    # Followed live (the model sleeps 50 ms a chunk), ending with a normal close.
    live, code, _ = asyncio.run(_follow(url, secured.headers()))
    assert code == 1000
    sse = secured.sse(request_id)
    assert _events(live) == sse
    kinds = [event for _, event, _ in sse]
    assert kinds[-1] == "done" and kinds.count("response") == 3
    assert [data["response"] for _, event, data in sse if event == "response"] == [
        "hi-0",
        "hi-1",
        "hi-2",
    ]
    assert [seq for seq, _, _ in sse] == list(range(1, len(sse) + 1))
    # Resumed after seq 2: the query parameter, or the first message with the key in it.
    tail, code, _ = asyncio.run(_follow(url + "?after=2", secured.headers()))
    assert (_events(tail), code) == (sse[2:], 1000)
    assert _events(tail) == secured.sse(request_id, after=2)
    first = {"api_key": secured.keys["sam"], "after": len(sse) - 1}
    last, code, _ = asyncio.run(_follow(url, first=first))
    assert (_events(last), code) == (sse[-1:], 1000)


def test_submit_over_the_socket(secured: Secured) -> None:
    async def submit(headers: dict[str, str], body: dict[str, Any]) -> Any:
        async with connect(f"{secured.ws}/v1/requests/ws", additional_headers=headers) as ws:
            await ws.send(json.dumps(body))
            return await _messages(ws), ws.close_code, ws.close_reason

    body = {"model": "streamer", "input": "yo", "parameters": {"chunks": 2}}
    messages, code, _ = asyncio.run(submit(secured.headers(), body))
    accepted = messages[0]
    assert accepted["event"] == "accepted" and accepted["data"]["status"] == "queued"
    request_id = accepted["data"]["id"]
    assert accepted["data"]["events_url"] == f"/v1/requests/{request_id}/events"
    assert code == 1000
    assert _events(messages[1:]) == secured.sse(request_id)
    assert [m["data"]["response"] for m in messages if m.get("event") == "response"] == [
        "yo-0",
        "yo-1",
    ]
    stored = httpx.get(
        f"{secured.server.url}/v1/requests/{request_id}", headers=secured.headers(), timeout=10
    ).json()
    assert (stored["status"], stored["user"]) == ("succeeded", "sam")
    # A browser's way: the key next to the body; an idempotency key replays the same request.
    browser = {**body, "api_key": secured.keys["sam"], "idempotency_key": "ws-once"}
    first, _, _ = asyncio.run(submit({}, browser))
    again, code, _ = asyncio.run(submit({}, browser))
    assert again[0]["data"]["id"] == first[0]["data"]["id"]
    assert again[0]["data"].get("replayed") is True and code == 1000
    # A body the HTTP route refuses with a 422 is refused here with 4422 and the same error.
    refused, code, reason = asyncio.run(submit(secured.headers(), {"model": "streamer"}))
    assert (code, reason) == (4422, "missing field 'input'")
    assert refused == [
        {"error": {"code": "validation_failed", "message": reason, "retryable": False}}
    ]


def test_refusals_close_with_a_code_and_a_reason(secured: Secured) -> None:
    request_id = secured.submit("mine", chunks=1)
    url = f"{secured.ws}/v1/requests/{request_id}/ws"

    def refused(
        url: str, headers: dict[str, str] | None = None, first: dict[str, Any] | None = None
    ) -> tuple[int | None, str | None, str]:
        messages, code, reason = asyncio.run(_follow(url, headers, first))
        assert len(messages) == 1 and set(messages[0]) == {"error"}, messages
        assert messages[0]["error"]["message"] == reason
        return code, reason, messages[0]["error"]["code"]

    wrong = {"Authorization": "Bearer inferd_nope"}
    assert refused(url, wrong)[:1] == (4401,)
    code, reason, kind = refused(url, first={"api_key": "inferd_nope"})
    assert (code, kind) == (4401, "unauthorized") and reason and "API key" in reason
    code, reason, kind = refused(url, first={"after": 1})  # no key anywhere
    assert (code, kind) == (4401, "unauthorized")
    code, reason, kind = refused(url, secured.headers("predictor"))
    assert (code, kind) == (4403, "forbidden") and reason and "'requests'" in reason
    # Someone else's request and an unknown id look the same.
    code, reason, kind = refused(url, secured.headers("alex"))
    assert (code, kind) == (4404, "not_found")
    code, reason, kind = refused(f"{secured.ws}/v1/requests/nope/ws", secured.headers())
    assert (code, kind) == (4404, "not_found") and reason == "request 'nope' does not exist"
    code, reason, kind = refused(url + "?after=minus-one", secured.headers())
    assert (code, kind) == (4400, "bad_request")
    # Submitting needs the same scope.
    code, _, kind = refused(
        f"{secured.ws}/v1/requests/ws",
        secured.headers("predictor"),
        first={"model": "streamer", "input": "x"},
    )
    assert (code, kind) == (4403, "forbidden")
    # Each socket has its line in the server's log, as a request has its access line.
    sockets = [
        line
        for line in map(_json_line, secured.server.output().splitlines())
        if line.get("event") == "websocket"
    ]
    assert {"path": "/v1/requests/nope/ws", "close_code": 4404, "user": "sam"}.items() <= next(
        line for line in sockets if line["path"].endswith("/nope/ws")
    ).items()
    assert any(line["close_code"] == 1000 and line["events"] > 0 for line in sockets)
