"""Where a request waits in its model's queue: its tenant and its priority.

The tenant is the API key that pays for the request: a model's queue is shared fairly between
keys (:mod:`inferd.batching.fair`). Without keys every request shares one lane.

The priority is the key's (``inferd keys create --priority``; normal by default), or what the
request asks for in ``X-Inferd-Priority: high|normal|low`` (gRPC: the ``x-inferd-priority``
metadata) up to the key's: a high-priority key may send batch traffic as low, a normal one
cannot jump the queue. With authentication off every caller is trusted alike, and the header
is honoured as sent.
"""

from __future__ import annotations

from typing import Any

from inferd.batching.fair import NORMAL, PRIORITIES, parse_priority
from inferd.errors import BadRequest
from inferd.tenancy.keys import Forbidden

__all__ = ["HEADER", "placement"]

HEADER = b"x-inferd-priority"


def placement(key: Any, headers: list[tuple[bytes, bytes]] | None) -> tuple[str, int]:
    """``(tenant, priority)`` of a request from its verified key (None: authentication off)
    and its header fields; :class:`BadRequest` for an unknown priority, :class:`Forbidden`
    for one above the key's."""
    asked: bytes | None = None
    if headers:
        for name, value in headers:
            if name == HEADER:
                asked = value
                break
    if key is None:
        return "", NORMAL if asked is None else _parse(asked)
    allowed: int = key.priority
    if asked is None:
        return key.id, allowed
    priority = _parse(asked)
    if priority < allowed:
        raise Forbidden(
            f"this key may ask for priority {PRIORITIES[allowed]} or lower, "
            f"not {PRIORITIES[priority]}"
        )
    return key.id, priority


def _parse(value: bytes) -> int:
    try:
        return parse_priority(value.decode("latin-1"))
    except ValueError as exc:
        raise BadRequest(f"X-Inferd-Priority: {exc}") from None
