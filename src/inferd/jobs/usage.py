"""Settling a long-running request's budget reservation when it ends.

The submit reserved the most the request may cost (:meth:`RequestService.submit`); once its
terminal event is stored, the reservation is settled with what it really used: the chunks a
streaming model produced, the rows of a served tabular request, nothing for a request that
failed without output.
"""

from __future__ import annotations

from typing import Any

from inferd.jobs.runner import ModelExecutor
from inferd.jobs.types import Event, EventKind, Lease
from inferd.tenancy.enforce import Enforcer

__all__ = ["settle_usage", "tokens_processed"]


async def settle_usage(
    enforcer: Enforcer, executor: ModelExecutor, lease: Lease, event: Event, chunks: list[Any]
) -> None:
    """Settle the reservation of ``lease``'s request, which ended with ``event`` (nothing to
    do, and no transaction, for a request that reserved nothing)."""
    if not lease.charged:
        return
    streams = executor.streams(lease.model)
    actual = len(chunks) if streams else None
    served = event.kind is EventKind.DONE
    await enforcer.settle_request(
        lease.request_id, lease.model, actual, _reserved_rows(lease) if served else 0
    )


def tokens_processed(executor: ModelExecutor, lease: Lease, event: Event, chunks: list[Any]) -> int:
    """The work a worker did on ``lease``'s request, which ended with ``event``, in tokens:
    the chunks a streaming model produced (a text model's tokens), the rows of a tabular
    request that was served, nothing for one that failed before its answer."""
    if executor.streams(lease.model):
        return len(chunks)
    return _reserved_rows(lease) if event.kind is EventKind.DONE and chunks else 0


def _reserved_rows(lease: Lease) -> int:
    value = lease.input if isinstance(lease.input, dict) else {}
    if isinstance(value.get("instances"), list):
        return len(value["instances"])
    return 1
