"""Reading request bodies: the one reader every route uses, with its limits.

A body is refused with 413 as soon as it is known to be over the limit: from
``Content-Length`` before anything is read, else as the chunks add up. A client that goes
away while its body is read raises :class:`~inferd.serving.ClientGone`.
"""

from __future__ import annotations

import zlib
from typing import Any

from inferd.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from inferd.serving.context import ClientGone

__all__ = ["check_length", "decompress", "read_body", "whole_body"]


def check_length(value: bytes | str | None, limit: int) -> None:
    """Refuse a declared ``Content-Length`` over ``limit`` (or one that is not a number)."""
    if value is None:
        return
    if not (value.isascii() and value.isdigit()):
        raise BadRequest("Content-Length is not a number")
    length = int(value)
    if length > limit:
        raise PayloadTooLarge(f"request body of {length} bytes is over the limit of {limit} bytes")


def whole_body(message: dict[str, Any], limit: int) -> bytes | None:
    """The body when ASGI ``message``, the first one received, holds all of it (what most
    requests send: one ``http.request`` without ``more_body``), else None: then
    :func:`read_body` with ``first=message`` reads the rest. The lean routes take this way to
    save a coroutine per request."""
    if message["type"] != "http.request" or message.get("more_body", False):
        return None
    body: bytes = message.get("body", b"")
    if len(body) > limit:
        raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
    return body


async def read_body(receive: Any, limit: int, first: dict[str, Any] | None = None) -> bytes:
    """The whole body from ASGI ``receive``, at most ``limit`` bytes; ``first``: a message
    received already (see :func:`whole_body`)."""
    chunks: list[bytes] = []
    size = 0
    message = first
    while True:
        if message is None:
            message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
        message = None
    if len(chunks) == 1:
        return chunks[0]
    return b"".join(chunks)


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """``body`` as sent with ``Content-Encoding`` (identity, gzip or deflate), decompressed
    to at most ``limit`` bytes; 415 for another encoding, 400 for corrupt data."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none"
        )
    inflater = zlib.decompressobj(31 if encoding == "gzip" else 15)
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"request body is not valid {encoding} data: {exc}") from None
    if len(plain) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed request body is over the limit of {limit} bytes")
    return plain
