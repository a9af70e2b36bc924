"""API keys: ``inferd_<id>_<secret><checksum>``, shown once, stored as a SHA-256.

* ``id``: 12 lowercase hex characters, the row's primary key (safe to log and to show).
* ``secret``: 32 base62 characters from the OS's CSPRNG (~190 bits).
* ``checksum``: 6 base62 characters of a CRC-32 over the rest, so a truncated or mistyped key
  is refused without a database lookup (and secret scanners can recognise real keys).

Only ``sha256(key)`` is stored; a presented key is hashed and compared in constant time. The
scopes are ``predict`` (synchronous inference), ``requests`` (long-running requests) and
``admin`` (model management and keys).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import zlib
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from inferd.batching.fair import NORMAL, PRIORITIES, parse_priority
from inferd.db.schema import api_keys
from inferd.errors import InferdError, NotFound, ValidationFailed

__all__ = [
    "SCOPES",
    "ApiKey",
    "KeyStore",
    "Unauthorized",
    "generate_key",
    "hash_key",
    "parse_key",
]

SCOPES = ("predict", "requests", "admin")
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_KEY = re.compile(r"^inferd_([0-9a-f]{12})_([0-9A-Za-z]{32})([0-9A-Za-z]{6})$")


class Unauthorized(InferdError):
    """No valid API key: the same answer for missing, malformed, unknown and revoked keys."""

    status_code = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"www-authenticate": 'Bearer realm="inferd"'}


class Forbidden(InferdError):
    """The key is valid but lacks the scope the route needs."""

    status_code = 403
    code = "forbidden"


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), 6)


def generate_key() -> tuple[str, str]:
    """A new key and its id."""
    key_id = secrets.token_hex(6)
    secret = "".join(secrets.choice(_ALPHABET) for _ in range(32))
    body = f"inferd_{key_id}_{secret}"
    return body + _checksum(body), key_id


def parse_key(key: str) -> str | None:
    """The id of a well-formed key whose checksum matches, else None."""
    match = _KEY.match(key)
    if match is None:
        return None
    body = key[:-6]
    if not hmac.compare_digest(_checksum(body), match.group(3)):
        return None
    return match.group(1)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key (never the key itself)."""

    id: str
    user: str
    name: str | None
    scopes: frozenset[str]
    rate: str | None
    daily_tokens: int | None
    secret_hash: str
    created_at: float
    revoked_at: float | None
    priority: int = NORMAL
    """Its requests' priority, and the highest a request may ask for (``X-Inferd-Priority``);
    an index of :data:`~inferd.batching.PRIORITIES`."""

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def public(self) -> dict[str, Any]:
        """What ``inferd keys list`` shows."""
        return {
            "id": self.id,
            "user": self.user,
            "name": self.name,
            "scopes": sorted(self.scopes),
            "rate": self.rate,
            "daily_tokens": self.daily_tokens,
            "priority": PRIORITIES[self.priority],
            "created_at": self.created_at,
            "revoked": self.revoked_at is not None,
        }


def _row(row: Any) -> ApiKey:
    return ApiKey(
        id=row.id,
        user=row.user_id,
        name=row.name,
        scopes=frozenset(s for s in row.scopes.split(",") if s),
        rate=row.rate,
        daily_tokens=row.daily_tokens,
        secret_hash=row.secret_hash,
        created_at=row.created_at / 1e6,
        revoked_at=row.revoked_at / 1e6 if row.revoked_at is not None else None,
        priority=parse_priority(row.priority) if row.priority else NORMAL,
    )


class KeyStore:
    """Keys in the same SQL database as the requests."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(
        self,
        user: str,
        scopes: list[str],
        rate: str | None = None,
        daily_tokens: int | None = None,
        name: str | None = None,
        priority: str | None = None,
    ) -> tuple[str, ApiKey]:
        """Store a new key; returns the key (shown once) and its record. ``priority``: its
        requests' (high, normal or low; default normal), the highest they may ask for."""
        if not user or len(user) > 255:
            raise ValidationFailed("user must be 1 to 255 characters")
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown or not scopes:
            raise ValidationFailed(
                f"scopes must be a non-empty subset of {', '.join(SCOPES)}"
                + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            )
        if daily_tokens is not None and daily_tokens < 0:
            raise ValidationFailed("daily_tokens must not be negative")
        if priority is not None:
            try:
                priority = PRIORITIES[parse_priority(priority)]
            except ValueError as exc:
                raise ValidationFailed(str(exc)) from None
        key, key_id = generate_key()
        now = int(time.time() * 1e6)
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(api_keys).values(
                    id=key_id,
                    user_id=user,
                    name=name,
                    scopes=",".join(sorted(set(scopes))),
                    rate=rate,
                    daily_tokens=daily_tokens,
                    priority=priority,
                    secret_hash=hash_key(key),
                    created_at=now,
                    revoked_at=None,
                )
            )
        record = await self.get(key_id)
        assert record is not None
        return key, record

    async def get(self, key_id: str) -> ApiKey | None:
        async with self.engine.connect() as conn:
            # A plain read: on SQLite, writes begin IMMEDIATE and would queue behind writers.
            await conn.execution_options(inferd_read_only=True)
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
        return _row(row) if row is not None else None

    async def list(self, user: str | None = None) -> list[ApiKey]:
        query = select(api_keys).order_by(api_keys.c.created_at)
        if user is not None:
            query = query.where(api_keys.c.user_id == user)
        async with self.engine.connect() as conn:
            await conn.execution_options(inferd_read_only=True)
            return [_row(row) for row in await conn.execute(query)]

    async def revoke(self, key_id: str) -> ApiKey:
        now = int(time.time() * 1e6)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
        record = await self.get(key_id)
        if record is None:
            raise NotFound(f"no API key with id {key_id!r}")
        if result.rowcount == 0 and record.revoked_at is None:  # pragma: no cover - race
            raise NotFound(f"no API key with id {key_id!r}")
        return record

    async def verify(self, key: str) -> ApiKey | None:
        """The active key record matching ``key``, else None (constant-time comparison)."""
        key_id = parse_key(key)
        if key_id is None:
            return None
        record = await self.get(key_id)
        if record is None or not record.active:
            return None
        if not hmac.compare_digest(record.secret_hash, hash_key(key)):
            return None
        return record
