"""Continuous batching on the tiny GPT-2: sequences share steps, join and leave between them,
and each gets exactly what it would get alone."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from inferd.errors import ModelError, ModelNotReady, Overloaded
from inferd.generation import GenerationRequest, GenerationScheduler, GenerationStream, Step
from inferd.generation.engine import TorchEngine, batchable
from inferd.models.repository import ModelRepository
from inferd.models.textgen import TextGenerationModel
from tests.support.textgen import write_text_model

PROMPTS = [
    "the quick",
    "a stitch",
    "the café",
    "smile",
    "numbers one two",
    "all that",
    "an apple",
    "the early",
]


@pytest.fixture(scope="module")
def model(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("generation-models")
    write_text_model(root, "tiny", source=tiny_gpt2)
    entry = ModelRepository(root).get("tiny")
    loaded = TextGenerationModel(entry.spec, 1, entry.artifact(1))
    loaded.load()
    yield loaded
    loaded.unload()


def req(model: TextGenerationModel, prompt: str, **parameters: Any) -> GenerationRequest:
    settings = model.request_settings(prompt, parameters)
    ids = model.prompt_ids(prompt)
    return GenerationRequest(ids, settings, model.budget(ids, settings))


class StepGate:
    """An ``on_step`` that records each step's size and, until :meth:`open`, holds the
    scheduler's thread after every step until the test lets it run one more."""

    def __init__(self, hold: bool = True) -> None:
        self.sizes: list[int] = []
        self._allowed = threading.Semaphore(0)
        self._open = not hold

    def __call__(self, sequences: int, seconds: float) -> None:
        self.sizes.append(sequences)
        if not self._open:
            assert self._allowed.acquire(timeout=10), "the test never let the step go"

    def step(self) -> None:
        self._allowed.release()

    def open(self) -> None:
        self._open = True
        self._allowed.release()


Run = Callable[..., contextlib.AbstractAsyncContextManager[tuple[GenerationScheduler, Any]]]


@pytest.fixture
def run(model: TextGenerationModel) -> Run:
    """``async with run(max_sequences=..., on_step=...) as (scheduler, engine)``."""

    @contextlib.asynccontextmanager
    async def started(
        max_sequences: int = 16,
        max_queue: int = 64,
        on_step: StepGate | None = None,
        engine_limit: int | None = None,
    ) -> AsyncIterator[tuple[GenerationScheduler, Any]]:
        scheduler = GenerationScheduler(
            "tiny", max_sequences=max_sequences, max_queue=max_queue, on_step=on_step
        )
        engine = TorchEngine(model)
        if engine_limit is not None:
            engine.max_sequences = engine_limit
        scheduler.start(engine)
        try:
            yield scheduler, engine
        finally:
            if on_step is not None:
                on_step.open()
            await scheduler.stop(5)

    return started


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not condition():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.001)


async def collect(stream: GenerationStream) -> tuple[str, list[Step]]:
    steps = [step async for step in stream]
    return "".join(s.text for s in steps), steps


# ---------------------------------------------------------------------------- same output
async def test_greedy_output_batched_is_what_one_at_a_time_gives(
    model: TextGenerationModel, run: Run
) -> None:
    solo = [model.generate(p) for p in PROMPTS]
    solo_forwards = 0
    for p in PROMPTS:
        alone = model.stream(p)
        list(alone)
        solo_forwards += alone.tokens + 1  # and the one that gave the end of the text

    async with run(max_sequences=8) as (scheduler, engine):
        streams = [scheduler.submit(req(model, p)) for p in PROMPTS]
        results = [await collect(s) for s in streams]

    assert [text for text, _ in results] == solo
    assert all(steps[-1].finish_reason == "eos" for _, steps in results)
    # Shared forward passes: a prompt each, then one step for all of them at a time.
    assert engine.forwards < solo_forwards / 2


async def test_sequences_of_very_different_lengths(model: TextGenerationModel, run: Run) -> None:
    prompts = ["", "zq" * 30, "the quick", "numbers one two three four five"]
    params: dict[str, Any] = {"max_new_tokens": 12}
    lengths = [len(model.prompt_ids(p)) for p in prompts]
    assert lengths[0] == 1 and lengths[1] == 60  # the start token alone; 60 tokens

    async with run() as (scheduler, _):
        streams = [scheduler.submit(req(model, p, **params)) for p in prompts]
        texts = [(await collect(s))[0] for s in streams]

    assert texts == [model.generate(p, params) for p in prompts]


async def test_stop_strings_per_sequence(model: TextGenerationModel, run: Run) -> None:
    cases = [
        (["lazy"], " brown fox jumps over the "),
        (["s over t"], " brown fox jump"),  # spans three tokens
        (["dog", "fox"], " brown "),
        ([" brown"], ""),
        (["the lazy cat"], " brown fox jumps over the lazy dog again."),  # never completes
    ]
    async with run() as (scheduler, _):
        streams = [scheduler.submit(req(model, "the quick", stop=stop)) for stop, _ in cases]
        results = [await collect(s) for s in streams]

    for (stop, expected), (text, steps) in zip(cases, results, strict=True):
        assert text == expected
        assert steps[-1].finish_reason == ("eos" if stop == ["the lazy cat"] else "stop")
        assert all(s not in step.text for step in steps for s in stop)


async def test_max_new_tokens_ends_with_length(model: TextGenerationModel, run: Run) -> None:
    async with run() as (scheduler, _):
        text, steps = await collect(scheduler.submit(req(model, "the quick", max_new_tokens=3)))

    assert text == " brown fox jumps"
    assert [s.tokens for s in steps] == [1, 2, 3]
    assert steps[-1].finish_reason == "length"


# ---------------------------------------------------------------------------- sampling
async def test_a_seed_gives_the_same_tokens_alone_or_batched(
    model: TextGenerationModel, run: Run
) -> None:
    sampled = {"temperature": 1.5, "seed": 7, "max_new_tokens": 12}
    async with run() as (scheduler, _):
        alone, _ = await collect(scheduler.submit(req(model, "hello", **sampled)))
        crowd = [
            scheduler.submit(req(model, p, temperature=1.2, top_k=20, seed=i, max_new_tokens=12))
            for i, p in enumerate(PROMPTS[:5])
        ]
        crowd.insert(2, scheduler.submit(req(model, "hello", **sampled)))
        crowd.append(scheduler.submit(req(model, "the quick")))  # greedy in the same batch
        batched = [(await collect(s))[0] for s in crowd]
        seeds = [
            (await collect(scheduler.submit(req(model, "hello", **{**sampled, "seed": s}))))[0]
            for s in range(6)
        ]

    assert batched[2] == alone == model.generate("hello", sampled)
    assert batched[-1] == model.generate("the quick")
    for i, p in enumerate(PROMPTS[:5]):
        params = {"temperature": 1.2, "top_k": 20, "seed": i, "max_new_tokens": 12}
        assert batched[i if i < 2 else i + 1] == model.generate(p, params)
    assert len(set(seeds)) > 1  # this is sampling: the seed matters


# ---------------------------------------------------------------------------- joining
async def test_a_new_sequence_joins_between_steps_of_a_running_one(
    model: TextGenerationModel, run: Run
) -> None:
    gate = StepGate()
    async with run(on_step=gate) as (scheduler, engine):
        first = scheduler.submit(req(model, "numbers one two"))
        early = [await anext(first)]  # its prompt: step 1
        gate.step()
        early.append(await anext(first))  # step 2: a batch of one
        second = scheduler.submit(req(model, "the quick"))
        gate.step()
        joined = await anext(second)  # step 3: the newcomer's prompt, beside the first's token
        third = await anext(first)
        assert engine.size == 2
        assert third.finish_reason is None  # the first is still running
        gate.open()
        rest_first, steps_first = await collect(first)
        rest_second, _ = await collect(second)

    assert gate.sizes[:3] == [1, 1, 2]
    assert steps_first[-1].finish_reason == "eos"
    text_first = "".join(s.text for s in [*early, third]) + rest_first
    assert text_first == model.generate("numbers one two")
    assert joined.text + rest_second == model.generate("the quick")


async def test_the_cache_is_as_wide_as_the_longest_sequence_in_it(
    model: TextGenerationModel, run: Run
) -> None:
    gate = StepGate()
    short, long = "the quick", "zq" * 30
    async with run(on_step=gate) as (scheduler, engine):
        a = scheduler.submit(req(model, short))
        b = scheduler.submit(req(model, long, max_new_tokens=2))
        await anext(a)
        for _ in range(1000):  # the step's size is recorded after its tokens are sent
            if gate.sizes:
                break
            await asyncio.sleep(0.001)
        fed_back = 1  # tokens of the short one fed back when the long one leaves
        if gate.sizes == [1]:  # the thread took the first before the second was queued
            gate.step()
            await anext(a)
            fed_back = 2
        await anext(b)
        width_together = engine.width
        gate.step()
        await collect(b)  # its second token: its budget, and it leaves the batch
        await anext(a)
        width_after = engine.width
        gate.open()
        text, _ = await collect(a)

    assert width_together == 60
    assert width_after == len(model.prompt_ids(short)) + fed_back
    assert text  # the short one went on


# ---------------------------------------------------------------------------- cancellation
async def test_cancelling_frees_the_place_for_the_next(
    model: TextGenerationModel, run: Run
) -> None:
    gate = StepGate()
    async with run(max_sequences=1, on_step=gate) as (scheduler, engine):
        first = scheduler.submit(req(model, "numbers one two"))
        await anext(first)
        second = scheduler.submit(req(model, "the quick"))
        assert scheduler.depth == 1
        first.cancel()
        gate.step()
        rest, steps = await collect(first)
        started = await anext(second)
        assert (scheduler.active, scheduler.depth, engine.size) == (1, 0, 1)
        gate.open()
        text, _ = await collect(second)

    assert steps[-1].finish_reason == "cancelled"
    assert rest == ""
    assert started.text + text == model.generate("the quick")


async def test_a_queued_sequence_cancelled_leaves_the_queue_at_once(
    model: TextGenerationModel, run: Run
) -> None:
    gate = StepGate()
    async with run(max_sequences=1, max_queue=1, on_step=gate) as (scheduler, _):
        running = scheduler.submit(req(model, "the quick"))
        await anext(running)
        queued = scheduler.submit(req(model, "a stitch"))
        with pytest.raises(Overloaded) as full:
            scheduler.submit(req(model, "smile"))
        queued.cancel()
        accepted = scheduler.submit(req(model, "smile"))
        gate.open()
        _, cancelled_steps = await collect(queued)
        text, _ = await collect(accepted)

    assert full.value.status_code == 503
    assert full.value.retry_after == 1.0
    assert [s.finish_reason for s in cancelled_steps] == ["cancelled"]
    assert text == model.generate("smile")


async def test_a_caller_gone_is_dropped_before_the_next_step(
    model: TextGenerationModel, run: Run
) -> None:
    gone = False
    gate = StepGate()
    async with run(on_step=gate) as (scheduler, engine):
        stream = scheduler.submit(req(model, "numbers one two"), gone=lambda: gone)
        first = await anext(stream)
        gone = True
        gate.step()
        _, steps = await collect(stream)
        size = engine.size

    assert first.tokens == 1
    assert [(s.finish_reason, s.tokens) for s in steps] == [("cancelled", 1)]
    assert size == 0


# ---------------------------------------------------------------------------- life cycle
async def test_stop_lets_running_sequences_finish_then_refuses(
    model: TextGenerationModel, run: Run
) -> None:
    async with run() as (scheduler, _):
        stream = scheduler.submit(req(model, "the quick"))
        stopping = asyncio.create_task(scheduler.stop(5))
        text, _ = await collect(stream)
        await stopping
        with pytest.raises(ModelNotReady) as refused:
            scheduler.submit(req(model, "the quick"))

    assert text == model.generate("the quick")
    assert refused.value.retryable


async def test_stop_past_its_grace_fails_what_is_left_retryably(
    model: TextGenerationModel, run: Run
) -> None:
    gate = StepGate()
    async with run(max_sequences=1, on_step=gate) as (scheduler, _):
        running = scheduler.submit(req(model, "numbers one two"))
        await anext(running)
        queued = scheduler.submit(req(model, "the quick"))
        stopping = asyncio.create_task(scheduler.stop(0))
        await until(lambda: scheduler._abort)
        gate.open()
        await stopping
        with pytest.raises(ModelNotReady) as first:
            await collect(running)
        with pytest.raises(ModelNotReady):
            await collect(queued)

    assert first.value.status_code == 503
    assert "unloaded" in first.value.message


async def test_a_failed_step_fails_its_batch_and_the_scheduler_goes_on(
    model: TextGenerationModel, run: Run
) -> None:
    async with run() as (scheduler, engine):
        real = engine.decode
        calls = 0

        def broken() -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("CUDA out of memory")
            return real()

        engine.decode = broken
        with pytest.raises(ModelError, match="CUDA out of memory"):
            await collect(scheduler.submit(req(model, "the quick")))
        text, _ = await collect(scheduler.submit(req(model, "the quick")))

    assert text == model.generate("the quick")


async def test_a_model_that_cannot_batch_runs_one_sequence_at_a_time(
    model: TextGenerationModel, run: Run
) -> None:
    gate = StepGate(hold=False)
    async with run(max_sequences=8, on_step=gate, engine_limit=1) as (scheduler, _):
        streams = [scheduler.submit(req(model, p)) for p in PROMPTS[:3]]
        texts = [(await collect(s))[0] for s in streams]

    assert scheduler.max_sequences == 1
    assert max(gate.sizes) == 1
    assert texts == [model.generate(p) for p in PROMPTS[:3]]


def test_batchable_models() -> None:
    from transformers import GPT2Config

    assert batchable(GPT2Config())
    assert not batchable(SimpleNamespace(sliding_window=4096))
    assert batchable(SimpleNamespace(sliding_window=4096, use_sliding_window=False))
    assert not batchable(SimpleNamespace(layer_types=["full_attention", "sliding_attention"]))
    assert batchable(SimpleNamespace(layer_types=["full_attention"] * 2))
