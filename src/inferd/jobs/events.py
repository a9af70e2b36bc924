"""Event buses: tell SSE followers that a request has new events, and idle workers that
requests were queued.

A bus wakes followers up; the store stays the source of truth, so a bus may coalesce or drop
notifications. Workers publish the events they stored themselves (:meth:`publish_events`),
and a follower that finds on its subscription every event up to the one announced delivers
them without reading the store (on a gap, or for a payload too big to carry, it reads the
store). :class:`InProcessEventBus` serves one process; :class:`RedisEventBus` spans processes
through Redis pub/sub.

Queued requests are announced differently: an announcement wakes *one* idle worker (the one
that takes it), not every worker, and waits for a taker if none is idle. Every worker that
claims on a broadcast costs a transaction, and most of them find nothing. A worker that
claims a full batch announces again, so that another idle worker joins in while there is
more. In one process: a pending flag and a line of waiters; through Redis: a list of at most
one element, pushed by ``announce`` and popped (``BLPOP``) by idle workers.

Redis outages: ``publish`` never raises (it logs once per outage, counts each failure in
``publish_errors`` and still wakes this process's own subscribers). Subscriptions survive a
Redis restart: one reader task holds a single pub/sub connection for all channels and
reconnects with jittered backoff, resubscribing every channel in use; notifications sent while
it was away are lost, which followers cover by polling the store.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import orjson

from inferd.errors import ConfigError
from inferd.jobs.types import QUEUED_CHANNEL, Event, EventBus, EventKind

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

__all__ = [
    "InProcessEventBus",
    "RedisEventBus",
    "Subscription",
    "SupportsReady",
    "SupportsTake",
    "create_event_bus",
]

log = logging.getLogger("inferd.jobs.events")


@runtime_checkable
class SupportsReady(Protocol):
    """A subscription that can say when publishes reach it (Redis subscribes asynchronously)."""

    async def ready(self) -> None:
        """Return once publishes are delivered, or after a bounded wait if they cannot be."""


_HELD = 256  # events a subscription keeps for its reader; one further behind reads the store
_CARRIED_BYTES = 64 * 1024  # a larger publish to Redis carries only its seq


@runtime_checkable
class SupportsTake(Protocol):
    """A subscription that hands over the events the bus carried (see :meth:`Subscription.take`)."""

    def take(self, after: int, upto: int) -> list[Event]:
        """The events ``after + 1`` to ``upto`` if the bus carried every one, else none."""


class _Slot:
    """One subscriber's mailbox: the highest seq announced, and the events carried by the
    bus that the reader has not taken yet (at most ``_HELD``: a reader further behind drops
    them and reads the store)."""

    __slots__ = ("closed", "held", "latest", "wake")

    def __init__(self) -> None:
        self.latest: int | None = None
        self.closed = False
        self.wake = asyncio.Event()
        self.held: dict[int, Event] = {}

    def offer(self, seq: int, events: Sequence[Event] = ()) -> None:
        if events:
            if len(self.held) + len(events) > _HELD:
                self.held.clear()
            else:
                for event in events:
                    self.held[event.seq] = event
        if self.latest is None or seq > self.latest:
            self.latest = seq
        self.wake.set()

    def take(self, after: int, upto: int) -> list[Event]:
        """The carried events ``after + 1`` to ``upto``, or none unless the bus carried every
        one of them."""
        held = self.held
        if not held:
            return []
        for seq in [seq for seq in held if seq <= after]:
            del held[seq]
        run: list[Event] = []
        seq = after + 1
        while seq <= upto and seq in held:
            run.append(held.pop(seq))
            seq += 1
        if seq <= upto:  # a gap: the store has them all
            held.clear()
            return []
        return run

    def close(self) -> None:
        self.closed = True
        self.wake.set()


def _why(exc: BaseException) -> str:
    # redis-py's exceptions have a terse repr ("network:ConnectionError"); say what happened.
    return f"{type(exc).__name__}: {exc}"


class Subscription(AsyncIterator[int]):
    """The seqs published for one request (while the reader lags, only the highest is kept).
    Leaves its bus on :meth:`aclose`, when the bus closes, or when garbage-collected."""

    def __init__(self, bus: InProcessEventBus, request_id: str) -> None:
        self.request_id = request_id
        self._bus, self._slot = bus, _Slot()
        bus._add(request_id, self._slot)  # registered now, not on first anext: no gap
        # The finalizer holds the bus and the slot, never the subscription itself.
        self._finalizer = weakref.finalize(self, bus._discard_soon, request_id, self._slot)

    async def __anext__(self) -> int:
        slot = self._slot
        while not slot.closed:
            if slot.latest is not None:
                seq, slot.latest = slot.latest, None
                slot.wake.clear()
                return seq
            await slot.wake.wait()
        raise StopAsyncIteration

    async def next_within(self, seconds: float) -> int | None:
        """:meth:`__anext__` or None after ``seconds``, in the caller's task: a follower
        waiting with a timeout needs no task of its own per event (its wake-up is one turn
        of the event loop, not three). Raises StopAsyncIteration once closed."""
        slot = self._slot
        if slot.latest is None and not slot.closed:
            try:
                async with asyncio.timeout(seconds):
                    await slot.wake.wait()
            except TimeoutError:
                return None
        return await self.__anext__()  # (returns at once: a seq is there, or it is closed)

    async def ready(self) -> None:
        """Return once publishes reach this subscription (a bounded wait)."""
        if not self._slot.closed:
            await self._bus._ready(self.request_id)

    def take(self, after: int, upto: int) -> list[Event]:
        """The events ``after + 1`` to ``upto`` as the bus carried them (in seq order), or an
        empty list unless it carried every one: then read them from the store."""
        return self._slot.take(after, upto)

    async def aclose(self) -> None:
        """End the iteration and leave the bus."""
        self._slot.close()
        if self._finalizer.detach() is not None:
            self._bus._discard(self.request_id, self._slot)


class InProcessEventBus:
    """An :class:`~inferd.jobs.types.EventBus` for followers and workers in this process."""

    def __init__(self) -> None:
        self._slots: dict[str, set[_Slot]] = {}
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._announced = False  # an announcement no worker has taken yet
        self._idle: collections.deque[asyncio.Future[None]] = collections.deque()

    async def announce(self) -> None:
        """Requests were queued: wake one idle worker, or the next one to wait."""
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._announced = True

    async def wait_announced(self, seconds: float) -> bool:
        """Wait at most ``seconds`` to take an announcement; whether one was taken."""
        if self._announced:
            self._announced = False
            return True
        if self._closed:
            await asyncio.sleep(seconds)
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle.append(waiter)
        try:
            await asyncio.wait((waiter,), timeout=seconds)  # does not cancel the waiter
        finally:
            if not waiter.done():
                waiter.cancel()
                self._idle.remove(waiter)
        return not waiter.cancelled()

    async def publish(self, request_id: str, seq: int) -> None:
        """Wake every current subscriber of ``request_id``."""
        self._wake(request_id, seq)

    async def publish_many(self, items: Sequence[tuple[str, int]]) -> None:
        """:meth:`publish` each (request id, seq)."""
        for request_id, seq in items:
            self._wake(request_id, seq)

    async def publish_events(self, events: Sequence[Event]) -> None:
        """Publish stored events themselves (each request's in seq order): like
        :meth:`publish` of each request's last seq, and a follower that holds every event up
        to it delivers them without reading the store."""
        for request_id, carried in _by_request(events):
            self._wake(request_id, carried[-1].seq, carried)

    def subscribe(self, request_id: str) -> Subscription:
        """Subscribe now (call on the event loop); iterate the result to receive seqs."""
        return Subscription(self, request_id)

    def subscriber_count(self, request_id: str | None = None) -> int:
        """Subscribers of ``request_id``, or of every request."""
        if request_id is not None:
            return len(self._slots.get(request_id, ()))
        return sum(len(slots) for slots in self._slots.values())

    async def close(self) -> None:
        """End every subscription."""
        self._closed = True
        for request_id, slots in list(self._slots.items()):
            for slot in list(slots):
                self._discard(request_id, slot)

    def _wake(self, request_id: str, seq: int, events: Sequence[Event] = ()) -> None:
        for slot in tuple(self._slots.get(request_id, ())):
            slot.offer(seq, events)

    def _add(self, request_id: str, slot: _Slot) -> None:
        if self._closed:
            slot.close()
            return
        self._loop = asyncio.get_running_loop()
        if request_id not in self._slots:
            self._slots[request_id] = set()
            self._first(request_id)
        self._slots[request_id].add(slot)

    def _discard(self, request_id: str, slot: _Slot) -> None:
        slot.close()
        slots = self._slots.get(request_id)
        if slots is not None and slot in slots:
            slots.discard(slot)
            if not slots:
                del self._slots[request_id]
                self._last(request_id)

    def _discard_soon(self, request_id: str, slot: _Slot) -> None:
        # Garbage collection may run this in any thread, or in the middle of a publish: hand
        # the removal to the event loop, or do it now if that loop is gone.
        try:
            if self._loop is None:
                raise RuntimeError("no event loop")
            self._loop.call_soon_threadsafe(self._discard, request_id, slot)
        except RuntimeError:
            self._discard(request_id, slot)

    # Hooks for buses that must act when a request gains its first or loses its last follower.
    def _first(self, request_id: str) -> None:
        pass

    def _last(self, request_id: str) -> None:
        pass

    async def _ready(self, request_id: str) -> None:
        pass


def _by_request(events: Sequence[Event]) -> list[tuple[str, list[Event]]]:
    grouped: dict[str, list[Event]] = {}
    for event in events:
        grouped.setdefault(event.request_id, []).append(event)
    return list(grouped.items())


def _encode(seq: int, events: Sequence[Event]) -> bytes:
    """A publish's payload: the seq as text, or, to carry the events, a JSON object (``seq``
    and ``events``, each ``[seq, kind, attempt, created_at, data]``) of at most
    ``_CARRIED_BYTES``."""
    if events:
        try:
            payload = orjson.dumps(
                {
                    "seq": seq,
                    "events": [
                        [e.seq, e.kind.value, e.attempt, e.created_at, e.data] for e in events
                    ],
                }
            )
        except TypeError:  # data the store encodes its own way: followers read it there
            pass
        else:
            if len(payload) <= _CARRIED_BYTES:
                return payload
    return b"%d" % seq


def _decode(request_id: str, payload: bytes) -> tuple[int, list[Event]]:
    """(seq, carried events) of a payload made by :func:`_encode` (or by a process that
    sends only seqs)."""
    if not payload.startswith(b"{"):
        return int(payload), []
    body = orjson.loads(payload)
    events = [
        Event(request_id, seq, EventKind(kind), data, attempt, datetime.fromisoformat(created))
        for seq, kind, attempt, created, data in body["events"]
    ]
    return int(body["seq"]), events


class RedisEventBus(InProcessEventBus):
    """An :class:`~inferd.jobs.types.EventBus` across processes: channel
    ``<prefix><request_id>``, payload the seq as text, or the seq and the events themselves as
    JSON (:meth:`publish_events`, up to 64 KiB). One connection publishes; one pub/sub
    connection, owned by a reader task, carries every channel this process follows.

    A subscription's ``ready()`` waits (at most ``timeout``) until Redis acknowledged its
    SUBSCRIBE, and returns at once while Redis is unreachable. ``connected`` tells whether the
    pub/sub connection is up, ``disconnects`` how often it was lost, ``publish_errors`` how
    many publishes did not reach Redis."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "inferd:events:",
        timeout: float = 1.0,
        ping_interval: float = 5.0,
        reconnect_delay: tuple[float, float] = (0.1, 5.0),
    ) -> None:
        try:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError("the Redis event bus needs: pip install 'inferd[redis]'") from exc
        super().__init__()
        self._prefix, self._timeout, self._ping = prefix, timeout, ping_interval
        self._delays = reconnect_delay
        opts: dict[str, Any] = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
        # One retry lets a publish ride over a connection that died in a Redis restart.
        self._pub: Redis = Redis.from_url(url, retry=Retry(NoBackoff(), 1), **opts)
        # The reader rebuilds its connection itself; redis-py's own retries would race it.
        self._sub: Redis = Redis.from_url(url, retry=Retry(NoBackoff(), 0), **opts)
        self._wanted: set[str] = set()  # request ids with subscribers in this process
        self._active: set[str] = set()  # SUBSCRIBE sent on the current connection
        self._confirmed: dict[str, asyncio.Event] = {}  # set once Redis acknowledged it
        self._dirty = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._heard = 0.0  # the loop's time of the last message on the pub/sub connection
        self._queued = prefix + QUEUED_CHANNEL  # the list of (at most one) announcement
        # Idle workers block in BLPOP: a connection of their own, without a read timeout.
        self._doorbell: Redis = Redis.from_url(
            url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=timeout
        )
        self._publish_down, self._publish_retry_at = False, 0.0
        self._unreachable = False  # the last connection attempt failed, or the connection died
        self.connected = False
        self.disconnects = 0
        self.publish_errors = 0

    async def publish(self, request_id: str, seq: int) -> None:
        """Publish to Redis; on failure log (once per outage), count, and wake local followers.
        Never raises: the event is already stored and followers poll the store."""
        await self.publish_many(((request_id, seq),))

    async def publish_many(self, items: Sequence[tuple[str, int]]) -> None:
        """:meth:`publish` each (request id, seq), in one round trip to Redis (a pipeline)."""
        await self._send([(request_id, seq, b"%d" % seq, ()) for request_id, seq in items])

    async def publish_events(self, events: Sequence[Event]) -> None:
        """Publish stored events themselves, each request's in one message (its seq alone
        when they encode to more than 64 KiB), all in one round trip to Redis."""
        messages = []
        for request_id, carried in _by_request(events):
            seq = carried[-1].seq
            messages.append((request_id, seq, _encode(seq, carried), carried))
        await self._send(messages)

    async def _send(self, messages: Sequence[tuple[str, int, bytes, Sequence[Event]]]) -> None:
        if self._closed or not messages:
            return
        loop = asyncio.get_running_loop()
        if self._publish_down and loop.time() < self._publish_retry_at:
            # Redis failed moments ago: do not make every chunk wait for it to fail again.
            self.publish_errors += len(messages)
            for request_id, seq, _, events in messages:
                self._wake(request_id, seq, events)
            return
        try:
            async with asyncio.timeout(self._timeout):
                if len(messages) == 1:
                    request_id, _, payload, _ = messages[0]
                    await self._pub.publish(self._prefix + request_id, payload)
                else:
                    pipe = self._pub.pipeline(transaction=False)
                    for request_id, _, payload, _ in messages:
                        pipe.publish(self._prefix + request_id, payload)
                    await pipe.execute()
        except Exception as exc:  # best effort by design: the store is the source of truth
            self.publish_errors += len(messages)
            self._publish_retry_at = loop.time() + self._delays[0]
            if not self._publish_down:
                log.warning(
                    "event bus: publish to Redis failed; followers will poll: %s", _why(exc)
                )
            self._publish_down = True
            for request_id, seq, _, events in messages:
                self._wake(request_id, seq, events)
        else:
            if self._publish_down:
                log.info("event bus: publishing to Redis again")
            self._publish_down = False

    async def announce(self) -> None:
        """Requests were queued: push the announcement, which one idle worker (of any
        process) takes. Never raises: workers poll the queue anyway."""
        if self._closed:
            return
        try:
            async with asyncio.timeout(self._timeout):
                pipe = self._pub.pipeline(transaction=False)  # two at once may leave two
                pipe.lpush(self._queued, 1)
                pipe.ltrim(self._queued, 0, 0)  # one announcement stands for any number
                await pipe.execute()
        except Exception as exc:
            log.debug("event bus: announcement failed: %s", _why(exc))

    async def wait_announced(self, seconds: float) -> bool:
        """Wait at most ``seconds`` to take an announcement (``BLPOP``); whether one was
        taken. Without Redis, waits ``seconds`` and says no."""
        if self._closed:
            await asyncio.sleep(seconds)
            return False
        try:
            async with asyncio.timeout(seconds + self._timeout):
                # BLPOP's timeout: whole seconds on Redis < 6, fractions since.
                taken = await self._doorbell.blpop([self._queued], timeout=seconds)
        except Exception as exc:
            log.debug("event bus: waiting for announcements failed: %s", _why(exc))
            await asyncio.sleep(seconds)
            return False
        return taken is not None

    async def _ready(self, request_id: str) -> None:
        confirmed = self._confirmed.get(request_id)
        if confirmed is None or self._unreachable:
            return  # in an outage there is nothing to wait for: followers poll
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout):
                await confirmed.wait()

    def _first(self, request_id: str) -> None:
        self._wanted.add(request_id)
        confirmed = self._confirmed.setdefault(request_id, asyncio.Event())
        if request_id in self._active:
            confirmed.set()  # came back before the reader got to UNSUBSCRIBE it
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._run())
        self._dirty.set()

    def _last(self, request_id: str) -> None:
        self._wanted.discard(request_id)
        if request_id not in self._active:
            self._confirmed.pop(request_id, None)
        self._dirty.set()

    async def _run(self) -> None:
        delay = self._delays[0]
        while not self._closed:
            pubsub = self._sub.pubsub()
            try:
                await pubsub.connect()  # type: ignore[no-untyped-call]
                self.connected, self._unreachable, delay = True, False, self._delays[0]
                if self.disconnects:
                    log.info("event bus: Redis pub/sub reconnected")
                await self._serve(pubsub)
            except Exception as exc:  # any failure: rebuild the connection from scratch
                if self.connected:
                    self.disconnects += 1
                    log.warning("event bus: Redis pub/sub lost; reconnecting: %s", _why(exc))
                else:
                    log.debug("event bus: Redis pub/sub unreachable: %s", _why(exc))
            finally:
                self.connected, self._unreachable = False, True
                self._active.clear()
                old, self._confirmed = self._confirmed, {r: asyncio.Event() for r in self._wanted}
                for confirmed in old.values():
                    confirmed.set()  # release ready() waiters: the next connection may be far off
                with contextlib.suppress(Exception):
                    # Through a typed name: redis < 8.2 leaves aclose untyped, 8.2 types it.
                    close: Callable[[], Awaitable[object]] = pubsub.aclose
                    await close()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter spreads processes
            delay = min(delay * 2, self._delays[1])

    async def _serve(self, pubsub: PubSub) -> None:
        """Run one pub/sub connection until it fails: a reading task takes each message as
        it comes and wakes its followers itself (one turn of the loop per message); this
        task sends SUBSCRIBE/UNSUBSCRIBE as followers come and go, and a PING after a
        silence. The read stays pending across those writes (cancelling a read mid-reply
        would desynchronise the connection)."""
        loop = asyncio.get_running_loop()
        self._heard = loop.time()
        read: asyncio.Task[None] | None = None
        pinged_at: float | None = None
        try:
            while True:
                self._dirty.clear()
                await self._sync(pubsub)
                if read is None:  # after the first SUBSCRIBE is on its way
                    read = loop.create_task(self._read(pubsub), name="event-bus-read")
                now = loop.time()
                if pinged_at is not None and self._heard > pinged_at:
                    pinged_at = None  # an answer (or any message) came since
                idle = now - self._heard
                if idle >= 2 * self._ping:
                    raise ConnectionError("Redis did not answer PING")
                if idle >= self._ping and pinged_at is None:
                    await pubsub.ping()  # a half-open TCP connection only shows as silence
                    pinged_at = now
                dirty = loop.create_task(self._dirty.wait())
                wake = self._heard + (2 if pinged_at is not None else 1) * self._ping
                await asyncio.wait(
                    {read, dirty},
                    timeout=max(0.0, wake - loop.time()),
                    return_when="FIRST_COMPLETED",
                )
                dirty.cancel()
                if read.done():
                    read.result()  # the connection failed: raise what it raised
                    raise ConnectionError("the pub/sub reader stopped")
        finally:
            if read is not None:
                read.cancel()
                await asyncio.wait({read})
                if not read.cancelled():
                    read.exception()  # retrieved: the caller logs why the connection ended

    async def _read(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        while True:
            message = await pubsub.get_message(timeout=None)
            self._heard = loop.time()
            if message is not None:
                self._handle(message)

    async def _sync(self, pubsub: PubSub) -> None:
        add, drop = self._wanted - self._active, self._active - self._wanted
        if add:
            self._active |= add
            await pubsub.subscribe(*(self._prefix + r for r in add))
        if drop:
            self._active -= drop
            for request_id in drop:
                self._confirmed.pop(request_id, None)
            await pubsub.unsubscribe(*(self._prefix + r for r in drop))

    def _handle(self, message: dict[str, Any]) -> None:
        channel, prefix = message.get("channel"), self._prefix.encode()
        if not isinstance(channel, bytes) or not channel.startswith(prefix):
            return  # pong
        request_id = channel[len(prefix) :].decode()
        if message["type"] == "message":
            try:
                seq, events = _decode(request_id, message["data"])
            except (TypeError, ValueError, KeyError, orjson.JSONDecodeError):
                log.debug("event bus: ignoring payload %r on %r", message["data"][:80], channel)
            else:
                self._wake(request_id, seq, events)
        elif message["type"] == "subscribe" and request_id in self._active:
            # An acknowledgement from before an UNSUBSCRIBE/SUBSCRIBE pair may land here; the
            # newer SUBSCRIBE is already on the wire, so at worst one publish waits for a poll.
            self._confirmed.get(request_id, asyncio.Event()).set()

    async def close(self) -> None:
        """End every subscription and close both connections."""
        await super().close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        await self._sub.aclose()
        await self._pub.aclose()
        await self._doorbell.aclose()


def create_event_bus(redis_url: str | None) -> EventBus:
    """A :class:`RedisEventBus` when ``redis_url`` is set, else an :class:`InProcessEventBus`."""
    if redis_url:
        return RedisEventBus(redis_url)
    return InProcessEventBus()
