"""RedisEventBus against a real Redis on loopback, as several API processes would use it."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime

import pytest
import redis
import redis.asyncio

from inferd.http.sse import follow
from inferd.jobs.events import RedisEventBus, create_event_bus
from inferd.jobs.types import Event, EventKind
from tests.support.memory_store import MemoryStore
from tests.unit.test_sse import collect

REDIS_URL = "redis://127.0.0.1:6379/0"


def _require(what: str, error: BaseException) -> None:
    if os.environ.get("INFERD_TEST_REQUIRE_SERVICES") == "1":
        raise AssertionError(f"{what} is required for this test: {error!r}")
    pytest.skip(f"{what} is not reachable: {error!r}")


@pytest.fixture(scope="module")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1).ping()
    except (redis.RedisError, OSError) as exc:
        _require("Redis", exc)
    return REDIS_URL


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rid() -> str:
    return f"test-{uuid.uuid4().hex}"


@contextlib.asynccontextmanager
async def buses(url: str, n: int, **options: float) -> AsyncIterator[list[RedisEventBus]]:
    opened = [RedisEventBus(url, **options) for _ in range(n)]  # type: ignore[arg-type]
    try:
        yield opened
    finally:
        for bus in opened:
            await bus.close()


async def numsub(url: str, request_id: str) -> int:
    client = redis.asyncio.Redis.from_url(url)
    try:
        [(_, count)] = await client.pubsub_numsub(f"inferd:events:{request_id}")
        return int(count)
    finally:
        await client.aclose()


async def eventually(check: Callable[[], bool | Awaitable[bool]], within: float = 2.0) -> None:
    async with asyncio.timeout(within):
        # Polling: the state belongs to a server or a background task, not to an Event here.
        while not (await result if inspect.isawaitable(result := check()) else result):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_publish_reaches_a_subscriber_of_another_bus(redis_url: str) -> None:
    async with buses(redis_url, 2) as (api_a, api_b):
        request_id = rid()
        sub = api_b.subscribe(request_id)
        await sub.ready()
        async with asyncio.timeout(2):
            await api_a.publish(request_id, 1)
            assert await anext(sub) == 1
            await api_a.publish(request_id, 2)
            assert await anext(sub) == 2
        assert api_a.publish_errors == 0 and api_b.connected


async def test_channel_and_payload_on_the_wire(redis_url: str) -> None:
    request_id = rid()
    raw = redis.asyncio.Redis.from_url(redis_url)
    pubsub = raw.pubsub()
    await pubsub.subscribe(f"inferd:events:{request_id}")
    try:
        async with buses(redis_url, 1) as (bus,), asyncio.timeout(2):
            await bus.publish(request_id, 7)
            while (msg := await pubsub.get_message(timeout=1)) and msg["type"] != "message":
                pass
            assert msg is not None and msg["data"] == b"7"
            sub = bus.subscribe(request_id)
            await sub.ready()
            await raw.publish(f"inferd:events:{request_id}", "9")
            await raw.publish(f"inferd:events:{request_id}", "not a seq")  # ignored
            assert await anext(sub) == 9
    finally:
        await pubsub.aclose()
        await raw.aclose()


async def test_published_events_reach_another_bus_themselves(redis_url: str) -> None:
    """publish_events carries the events: a follower in another process gets them equal to
    what was stored, and needs no read of the store."""
    request_id = rid()
    at = datetime(2026, 12, 7, 6, 0, 0, 123456, tzinfo=UTC)
    stored = [
        Event(request_id, 3, EventKind.RESPONSE, {"response": "tick-0", "x": [1.5]}, 1, at),
        Event(request_id, 4, EventKind.DONE, {"status": "succeeded", "result": None}, 1, at),
    ]
    async with buses(redis_url, 2) as (worker, api), asyncio.timeout(2):
        sub = api.subscribe(request_id)
        await sub.ready()
        await worker.publish_events(stored)
        assert await anext(sub) == 4
        assert sub.take(2, 4) == stored
        # Too big to carry (a large result): only the seq goes, the follower reads the store.
        big = Event(request_id, 5, EventKind.RESPONSE, {"response": "x" * 70_000}, 1, at)
        await worker.publish_events([big])
        assert await anext(sub) == 5
        assert sub.take(4, 5) == []
        assert worker.publish_errors == 0


async def test_many_subscribers_share_one_connection(redis_url: str) -> None:
    async with buses(redis_url, 3) as (publisher, api_b, api_c):
        ids = [rid() for _ in range(5)]
        subs = {
            (bus, i): [bus.subscribe(i) for _ in range(4)] for bus in (api_b, api_c) for i in ids
        }
        await asyncio.gather(*(s.ready() for group in subs.values() for s in group))
        for i in ids:
            assert await numsub(redis_url, i) == 2  # one per bus, not one per subscriber
        for seq, i in enumerate(ids, start=1):
            await publisher.publish(i, seq)
        async with asyncio.timeout(2):
            for (_, i), group in subs.items():
                assert [await anext(s) for s in group] == [ids.index(i) + 1] * 4


async def test_unsubscribe_releases_the_channel(redis_url: str) -> None:
    async with buses(redis_url, 1) as (bus,):
        request_id = rid()
        first, second = bus.subscribe(request_id), bus.subscribe(request_id)
        await first.ready()
        assert await numsub(redis_url, request_id) == 1
        await first.aclose()
        await asyncio.sleep(0.05)
        assert await numsub(redis_url, request_id) == 1  # the other subscriber still needs it
        await second.aclose()
        await eventually(lambda: _count_is(redis_url, request_id, 0))
        assert bus.subscriber_count() == 0 and not bus._confirmed and not bus._active


async def _count_is(url: str, request_id: str, expected: int) -> bool:
    return await numsub(url, request_id) == expected


async def test_an_announcement_wakes_one_idle_worker_of_all_processes(redis_url: str) -> None:
    prefix = f"{rid()}:"
    opened = [RedisEventBus(redis_url, prefix=prefix) for _ in range(3)]
    try:
        waiters = [asyncio.ensure_future(bus.wait_announced(1.0)) for bus in opened]
        await asyncio.sleep(0.1)  # all three block in BLPOP
        await opened[0].announce()
        assert sorted(await asyncio.gather(*waiters)) == [False, False, True]
        await opened[0].announce()  # no one waits: kept for the next one
        await opened[0].announce()  # coalesced
        assert await opened[1].wait_announced(0.1) is True
        assert await opened[2].wait_announced(0.1) is False
    finally:
        for bus in opened:
            await bus.close()


async def test_announcements_without_redis_do_not_raise() -> None:
    bus = RedisEventBus(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    try:
        await bus.announce()
        assert await bus.wait_announced(0.05) is False
    finally:
        await bus.close()


async def test_publish_to_unreachable_redis_does_not_raise() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    async with buses(url, 1, timeout=0.5) as (bus,), asyncio.timeout(2):
        request_id = rid()
        sub = bus.subscribe(request_id)
        await sub.ready()  # returns at once: Redis is not there to acknowledge
        await bus.publish(request_id, 1)
        await bus.publish(request_id, 2)  # within the back-off: not even tried
        assert bus.publish_errors == 2 and not bus.connected
        assert await anext(sub) == 2  # this process's own followers are still woken


def test_factory_builds_a_redis_bus(redis_url: str) -> None:
    async def check() -> None:
        bus = create_event_bus(redis_url)
        assert isinstance(bus, RedisEventBus)
        await bus.close()

    asyncio.run(check())


async def test_follow_across_processes(redis_url: str) -> None:
    store = MemoryStore()
    store.add("r1")
    async with buses(redis_url, 2, prefix=f"inferd:test:{uuid.uuid4().hex}:") as (api, worker):
        # poll is long: delivery within the timeout has to come through Redis.
        frames = asyncio.create_task(collect(follow(store, api, "r1", poll=30), within=2))
        await asyncio.sleep(0.05)
        await worker.publish("r1", store.push("r1", EventKind.RESPONSE))
        await asyncio.sleep(0.05)
        await worker.publish("r1", store.push("r1", EventKind.DONE))
        assert [f["id"] for f in await frames] == ["1", "2"]
        assert api.subscriber_count() == 0


async def test_pings_keep_an_idle_connection(redis_url: str) -> None:
    async with buses(redis_url, 2, ping_interval=0.05) as (api, worker):
        request_id = rid()
        sub = api.subscribe(request_id)
        await sub.ready()
        await asyncio.sleep(0.3)  # several PING rounds with one channel
        await worker.publish(request_id, 1)
        async with asyncio.timeout(1):
            assert await anext(sub) == 1
        await sub.aclose()
        await asyncio.sleep(0.3)  # and with none
        assert api.connected and api.disconnects == 0


class FreezingProxy:
    """A TCP proxy to Redis that can go silent without closing anything: a half-open link."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.generation = 0  # connections from an older generation stay silent for good
        self.frozen = False
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> FreezingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()

    def freeze(self, frozen: bool = True) -> None:
        self.frozen, self.generation = frozen, self.generation + 1

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        generation = self.generation
        await asyncio.gather(
            self._pipe(reader, up_writer, generation), self._pipe(up_reader, writer, generation)
        )

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, gen: int) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                if gen == self.generation and not self.frozen:
                    dst.write(data)
                    await dst.drain()


async def test_silent_connection_is_detected_and_replaced(redis_url: str) -> None:
    prefix = f"inferd:test:{uuid.uuid4().hex}:"
    options = {"prefix": prefix, "timeout": 0.3, "reconnect_delay": (0.02, 0.05)}
    async with FreezingProxy(6379) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        async with buses(url, 1, ping_interval=0.05, **options) as (api,):  # type: ignore[arg-type]
            request_id = rid()
            sub = api.subscribe(request_id)
            await sub.ready()
            proxy.freeze()
            await eventually(lambda: not api.connected, within=1)  # no PONG: given up on
            assert api.disconnects == 1
            started = asyncio.get_running_loop().time()
            await api.publish(request_id, 1)  # a silent server costs at most the timeout
            assert asyncio.get_running_loop().time() - started < 0.6
            assert api.publish_errors == 1
            assert await anext(sub) == 1  # this process's own follower was still woken

            proxy.freeze(False)
            await eventually(lambda: api.connected)
            await sub.ready()
            async with buses(redis_url, 1, **options) as (worker,), asyncio.timeout(1):
                await worker.publish(request_id, 2)
                assert await anext(sub) == 2  # through the new connection


class PrivateRedis:
    """A throwaway redis-server that a test may stop and start again on the same port."""

    def __init__(self, server: str) -> None:
        port = free_port()
        self.url = f"redis://127.0.0.1:{port}/0"
        self._args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = subprocess.DEVNULL
        self._proc = subprocess.Popen([*self._args, "--appendonly", "no"], stdout=out, stderr=out)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    instance = PrivateRedis(server)
    instance.start()
    yield instance
    instance.stop()


async def _ping(url: str) -> bool:
    client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=0.2)
    try:
        return bool(await client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        await client.aclose()


async def test_subscriber_survives_a_redis_restart(private_redis: PrivateRedis) -> None:
    url = private_redis.url
    await eventually(lambda: _ping(url))
    fast = {"timeout": 0.5, "reconnect_delay": (0.02, 0.1)}
    async with buses(url, 2, **fast) as (api, worker):  # type: ignore[arg-type]
        request_id = rid()
        sub = api.subscribe(request_id)
        await sub.ready()
        await worker.publish(request_id, 1)
        async with asyncio.timeout(2):
            assert await anext(sub) == 1

        private_redis.stop()
        await eventually(lambda: not api.connected)
        await worker.publish(request_id, 2)  # lost, and says so without raising
        assert worker.publish_errors == 1

        private_redis.start()
        await eventually(lambda: api.connected)
        await sub.ready()  # resubscribed on the new connection
        async with asyncio.timeout(2):
            seq = 3
            while True:  # the worker's publisher backs off briefly after its failure
                await worker.publish(request_id, seq)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        assert await anext(sub) >= 3
                        break
                seq += 1
        assert api.disconnects == 1 and api.subscriber_count(request_id) == 1
