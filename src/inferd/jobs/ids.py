"""Request ids that sort by creation time, and the opaque cursors of paginated listings.

A request id is ``req_`` followed by a ULID: 48 bits of milliseconds since the epoch and 80
random bits, in Crockford's base32 (26 characters). Ids made in the same millisecond by one
process increase monotonically, so sorting ids sorts requests by creation time.

A cursor names the last item of a page by its position in the listing order (created_at in
microseconds, id). It is base64url text with a checksum, so that a truncated or edited cursor
is refused with a clear 400 instead of silently listing the wrong page. The checksum is not a
secret: it protects against mistakes, not against forgery, and needs not to, because a
listing is always restricted to the caller's own requests whatever the cursor says.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import threading
import time

from inferd.errors import BadRequest

__all__ = [
    "REQUEST_ID_PREFIX",
    "decode_cursor",
    "encode_cursor",
    "is_request_id",
    "new_request_id",
    "request_id_millis",
]

REQUEST_ID_PREFIX = "req_"

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE = {char: value for value, char in enumerate(_ALPHABET)}
_TIME_BITS = 48
_RANDOM_BITS = 80
_MAX_TIME = (1 << _TIME_BITS) - 1
_MAX_RANDOM = (1 << _RANDOM_BITS) - 1
_ID_RE = re.compile(r"req_[0-7][0-9A-HJKMNP-TV-Z]{25}")

_CURSOR_VERSION = b"1"
_CURSOR_TAG_BYTES = 8
_CURSOR_MAX_CHARS = 200  # a real cursor is about 80 characters; refuse junk before decoding


def _encode_ulid(millis: int, randomness: int) -> str:
    value = (millis << _RANDOM_BITS) | randomness
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


class _Monotonic:
    """ULIDs that strictly increase within one process, even within one millisecond.

    Within a millisecond the random part of the previous id is incremented (the ULID
    monotonic rule); a new millisecond draws fresh randomness. A clock that goes backwards
    (an injected test clock) gets fresh randomness too: the id then follows that clock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # ids may be made from worker threads as well
        self._millis = -1
        self._random = 0

    def next(self, millis: int) -> str:
        if not 0 <= millis <= _MAX_TIME:
            raise ValueError(f"timestamp out of the ULID range: {millis} ms")
        with self._lock:
            if millis == self._millis and self._random < _MAX_RANDOM:
                self._random += 1
            else:
                self._millis = millis
                # The top bit stays clear so that at least 2**79 increments fit in the
                # millisecond without overflowing into the time part.
                self._random = secrets.randbits(_RANDOM_BITS - 1)
            return _encode_ulid(millis, self._random)


_generator = _Monotonic()


def new_request_id(unix_millis: int | None = None) -> str:
    """A new ``req_<ULID>`` for a request created at ``unix_millis`` (default: now)."""
    millis = int(time.time() * 1000) if unix_millis is None else unix_millis
    return REQUEST_ID_PREFIX + _generator.next(millis)


def is_request_id(value: str) -> bool:
    """Whether ``value`` has the shape of a request id (``req_`` and a canonical ULID)."""
    return _ID_RE.fullmatch(value) is not None


def request_id_millis(request_id: str) -> int:
    """The creation time encoded in a request id, in milliseconds since the epoch."""
    if not is_request_id(request_id):
        raise ValueError(f"not a request id: {request_id!r}")
    value = 0
    for char in request_id[len(REQUEST_ID_PREFIX) :]:
        value = (value << 5) | _DECODE[char]
    return value >> _RANDOM_BITS


def _tag(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=_CURSOR_TAG_BYTES, person=b"inferd-cursor").digest()


def encode_cursor(created_us: int, request_id: str) -> str:
    """The opaque cursor that continues a listing after the item (``created_us``, id)."""
    payload = _CURSOR_VERSION + b":" + str(created_us).encode() + b":" + request_id.encode()
    return base64.urlsafe_b64encode(_tag(payload) + payload).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """(created_us, request_id) from a cursor made by :func:`encode_cursor`.

    Raises :class:`inferd.errors.BadRequest` for anything else: the cursor must be passed
    back exactly as the previous page returned it.
    """
    invalid = BadRequest("invalid cursor: pass back the next_cursor of the previous page unchanged")
    if not cursor or len(cursor) > _CURSOR_MAX_CHARS or not cursor.isascii():
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        raise invalid from None
    # Decoding is lenient about stray characters; re-encoding must give the input back.
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != cursor:
        raise invalid
    tag, payload = raw[:_CURSOR_TAG_BYTES], raw[_CURSOR_TAG_BYTES:]
    if len(tag) != _CURSOR_TAG_BYTES or not hmac.compare_digest(tag, _tag(payload)):
        raise invalid
    version, _, rest = payload.partition(b":")
    created, _, request_id_bytes = rest.partition(b":")
    if version != _CURSOR_VERSION or not created.isdigit():
        raise invalid
    request_id = request_id_bytes.decode("ascii", errors="replace")
    if not is_request_id(request_id):
        raise invalid
    return int(created), request_id
