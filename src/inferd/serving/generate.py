"""One text generation on the request path: admission, budget, scheduler, metrics, settlement.

:func:`generate` is all of it, whatever the route's wire format (the OpenAI-compatible routes
parse and render around it); :meth:`inferd.serving.DataPlane.generate` is how routes call it.

* **Admission**: the version's scheduler refuses at once (503, ``Retry-After``) when its queue
  is full, before anything is charged.
* **Budget**: with a key, the most tokens the request may generate (``max_tokens`` within the
  context length) are reserved from its daily budget (429 when they are not there), and the
  reservation is settled with the tokens actually generated when the generation ends, however
  it ends: finished, failed, or its caller gone. Prompt tokens are not charged: a token of the
  daily budget is a generated token, as for long-running requests.
* **Metrics**: prompt and generated tokens (``rate()`` of the latter is the token throughput),
  time to first token from the request's arrival, the time between tokens, and how each
  generation ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any

from inferd.errors import BadRequest, InferdError
from inferd.generation import GenerationRequest, Step
from inferd.models.loading import LoadedModel
from inferd.serving.context import RequestContext
from inferd.tenancy.enforce import Enforcer

__all__ = ["generate"]

_OUTCOMES = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "cancelled"}
_settling: set[asyncio.Task[None]] = set()


async def generate(
    ctx: RequestContext,
    loaded: LoadedModel,
    request: GenerationRequest,
    enforcer: Enforcer | None,
    gone: Callable[[], bool] | None = None,
) -> AsyncGenerator[Step, None]:
    """The steps of one generation on ``loaded``'s scheduler. Errors before the first step are
    the request's (503 full, 429 budget); later ones end the iteration. ``gone`` says whether
    the caller went away (checked before every step). Close the iterator when done with it
    (``contextlib.aclosing``): that cancels the generation and settles its budget."""
    scheduler = loaded.scheduler
    if scheduler is None:
        raise BadRequest(f"model {loaded.name!r} is not served with continuous batching")
    scheduler.check_admission()
    key, quota = ctx.key, None
    if key is not None and enforcer is not None:
        quota = ctx.quota = await enforcer.charge(key, request.budget, ctx.rate)
    meters = loaded.metrics_children
    used, outcome, last_at = 0, "cancelled", 0.0
    try:
        ctx.queue_depth = scheduler.depth
        stream = scheduler.submit(request, gone)
        meters["prompt_tokens"].inc(stream.prompt_tokens)
        try:
            async for step in stream:
                if step.tokens > used:
                    meters["generated_tokens"].inc(step.tokens - used)
                    if used == 0:
                        meters["first_token"].observe(step.at - ctx.started)
                    else:
                        meters["token_gap"].observe(step.at - last_at)
                    used, last_at = step.tokens, step.at
                if step.finish_reason is not None:
                    outcome = _OUTCOMES[step.finish_reason]
                yield step
        finally:
            stream.cancel()
    except InferdError as error:
        outcome = "error"
        ctx.detail = error.message
        raise
    finally:
        meters["generations"](outcome).inc()
        if outcome == "cancelled":
            ctx.detail = "client disconnected; generation stopped"
        if quota is not None and enforcer is not None and key is not None:
            await _shielded(enforcer.settle(key, quota, loaded.name, used))


async def _shielded(settle: Coroutine[Any, Any, None]) -> None:
    """Run ``settle`` to the end even when the request is being cancelled (its client went
    away while the stream was sent): the budget must not keep a reservation nobody uses."""
    task = asyncio.get_running_loop().create_task(settle, name="settle-generation")
    _settling.add(task)
    task.add_done_callback(_settling.discard)
    await asyncio.shield(task)
