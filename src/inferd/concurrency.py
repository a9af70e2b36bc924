"""The one way inferd runs blocking work (in a thread, never on the event loop), and the event
loop its own processes run on."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

__all__ = ["run_blocking", "run_main"]

P = ParamSpec("P")
R = TypeVar("R")


async def run_blocking(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run ``fn`` in the default thread pool and await its result."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))


def run_main(main: Coroutine[Any, Any, R]) -> R:
    """Run ``main`` to completion on a new event loop: uvloop's where it is installed (it
    comes with ``uvicorn[standard]``, which serves the API on it), else asyncio's. A worker
    process spends much of its time in socket writes and reads to the database and Redis,
    which uvloop does in C (measured: asyncio's transport writes were 11 % of a busy job
    worker's samples)."""
    try:
        import uvloop
    except ImportError:  # e.g. on Windows
        return asyncio.run(main)
    return uvloop.run(main)
