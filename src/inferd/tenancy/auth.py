"""Who is calling: API keys from ``Authorization: Bearer`` or ``X-API-Key``, and route scopes.

Every failure to authenticate (no key, malformed, wrong checksum, unknown, revoked, wrong
secret) gets the same 401, so a caller cannot tell which it was. Verified keys are cached for
``cache_seconds`` under the SHA-256 of the presented key (never the key itself); a revocation
clears every API process's cache at once through the event bus when Redis is configured, and
within ``cache_seconds`` otherwise.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from inferd.tenancy.keys import ApiKey, Forbidden, KeyStore, Unauthorized, hash_key

__all__ = ["KEYS_CHANNEL", "Authenticator", "required_scope"]

KEYS_CHANNEL = "__api_keys__"  # event-bus topic: "a key was revoked, forget cached keys"
_PUBLIC = (
    "/health",
    "/metrics",
    "/docs",
    "/redoc",
    "/openapi.json",
    "/v2/health",
    "/favicon",
    "/console",  # static files only; the page asks for a key before calling the API
)
_MAX_CACHE = 10_000
_MISSING = "a valid API key is required (Authorization: Bearer <key>)"


def required_scope(method: str, path: str) -> str | None:
    """The scope a route needs: None for public routes, "" for any valid key."""
    if path.startswith(_PUBLIC) or path == "/v2":  # /v2: the V2 protocol's server metadata
        return None
    if path.startswith("/v2/models/"):  # V2 model metadata, readiness and infer
        return "predict"
    if path in ("/predict", "/v1/predict") or (
        path.startswith("/v1/models") and path.endswith(("/predict", "/classify"))
    ):
        return "predict"
    if path.startswith("/v1/models") and method in ("GET", "HEAD"):
        return "predict"
    if path.startswith("/openai/"):  # the OpenAI-compatible API: completions and models
        return "predict"
    if path.startswith("/v1/requests"):
        return "requests"
    if path in ("/v1/usage", "/v1/stats"):
        return ""
    return "admin"


class Authenticator:
    """Verifies keys against the key store, with a short cache."""

    def __init__(self, keys: KeyStore, cache_seconds: float = 1.0) -> None:
        self.keys = keys
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[ApiKey | None, float]] = {}
        self._bearers: dict[bytes, str | None] = {}  # Authorization values read before
        self._pending: dict[str, asyncio.Future[ApiKey | None]] = {}

    def clear(self) -> None:
        self._cache.clear()

    async def authenticate(self, headers: list[tuple[bytes, bytes]]) -> ApiKey:
        """The key presented in ``headers``; :class:`Unauthorized` when there is none or it is
        not a valid, unrevoked key."""
        record = self.cached(headers)
        if record is not None:
            return record
        key = _presented(headers)
        assert key is not None  # cached() raised otherwise
        digest = hash_key(key)
        record = await self._lookup(key, digest, time.monotonic())
        if record is None:
            raise Unauthorized(_MISSING)
        return record

    def cached(self, headers: list[tuple[bytes, bytes]]) -> ApiKey | None:
        """The presented key from the cache without waiting: None when it must be looked up;
        :class:`Unauthorized` when no key is presented or the cache knows it is not valid."""
        key = self._presented(headers)
        if key is None:
            raise Unauthorized(_MISSING)
        hit = self._cache.get(key)
        if hit is None or hit[1] <= time.monotonic():
            return None
        if hit[0] is None:
            raise Unauthorized(_MISSING)
        return hit[0]

    async def _lookup(self, key: str, digest: str, now: float) -> ApiKey | None:
        # One database lookup per key at a time: when the cache entry expires under load,
        # the requests in flight wait for the same answer instead of each asking.
        pending = self._pending.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[ApiKey | None] = asyncio.get_running_loop().create_future()
        self._pending[digest] = future
        try:
            record = await self.keys.verify(key)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: the waiters get it too
            raise
        finally:
            del self._pending[digest]
        if len(self._cache) >= _MAX_CACHE:
            self._cache.clear()
        # Keyed by the key as presented: a hit costs a dict lookup, not a SHA-256. Entries live
        # in this process's memory only, as the key does while its request is served.
        self._cache[key] = (record, now + self.cache_seconds)
        future.set_result(record)
        return record

    @staticmethod
    def authorize(record: ApiKey, scope: str) -> None:
        if scope and scope not in record.scopes and "admin" not in record.scopes:
            raise Forbidden(f"this API key lacks the {scope!r} scope this route needs")

    def _presented(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """:func:`_presented`, with the ``Authorization`` values already read remembered (a
        client sends the same one with every request)."""
        for name, value in headers:
            if name == b"authorization":
                bearers = self._bearers
                key = bearers.get(value, _UNREAD)
                if key is _UNREAD:
                    key = _presented([(name, value)])
                    if len(bearers) >= _MAX_CACHE:
                        bearers.clear()
                    bearers[value] = key
                return key  # type: ignore[return-value]
            if name == b"x-api-key":
                return _presented(headers)
        return None


_UNREAD = object()


def _presented(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return _text(token.strip())
            return None
        if name == b"x-api-key" and value.strip():
            return _text(value.strip())
    return None


def _text(value: bytes) -> str | None:
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


def principal(scope: dict[str, Any]) -> ApiKey | None:
    """The verified key of a request, if authentication is on."""
    key = scope.get("inferd.key")
    return key if isinstance(key, ApiKey) else None
