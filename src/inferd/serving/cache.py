"""The result cache of the synchronous routes: answers kept for inputs seen again.

Opt-in per model with a ``[cache]`` table in ``model.toml``
(:class:`~inferd.models.spec.CacheSpec`). :class:`~inferd.serving.plane.DataPlane` asks it
in place of the batcher for such models; a hit skips the queue and the model, and the route
encodes the kept output exactly as it would the model's, so a hit's body is a miss's body.

Key
    A digest of the version that computed the answer (model name, version number, the version
    folder's fingerprint and the ``model.toml`` it was loaded with) and of the request's rows
    as decoded (dtype, shape, bytes). Equal rows hit whatever JSON spelling or protocol carried
    them; an answer of one version is never found by another, and a version reloaded from a
    rewritten folder starts afresh, so a swap never serves the old version's answers.

Bounds
    ``max_entries``, ``max_bytes`` (of the kept arrays; an answer over a tenth of it is not
    kept) and ``ttl_seconds``. In process (:class:`MemoryResults`, the default) the least
    recently used go first. In Redis (:class:`RedisResults`, ``result_cache = "redis"``: every
    API process shares the answers) each store is one Lua script that drops expired answers and
    then the oldest stored until both bounds hold again; a lookup is one ``GET``. Redis being
    down makes every lookup a miss (logged once per outage), never an error.

Only NumPy payloads and outputs are kept (every tabular and image route); others run through.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from inferd.errors import ConfigError
from inferd.metrics import Metrics
from inferd.models.registry import LoadedModel
from inferd.models.spec import CacheSpec

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["MemoryResults", "RedisResults", "ResultCache", "ResultStore"]

log = logging.getLogger("inferd.serving.cache")


class ResultStore(Protocol):
    """Where answers are kept: this process, or Redis."""

    async def get(self, model: str, key: bytes) -> np.ndarray[Any, Any] | None:
        """The answer kept under ``key``, or None."""

    def put(self, model: str, key: bytes, value: np.ndarray[Any, Any], spec: CacheSpec) -> None:
        """Keep ``value`` under ``key`` within ``spec``'s bounds (never waits)."""

    async def close(self) -> None:
        """Release connections and pending stores."""


class _Table:
    """One model's answers in process: LRU by entries and bytes, each with its expiry."""

    __slots__ = ("bytes", "entries")

    def __init__(self) -> None:
        self.entries: OrderedDict[bytes, tuple[float, np.ndarray[Any, Any]]] = OrderedDict()
        self.bytes = 0


class MemoryResults:
    """A :class:`ResultStore` in this process (one event loop: nothing here awaits)."""

    def __init__(self, metrics: Metrics | None = None, clock: Callable[[], float] = time.monotonic):
        self._tables: dict[str, _Table] = {}
        self._clock = clock
        self._metrics = metrics

    async def get(self, model: str, key: bytes) -> np.ndarray[Any, Any] | None:
        return self.get_now(model, key)

    def get_now(self, model: str, key: bytes) -> np.ndarray[Any, Any] | None:
        table = self._tables.get(model)
        if table is None:
            return None
        found = table.entries.get(key)
        if found is None:
            return None
        if found[0] <= self._clock():
            self._drop(model, table, key)
            return None
        table.entries.move_to_end(key)
        return found[1]

    def put(self, model: str, key: bytes, value: np.ndarray[Any, Any], spec: CacheSpec) -> None:
        size = int(value.nbytes)
        if size > spec.max_bytes // 10:
            return
        table = self._tables.get(model)
        if table is None:
            table = self._tables[model] = _Table()
        if key in table.entries:
            self._drop(model, table, key)
        table.entries[key] = (self._clock() + spec.ttl_seconds, value)
        table.bytes += size
        while len(table.entries) > spec.max_entries or table.bytes > spec.max_bytes:
            oldest = next(iter(table.entries))
            self._drop(model, table, oldest)
        self._gauge(model, table)

    def _drop(self, model: str, table: _Table, key: bytes) -> None:
        _, value = table.entries.pop(key)
        table.bytes -= int(value.nbytes)
        self._gauge(model, table)

    def _gauge(self, model: str, table: _Table) -> None:
        if self._metrics is not None:
            self._metrics.cache_entries.labels(model).set(len(table.entries))
            self._metrics.cache_bytes.labels(model).set(table.bytes)

    def clear(self, model: str | None = None) -> None:
        """Forget every answer (of ``model``)."""
        for name in [model] if model is not None else list(self._tables):
            table = self._tables.pop(name, None)
            if table is not None:
                table.entries.clear()
                table.bytes = 0
                self._gauge(name, table)

    async def close(self) -> None:
        self.clear()


# KEYS: entry, index (zset: entry -> stored at, ms), sizes (hash: entry -> bytes), total.
# ARGV: value, ttl ms, now ms, max entries, max bytes. Entries are named by the script's
# caller under the same {model} hash tag as the three bookkeeping keys.
_STORE = """
local size = string.len(ARGV[1])
local total = tonumber(redis.call('GET', KEYS[4]) or '0')
local function drop(entry)
  local was = redis.call('HGET', KEYS[3], entry)
  if was then total = redis.call('DECRBY', KEYS[4], was) end
  redis.call('HDEL', KEYS[3], entry)
  redis.call('ZREM', KEYS[2], entry)
  redis.call('DEL', entry)
end
drop(KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], size)
total = redis.call('INCRBY', KEYS[4], size)
local cutoff = tonumber(ARGV[3]) - tonumber(ARGV[2])
for _, entry in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff, 'LIMIT', 0, 64)) do
  drop(entry)
end
local max_entries, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
while redis.call('ZCARD', KEYS[2]) > max_entries or total > max_bytes do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then break end
  drop(oldest[1])
end
return total
"""


def _pack(value: np.ndarray[Any, Any]) -> bytes:
    shape = ",".join(str(n) for n in value.shape)
    return f"{value.dtype.str}|{shape}|".encode() + np.ascontiguousarray(value).tobytes()


def _unpack(data: bytes) -> np.ndarray[Any, Any]:
    dtype, shape, raw = data.split(b"|", 2)
    dims = tuple(int(n) for n in shape.split(b",")) if shape else ()
    value = np.frombuffer(raw, dtype=np.dtype(dtype.decode())).reshape(dims)
    return value  # read-only: frombuffer over bytes


class RedisResults:
    """A :class:`ResultStore` in Redis, shared by every API process (see the module's
    docstring). ``timeout`` bounds each call; stores run in the background, at most
    ``max_pending`` at once (more are not kept)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "inferd:cache:",
        timeout: float = 0.25,
        max_pending: int = 256,
        recheck_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        try:
            from redis.asyncio import BlockingConnectionPool, Redis
            from redis.exceptions import RedisError
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError("the Redis result cache needs: pip install 'inferd[redis]'") from exc
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=32,
            timeout=timeout,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
        )
        self._redis: Redis = Redis.from_pool(pool)
        self._store = self._redis.register_script(_STORE)
        self._prefix, self._timeout, self._clock = prefix, timeout, clock
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self._pending: set[asyncio.Task[None]] = set()
        self._max_pending, self._recheck = max_pending, recheck_interval
        self._down = False
        self._retry_at = 0.0
        self.failures = 0

    def _names(self, model: str, key: bytes) -> list[str]:
        base = f"{self._prefix}{{{model}}}:"
        return [base + key.hex(), base + "index", base + "sizes", base + "bytes"]

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self._retry_at = time.monotonic() + self._recheck
        if not self._down:
            self._down = True
            log.warning("result cache: Redis unavailable, answering from the models: %r", exc)

    def _skip(self) -> bool:
        return self._down and time.monotonic() < self._retry_at

    def _back(self) -> None:
        if self._down:
            self._down = False
            log.info("result cache: Redis available again")

    async def get(self, model: str, key: bytes) -> np.ndarray[Any, Any] | None:
        if self._skip():
            return None
        try:
            async with asyncio.timeout(self._timeout):
                data = await self._redis.get(self._names(model, key)[0])
        except self._errors as exc:
            self._failed(exc)
            return None
        self._back()
        if not isinstance(data, bytes):
            return None
        try:
            return _unpack(data)
        except (ValueError, TypeError) as exc:  # not written by this cache: a miss
            log.warning("result cache: unreadable entry in Redis: %r", exc)
            return None

    def put(self, model: str, key: bytes, value: np.ndarray[Any, Any], spec: CacheSpec) -> None:
        if value.nbytes > spec.max_bytes // 10 or len(self._pending) >= self._max_pending:
            return
        if self._skip():
            return
        task = asyncio.get_running_loop().create_task(self._put(model, key, value, spec))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _put(
        self, model: str, key: bytes, value: np.ndarray[Any, Any], spec: CacheSpec
    ) -> None:
        ttl_ms = max(1, round(spec.ttl_seconds * 1000))
        now_ms = round(self._clock() * 1000)
        args = (_pack(value), ttl_ms, now_ms, spec.max_entries, spec.max_bytes)
        try:
            async with asyncio.timeout(self._timeout):
                await self._store(keys=self._names(model, key), args=args)
        except self._errors as exc:
            self._failed(exc)
            return
        self._back()

    async def flush(self) -> None:
        """Wait for the stores under way (tests)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def close(self) -> None:
        await self.flush()
        await self._redis.aclose()


class ResultCache:
    """Answers the requests of ``[cache]`` models from a :class:`ResultStore` when it can."""

    def __init__(self, store: ResultStore, metrics: Metrics | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self._versions: dict[int, tuple[weakref.ref[LoadedModel], bytes]] = {}
        self._counters: dict[tuple[str, str], Any] = {}

    def version_key(self, loaded: LoadedModel) -> bytes:
        """What identifies the version that computes an answer (see the module's docstring)."""
        known = self._versions.get(id(loaded))
        if known is not None and known[0]() is loaded:
            return known[1]
        digest = hashlib.blake2b(digest_size=16)
        digest.update(loaded.name.encode())
        digest.update(b"\0%d\0" % loaded.version)
        digest.update(repr(loaded.fingerprint).encode())
        digest.update(loaded.spec.model_dump_json().encode())
        if not loaded.fingerprint:  # loaded without a look at its folder: this load only
            digest.update(repr(loaded.loaded_at).encode())
        if len(self._versions) > 256:
            self._versions.clear()
        key = digest.digest()
        # A weak reference: a retired version must not be kept alive by the cache.
        self._versions[id(loaded)] = (weakref.ref(loaded), key)
        return key

    def key(self, loaded: LoadedModel, payload: Any) -> bytes | None:
        """The key of ``payload``'s answer on ``loaded``; None when it cannot be cached."""
        if not isinstance(payload, np.ndarray) or payload.dtype.hasobject:
            return None
        digest = hashlib.blake2b(self.version_key(loaded), digest_size=20)
        digest.update(f"{payload.dtype.str}{payload.shape}".encode())
        digest.update(np.ascontiguousarray(payload).data)
        return digest.digest()

    def _count(self, model: str, result: str) -> None:
        if self.metrics is None:
            return
        counter = self._counters.get((model, result))
        if counter is None:
            counter = self._counters[(model, result)] = self.metrics.cache_requests.labels(
                model, result
            )
        counter.inc()

    async def infer(
        self, loaded: LoadedModel, payload: Any, run: Callable[[], Awaitable[Any]]
    ) -> tuple[Any, bool]:
        """``(output, hit)``: the kept answer of ``payload`` on ``loaded``, or ``run()``'s,
        then kept."""
        spec = loaded.spec.cache
        key = self.key(loaded, payload) if spec is not None else None
        if key is None or spec is None:
            return await run(), False
        name = loaded.name
        store = self.store
        found = (
            store.get_now(name, key)
            if isinstance(store, MemoryResults)
            else await store.get(name, key)
        )
        if found is not None:
            self._count(name, "hit")
            return found, True
        self._count(name, "miss")
        output = await run()
        if isinstance(output, np.ndarray) and not output.dtype.hasobject:
            kept = np.array(output, copy=True)  # not a view that keeps the whole batch alive
            kept.setflags(write=False)
            store.put(name, key, kept, spec)
        return output, False

    async def close(self) -> None:
        await self.store.close()
