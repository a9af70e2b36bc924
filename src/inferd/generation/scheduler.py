"""Continuous batching of text generation: one scheduler per text model version.

Policy, for each text model version:

* A request becomes a *sequence* in a bounded queue; when the queue is full it is refused at
  once with :class:`~inferd.errors.Overloaded` (503, ``Retry-After``).
* At most ``max_sequences`` sequences are decoded together. Each *step* is one forward pass
  that gives every sequence in the batch its next token; sequences waiting in the queue join
  between steps as soon as there is room (their prompt is run first, on its own), so a new
  request never waits for a whole batch to finish.
* A sequence leaves the batch between steps when it ends (end-of-sequence token, its token
  budget, a stop string) or when its caller cancels it or goes away; its place is free for the
  next step.
* Model work runs in the scheduler's own thread, one per model version; the event loop only
  queues sequences and hands out the text each step produced.

What a step does with the model is the :class:`Engine`'s business (see
:mod:`inferd.generation.engine`): this module knows nothing of torch. Turning tokens into text
(characters never split, stop strings held back until they cannot match) happens here, in the
scheduler's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from inferd.concurrency import run_blocking
from inferd.errors import InferdError, ModelError, ModelNotReady, Overloaded
from inferd.models.sampling import split_at_stop
from inferd.models.textgen import (
    DECODE_CONTEXT,
    FinishReason,
    GenerationSettings,
    IncrementalDecoder,
)

__all__ = ["Engine", "GenerationRequest", "GenerationScheduler", "GenerationStream", "Step"]

log = logging.getLogger("inferd.generation")


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One sequence to generate: its prompt as token ids and its checked settings."""

    prompt_ids: list[int]
    settings: GenerationSettings
    budget: int
    """The most tokens it may generate: ``max_new_tokens`` within the context length."""


@dataclass(frozen=True, slots=True)
class Step:
    """What one step produced for one sequence."""

    text: str
    """New text; "" while a character is unfinished or a stop string may be starting."""
    tokens: int
    """Tokens generated so far (an end-of-sequence token is not counted)."""
    at: float
    """``time.perf_counter()`` when the step ended."""
    finish_reason: FinishReason | None = None
    """Set on the last step of the sequence."""


class Engine(Protocol):
    """The model side of a scheduler. Every method runs in the scheduler's thread."""

    tokenizer: Any
    eos_ids: frozenset[int]
    max_sequences: int | None
    """The most sequences this model can batch (1 where it cannot); None: no limit of its own."""

    def prefill(self, seqs: list[GenerationStream]) -> list[int]:
        """Run the prompts of ``seqs`` and return the first token of each. They join the
        batch at the next :meth:`commit`; it raises, leaving nothing behind, when the model
        fails."""

    def decode(self) -> list[tuple[GenerationStream, int]]:
        """One forward pass for the whole batch: the next token of each sequence in it."""

    def commit(self, leaving: set[GenerationStream]) -> None:
        """Drop ``leaving`` from the batch and let the prefilled sequences join it."""

    def reset(self) -> None:
        """Forget every sequence (after a failed step)."""


class GenerationStream:
    """One sequence: iterate it (``async for step in stream``) for its :class:`Step` s.

    The last step has ``finish_reason`` set. If the model fails, or the version is unloaded
    before the sequence ends, iterating raises that :class:`~inferd.errors.InferdError`.
    :meth:`cancel` (or the ``gone`` probe turning true) drops the sequence between two steps.
    """

    def __init__(
        self,
        scheduler: GenerationScheduler,
        request: GenerationRequest,
        gone: Callable[[], bool] | None,
    ) -> None:
        self.request = request
        self.submitted_at = time.perf_counter()
        self.finish_reason: FinishReason | None = None
        """Why it ended, once the last step has been read."""
        self.tokens = 0
        """Tokens generated, as of the last step read."""
        self.cancelled = False
        self._scheduler = scheduler
        self._gone = gone
        # Loop side: steps delivered, not read yet.
        self._steps: deque[Step | InferdError] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        # Thread side: what the model made so far, turned into text.
        self.generated = 0
        self.done = False
        self._decoder: IncrementalDecoder | None = None
        self._eos: frozenset[int] = frozenset()
        self._held = ""  # text held back: it may be the start of a stop string

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    def cancel(self) -> None:
        """Stop generating: a waiting sequence leaves the queue now, a running one before the
        next step. Idempotent; safe after the end."""
        if not self.cancelled and not self._ended:
            self.cancelled = True
            self._scheduler._cancel(self)

    # ------------------------------------------------------------------ loop side
    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> Step:
        while not self._steps:
            if self._ended:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._steps.popleft()
        if isinstance(item, InferdError):
            self._ended = True
            raise item
        self.tokens = item.tokens
        if item.finish_reason is not None:
            self.finish_reason = item.finish_reason
            self._ended = True
        return item

    def _deliver(self, item: Step | InferdError) -> None:
        self._steps.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ thread side
    def stopped(self) -> bool:
        """True once the caller cancelled or went away."""
        gone = self._gone
        return self.cancelled or (gone is not None and gone())

    def begin(self, tokenizer: Any, eos_ids: frozenset[int]) -> None:
        self._decoder = IncrementalDecoder(tokenizer, self.request.prompt_ids[-DECODE_CONTEXT:])
        self._eos = eos_ids

    def advance(self, token: int, out: list[tuple[GenerationStream, Step | InferdError]]) -> bool:
        """Take the next token; queue the resulting step in ``out``. True when it ended."""
        decoder = self._decoder
        assert decoder is not None
        stops = self.request.settings.stop
        now = time.perf_counter()
        if token in self._eos:
            return self._flush("eos", now, out)
        self.generated += 1
        self._held += decoder.push(token)
        text, self._held, hit = split_at_stop(self._held, stops)
        if hit:
            return self._end(text, "stop", now, out)
        if self.generated >= self.request.budget:
            return self._flush("length", now, out, text)
        out.append((self, Step(text, self.generated, now)))
        return False

    def _flush(
        self,
        reason: FinishReason,
        now: float,
        out: list[tuple[GenerationStream, Step | InferdError]],
        text: str = "",
    ) -> bool:
        decoder = self._decoder
        assert decoder is not None
        rest, _, hit = split_at_stop(
            self._held + decoder.flush(), self.request.settings.stop, final=True
        )
        self._held = ""
        return self._end(text + rest, "stop" if hit else reason, now, out)

    def _end(
        self,
        text: str,
        reason: FinishReason,
        now: float,
        out: list[tuple[GenerationStream, Step | InferdError]],
    ) -> bool:
        self.done = True
        out.append((self, Step(text, self.generated, now, reason)))
        return True

    def end_cancelled(self, out: list[tuple[GenerationStream, Step | InferdError]]) -> None:
        self._end("", "cancelled", time.perf_counter(), out)

    def fail(
        self, error: InferdError, out: list[tuple[GenerationStream, Step | InferdError]]
    ) -> None:
        self.done = True
        out.append((self, error))


_Out = list[tuple[GenerationStream, Step | InferdError]]


class GenerationScheduler:
    """Continuous batching for one text model version (see the module's docstring)."""

    def __init__(
        self,
        name: str,
        *,
        max_sequences: int = 16,
        max_queue: int = 64,
        retry_after: float = 1.0,
        on_step: Callable[[int, float], None] | None = None,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.max_sequences = max_sequences
        self.max_queue = max_queue
        self.retry_after = retry_after
        self._on_step = on_step
        self._on_reject = on_reject
        self._engine: Engine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._waiting: deque[GenerationStream] = deque()
        self._active: list[GenerationStream] = []
        self._closing = False
        self._abort = False
        self.steps = 0
        """Steps run so far (tests and benchmarks read it)."""

    # ------------------------------------------------------------------ state
    @property
    def depth(self) -> int:
        """Sequences waiting for a place in the batch."""
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Sequences in the batch now."""
        return len(self._active)

    # ------------------------------------------------------------------ life cycle
    def start(self, engine: Engine) -> None:
        """Start the scheduler's thread on ``engine``; call it on the event loop."""
        if self._thread is not None:
            raise RuntimeError(f"generation scheduler {self.name} is already started")
        limit = engine.max_sequences
        if limit is not None and limit < self.max_sequences:
            log.info(
                "model %s decodes %d sequence(s) at a time: it cannot be batched", self.name, limit
            )
            self.max_sequences = limit
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._run, name=f"generation-{self.name}", daemon=True
        )
        self._thread.start()

    async def stop(self, grace: float) -> None:
        """Take no new sequences; let those queued and running finish within ``grace``
        seconds, then fail what is left with a retryable 503 and end the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        thread = self._thread
        if thread is None:
            with self._cond:
                waiting = list(self._waiting)
                self._waiting.clear()
            for seq in waiting:
                seq._deliver(self._unloaded())
            return
        await run_blocking(thread.join, grace)
        with self._cond:
            self._abort = True
            self._cond.notify_all()
        await run_blocking(thread.join)

    # ------------------------------------------------------------------ requests
    def check_admission(self) -> None:
        """Raise :class:`Overloaded` when the queue is full, before any work is done."""
        if self._closing:
            raise self._unloaded()
        if len(self._waiting) >= self.max_queue:
            if self._on_reject is not None:
                self._on_reject("full")
            raise Overloaded(
                f"model {self.name} has {self.max_queue} generations waiting for a place; "
                "retry later",
                retry_after=self.retry_after,
            )

    def submit(
        self, request: GenerationRequest, gone: Callable[[], bool] | None = None
    ) -> GenerationStream:
        """Queue one sequence; raise :class:`Overloaded` when the queue is full. ``gone`` is
        asked before each step whether the caller went away. Call it on the event loop."""
        if self._thread is None:
            raise ModelNotReady(f"model {self.name} is not started yet", retry_after=1)
        if not self._thread.is_alive() and not self._closing:
            raise ModelError(f"the generation thread of model {self.name} has stopped")
        stream = GenerationStream(self, request, gone)
        with self._cond:
            self.check_admission()
            self._waiting.append(stream)
            self._cond.notify()
        return stream

    async def generate(self, request: GenerationRequest) -> tuple[str, Step]:
        """The whole text of one sequence and its last step (warm-up, tests)."""
        stream = self.submit(request)
        pieces: list[str] = []
        last: Step | None = None
        try:
            async for step in stream:
                pieces.append(step.text)
                last = step
        finally:
            stream.cancel()
        assert last is not None
        return "".join(pieces), last

    def _cancel(self, stream: GenerationStream) -> None:
        """``stream.cancel()``: out of the queue now, or out of the batch before the next step."""
        with self._cond:
            try:
                self._waiting.remove(stream)
            except ValueError:
                return  # admitted: the thread drops it before the next step
        out: _Out = []
        stream.end_cancelled(out)
        stream._deliver(out[0][1])

    def _unloaded(self) -> InferdError:
        return ModelNotReady(
            f"model {self.name} is being unloaded; retry, and a version that serves will answer",
            retry_after=self.retry_after,
        )

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        engine = self._engine
        assert engine is not None
        try:
            while True:
                joiners = self._take()
                if joiners is None:
                    break
                out: _Out = []
                started = time.perf_counter()
                sequences = len(self._active) + len(joiners)
                try:
                    self._step(engine, joiners, out)
                except Exception as exc:  # a failed forward pass fails its batch, not the thread
                    log.exception("generation step failed on model %s", self.name)
                    error = ModelError(
                        f"model {self.name} failed while generating: {type(exc).__name__}: {exc}"
                    )
                    for seq in [*self._active, *joiners]:
                        if not seq.done:
                            seq.fail(error, out)
                    self._active = []
                    engine.reset()
                self._emit(out)
                self.steps += 1
                if self._on_step is not None:
                    try:
                        self._on_step(sequences, time.perf_counter() - started)
                    except Exception:  # metrics must not stop generation
                        log.exception("on_step callback failed on model %s", self.name)
        except BaseException:
            log.critical("the generation thread of model %s died", self.name, exc_info=True)
            raise
        finally:
            engine.reset()
            self._fail_leftovers()

    def _take(self) -> list[GenerationStream] | None:
        """The sequences that join at the next step; waits while there is nothing to do.
        None: the scheduler is stopping and nothing is left (or it was told to abort)."""
        with self._cond:
            while True:
                if self._abort:
                    return None
                joiners: list[GenerationStream] = []
                # A sequence cancelled since the last step leaves at this one: its place is free.
                staying = sum(1 for seq in self._active if not seq.stopped())
                free = self.max_sequences - staying
                while self._waiting and len(joiners) < free:
                    joiners.append(self._waiting.popleft())
                if joiners or self._active:
                    return joiners
                if self._closing:
                    return None
                self._cond.wait()

    def _step(self, engine: Engine, joiners: list[GenerationStream], out: _Out) -> None:
        leaving = {seq for seq in self._active if seq.stopped()}
        for seq in leaving:
            seq.end_cancelled(out)
        if leaving:
            engine.commit(leaving)
            self._active = [seq for seq in self._active if seq not in leaving]
            leaving = set()
        if self._active:
            for seq, token in engine.decode():
                if seq.advance(token, out):
                    leaving.add(seq)
        starting = []
        for seq in joiners:
            if seq.stopped():
                seq.end_cancelled(out)
            else:
                seq.begin(engine.tokenizer, engine.eos_ids)
                starting.append(seq)
        if starting:
            try:
                tokens = engine.prefill(starting)
            except Exception as exc:  # their prompts fail; the batch goes on
                log.exception("prompts failed on model %s", self.name)
                error = ModelError(
                    f"model {self.name} failed on the prompt: {type(exc).__name__}: {exc}"
                )
                for seq in starting:
                    seq.fail(error, out)
                tokens, starting = [], []
            for seq, token in zip(starting, tokens, strict=True):
                self._active.append(seq)
                if seq.advance(token, out):
                    leaving.add(seq)
        engine.commit(leaving)
        if leaving:
            self._active = [seq for seq in self._active if seq not in leaving]

    def _emit(self, out: _Out) -> None:
        if not out:
            return
        loop = self._loop
        assert loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            loop.call_soon_threadsafe(_deliver_all, out)

    def _fail_leftovers(self) -> None:
        """The thread ends: whatever has not finished fails with a retryable 503."""
        with self._cond:
            left = [*self._active, *self._waiting]
            self._active = []
            self._waiting.clear()
        out: _Out = []
        error = self._unloaded()
        for seq in left:
            if not seq.done:
                seq.fail(error, out)
        self._emit(out)


def _deliver_all(out: _Out) -> None:
    for stream, item in out:
        stream._deliver(item)
