"""The runner (``ModelExecutor``): validation up front, costs, and how each kind of model runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from inferd.errors import ModelNotFound, ValidationFailed
from inferd.jobs.runner import ModelExecutor
from inferd.models.registry import ModelState
from inferd.serving import ClientGone
from tests.support.executor import STREAMER, TABULAR, executor_on
from tests.support.models import BATCHES

pytestmark = pytest.mark.unit


@pytest.fixture
async def executor(tmp_path: Path) -> AsyncIterator[ModelExecutor]:
    async with executor_on(tmp_path) as executor:
        yield executor


def test_unknown_model_is_a_404_naming_the_served_ones(executor: ModelExecutor) -> None:
    with pytest.raises(ModelNotFound, match=r"served models: (stream, tab|tab, stream)"):
        executor.validate("nope", {"features": [0, 0, 0, 0]}, {})


@pytest.mark.parametrize(
    ("input", "parameters", "complaint"),
    [
        ({"features": [1, 2]}, {}, "4"),
        ([1, 2, 3, 4], {}, "must be an object"),
        ({"features": [0, 0, 0, 0]}, {"temperature": 1}, "takes no parameters"),
        ({"features": [0, 0, 0, "x"]}, {}, "number"),
    ],
)
def test_tabular_input_is_checked_before_it_is_queued(
    executor: ModelExecutor, input: object, parameters: dict[str, object], complaint: str
) -> None:
    with pytest.raises(ValidationFailed, match=complaint):
        executor.validate(TABULAR, input, parameters)


def test_a_model_that_validates_its_own_requests_is_asked(executor: ModelExecutor) -> None:
    executor.validate(STREAMER, "fine", {"chunks": 2})
    with pytest.raises(ValidationFailed, match="input must be a string"):
        executor.validate(STREAMER, 42, {})
    with pytest.raises(ValidationFailed, match="unknown parameters: speed"):
        executor.validate(STREAMER, "x", {"speed": 3})


def test_a_failed_model_is_refused(executor: ModelExecutor) -> None:
    loaded = executor.registry.find(TABULAR)
    assert loaded is not None
    loaded.state, loaded.error = ModelState.FAILED, "artifact corrupt"
    with pytest.raises(ModelNotFound, match="failed to load: artifact corrupt"):
        executor.validate(TABULAR, {"features": [0, 0, 0, 0]}, {})


def test_costs_rows_for_tabular_one_for_streams(executor: ModelExecutor) -> None:
    assert executor.tokens(TABULAR, {"instances": [[0, 0, 0, 0]] * 3}, {}) == 3
    assert executor.tokens(STREAMER, "x", {"chunks": 50}) == 1
    assert executor.streams(STREAMER) and not executor.streams(TABULAR)
    assert executor.version_of(TABULAR) == "1" and executor.version_of("nope") is None


async def test_tabular_predict_goes_through_the_batcher(executor: ModelExecutor) -> None:
    BATCHES.pop(TABULAR, None)
    rows = {"instances": [[2, 0, 0, 0], [0, 0, 0, 0]]}

    answer = await executor.predict("r1", TABULAR, rows, {}, lambda: False)

    assert answer["model"] == TABULAR and answer["model_version"] == "1"
    assert [p["label"] for p in answer["predictions"]] == ["two", "zero"]
    assert BATCHES[TABULAR] == [[2.0, 0.0]]


async def test_a_job_that_stops_while_queued_never_reaches_the_model(tmp_path: Path) -> None:
    async with executor_on(tmp_path) as executor:
        BATCHES.pop(TABULAR, None)
        loaded = executor.registry.find(TABULAR)
        assert loaded is not None and loaded.batcher is not None
        # The job's should_stop says "stop" by the time its batch forms: dropped unrun.
        job = executor.predict("r1", TABULAR, {"features": [7, 0, 0, 0]}, {}, lambda: True)
        with pytest.raises(ClientGone):
            await asyncio.wait_for(job, 5)
    assert [7.0] not in BATCHES.get(TABULAR, [])


async def test_streaming_models_refuse_the_batched_path(executor: ModelExecutor) -> None:
    with pytest.raises(ValidationFailed, match="streams"):
        await executor.predict("r1", STREAMER, "x", {}, lambda: False)
    with pytest.raises(ValidationFailed, match="does not stream"):
        list(executor.chunks(TABULAR, {"features": [0, 0, 0, 0]}, {}, lambda: False))


def test_chunks_stop_when_asked(executor: ModelExecutor) -> None:
    asked = iter([False, False, True])
    got = list(executor.chunks(STREAMER, "s", {"chunks": 10}, lambda: next(asked, True)))
    assert got == ["s-0"]


def test_result_of_the_chunks(executor: ModelExecutor) -> None:
    assert executor.result(STREAMER, ["a", "b"]) == {
        "text": "ab",
        "model": STREAMER,
        "model_version": "1",
    }
    assert executor.result(STREAMER, [{"x": 1}]) == {
        "chunks": [{"x": 1}],
        "model": STREAMER,
        "model_version": "1",
    }
    assert executor.result(TABULAR, [{"p": 1}, {"p": 2}]) == {"p": 2}
    assert executor.result(TABULAR, []) is None
