"""The micro-batcher: batching, window, idle dispatch, expiry, cancellation, errors, bounds."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest

from inferd.batching import HIGH, LOW, Batcher
from inferd.errors import DeadlineExceeded, ModelError, Overloaded


class Recorder:
    """A model that records each batch, optionally blocking until released."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[float]] = []
        self.threads: set[str] = set()
        self.delay = delay
        self.gate: threading.Event | None = None
        self.gated: set[float] | None = None  # only batches holding one of these wait
        self.entered = threading.Event()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        self.batches.append([float(v) for v in batch[:, 0]])
        self.entered.set()
        if self.gate is not None and (self.gated is None or self.gated & set(batch[:, 0])):
            self.gate.wait(5)
        if self.delay:
            time.sleep(self.delay)
        return batch * 2


def row(value: float) -> np.ndarray:
    return np.array([[value, 0.0]])


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., Batcher[Any, Any]]]:
    made: list[Batcher[Any, Any]] = []

    def build(fn: Callable[[Any], Any], **kwargs: Any) -> Batcher[Any, Any]:
        batcher: Batcher[Any, Any] = Batcher(fn, name="test", **kwargs)
        batcher.start()
        made.append(batcher)
        return batcher

    yield build
    for batcher in made:
        await batcher.stop(grace=1)


async def infer(batcher: Batcher[Any, Any], payload: Any, rows: int, deadline: float) -> Any:
    """Submit one item and wait for its output (dropping it if this waiter is cancelled), as
    the data plane does."""
    future = batcher.submit(payload, rows, deadline)
    try:
        return (await future)[0]
    finally:
        if not future.done():
            future.cancel()


def far() -> float:
    return asyncio.get_running_loop().time() + 10


async def wait_entered(model: Recorder) -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, model.entered.wait, 5)


async def test_concurrent_requests_share_a_batch(make: Callable[..., Batcher[Any, Any]]) -> None:
    model = Recorder()
    model.gate = threading.Event()
    batcher = make(model, max_batch_size=32)
    first = asyncio.ensure_future(infer(batcher, row(0), 1, far()))
    await wait_entered(model)  # the model is busy with request 0
    rest = [asyncio.ensure_future(infer(batcher, row(i), 1, far())) for i in range(1, 11)]
    await asyncio.sleep(0.01)
    model.gate.set()
    results = await asyncio.gather(first, *rest)
    assert model.batches == [[0.0], [float(i) for i in range(1, 11)]]
    assert [r[0, 0] for r in results] == [2.0 * i for i in range(11)]


async def test_lone_request_does_not_wait_for_the_window(
    make: Callable[..., Batcher[Any, Any]],
) -> None:
    batcher = make(Recorder(), window=2.0)
    started = time.perf_counter()
    await infer(batcher, row(1), 1, far())
    assert time.perf_counter() - started < 1.0  # a 2 s window would have held it


async def test_batches_never_exceed_max_batch_size(
    make: Callable[..., Batcher[Any, Any]],
) -> None:
    model = Recorder()
    model.gate = threading.Event()
    batcher = make(model, max_batch_size=4)
    blocker = asyncio.ensure_future(infer(batcher, row(-1), 1, far()))
    await wait_entered(model)
    waiting = [asyncio.ensure_future(infer(batcher, row(i), 1, far())) for i in range(10)]
    await asyncio.sleep(0.01)
    model.gate.set()
    await asyncio.gather(blocker, *waiting)
    assert [len(b) for b in model.batches] == [1, 4, 4, 2]
    assert sum(model.batches[1:], []) == [float(i) for i in range(10)]  # FIFO order


async def test_multi_row_requests_are_split_back(make: Callable[..., Batcher[Any, Any]]) -> None:
    model = Recorder()
    model.gate = threading.Event()
    batcher = make(model, max_batch_size=8)
    blocker = asyncio.ensure_future(infer(batcher, row(-1), 1, far()))
    await wait_entered(model)
    three = np.array([[1.0, 0], [2.0, 0], [3.0, 0]])
    a = asyncio.ensure_future(infer(batcher, three, 3, far()))
    b = asyncio.ensure_future(infer(batcher, row(4), 1, far()))
    await asyncio.sleep(0.01)
    model.gate.set()
    await blocker
    assert (await a)[:, 0].tolist() == [2.0, 4.0, 6.0]
    assert (await b)[:, 0].tolist() == [8.0]
    assert model.batches[1] == [1.0, 2.0, 3.0, 4.0]


async def test_window_lets_a_partial_batch_gather_when_another_runs(
    make: Callable[..., Batcher[Any, Any]],
) -> None:
    model = Recorder()
    model.gate = threading.Event()
    model.gated = {0.0}
    batcher = make(model, max_batch_size=8, window=0.2, concurrency=2)
    first = asyncio.ensure_future(infer(batcher, row(0), 1, far()))
    await wait_entered(model)  # one batch runs; a second slot is free
    later = [asyncio.ensure_future(infer(batcher, row(1), 1, far()))]
    await asyncio.sleep(0.05)  # within the window: row 1 is still waiting for companions
    assert len(model.batches) == 1
    later.append(asyncio.ensure_future(infer(batcher, row(2), 1, far())))
    await asyncio.gather(*later)  # the window expires and both go together
    assert model.batches[1] == [1.0, 2.0]
    model.gate.set()
    await first
    assert len(model.threads) == 2


async def test_work_runs_off_the_event_loop(make: Callable[..., Batcher[Any, Any]]) -> None:
    model = Recorder()
    batcher = make(model)
    await infer(batcher, row(1), 1, far())
    assert threading.main_thread().name not in model.threads


async def test_expired_requests_are_dropped_before_the_model(
    make: Callable[..., Batcher[Any, Any]],
) -> None:
    model = Recorder()
    model.gate = threading.Event()
    batcher = make(model)
    blocker = asyncio.ensure_future(infer(batcher, row(-1), 1, far()))
    await wait_entered(model)
    loop = asyncio.get_running_loop()
    doomed = asyncio.ensure_future(infer(batcher, row(7), 1, loop.time() + 0.02))
    with pytest.raises(DeadlineExceeded):
        await doomed  # fails at its deadline while the model is still busy
    model.gate.set()
    await blocker
    await infer(batcher, row(8), 1, far())
    assert [7.0] not in model.batches and 7.0 not in sum(model.batches, [])
    assert model.batches[-1] == [8.0]
    assert batcher.stats.dropped_cancelled + batcher.stats.dropped_expired == 1


async def test_cancelled_requests_are_dropped_before_the_model(
    make: Callable[..., Batcher[Any, Any]],
) -> None:
    model = Recorder()
    model.gate = threading.Event()
    batcher = make(model)
    blocker = asyncio.ensure_future(infer(batcher, row(-1), 1, far()))
    await wait_entered(model)
    gone = asyncio.ensure_future(infer(batcher, row(5), 1, far()))
    kept = asyncio.ensure_future(infer(batcher, row(6), 1, far()))
    await asyncio.sleep(0.01)
    gone.cancel()  # the caller went away
    model.gate.set()
    await asyncio.gather(blocker, kept)
    assert 5.0 not in sum(model.batches, [])
    assert model.batches[-1] == [6.0]
    assert batcher.stats.dropped_cancelled == 1


async def test_a_failing_batch_fails_each_caller_and_the_batcher_goes_on(
    make: Callable[..., Batcher[Any, Any]],
) -> None:
    calls = 0
    gate = threading.Event()

    def model(batch: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        gate.wait(5)
        if 13.0 in batch[:, 0]:
            raise ValueError("unlucky row")
        return batch

    batcher = make(model)
    first = asyncio.ensure_future(infer(batcher, row(0), 1, far()))
    await asyncio.sleep(0.05)
    bad = [asyncio.ensure_future(infer(batcher, row(v), 1, far())) for v in (12, 13, 14)]
    await asyncio.sleep(0.01)
    gate.set()
    await first
    outcomes = await asyncio.gather(*bad, return_exceptions=True)
    assert all(isinstance(o, ModelError) for o in outcomes)
    assert "ValueError: unlucky row" in str(outcomes[0])
    assert "3 rows" in str(outcomes[0])
    assert (await infer(batcher, row(1), 1, far()))[0, 0] == 1.0
    assert batcher.stats.failed_batches == 1


async def test_each_answered_batch_goes_to_the_output_hook_once(
    make: Callable[..., Batcher[Any, Any]],
) -> None:
    """The hook (drift monitoring) sees each batch whole, after its callers have their
    results; one that raises changes nothing for them. A failed batch is not handed over."""
    model = Recorder()
    model.gate = threading.Event()
    seen: list[tuple[list[float], list[float]]] = []

    def hook(data: Any, output: Any) -> None:
        seen.append((data[:, 0].tolist(), output[:, 0].tolist()))
        raise RuntimeError("a broken hook")

    batcher = make(model, max_batch_size=8, on_output=hook)
    blocker = asyncio.ensure_future(infer(batcher, row(-1), 1, far()))
    await wait_entered(model)
    rest = [asyncio.ensure_future(infer(batcher, row(i), 1, far())) for i in (1, 2, 3)]
    await asyncio.sleep(0.01)
    model.gate.set()
    results = await asyncio.gather(blocker, *rest)
    assert [r[0, 0] for r in results] == [-2.0, 2.0, 4.0, 6.0]
    assert seen == [([-1.0], [-2.0]), ([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])]
    model.gate = None

    def failing(batch: np.ndarray) -> np.ndarray:
        raise ValueError("no")

    broken = make(failing, on_output=hook)
    with pytest.raises(ModelError):
        await infer(broken, row(5), 1, far())
    assert len(seen) == 2


async def test_shedding_past_the_mark_and_full_queue(
    make: Callable[..., Batcher[Any, Any]],
) -> None:
    rejections: list[str] = []
    model = Recorder()
    model.gate = threading.Event()
    batcher = make(model, max_queue_size=10, shed_threshold=0.8, on_reject=rejections.append)
    blocker = asyncio.ensure_future(infer(batcher, row(-1), 1, far()))
    await wait_entered(model)
    queued = [batcher.submit(row(i), 1, far()) for i in range(8)]
    assert batcher.depth == 8
    with pytest.raises(Overloaded) as caught:
        batcher.submit(row(99), 1, far())
    assert caught.value.status_code == 503
    assert caught.value.headers() == {"retry-after": "1"}
    assert "8 requests queued" in caught.value.message
    with pytest.raises(Overloaded):
        batcher.check_admission()
    assert rejections == ["shed", "shed"]
    model.gate.set()
    await asyncio.gather(blocker, *queued)
    batcher.check_admission()  # room again once the queue drained


async def test_high_priority_is_shed_last_and_low_priority_first(
    make: Callable[..., Batcher[Any, Any]],
) -> None:
    rejections: list[str] = []
    model = Recorder()
    model.gate = threading.Event()
    batcher = make(model, max_queue_size=10, shed_threshold=0.8, on_reject=rejections.append)
    blocker = asyncio.ensure_future(infer(batcher, row(-1), 1, far()))
    await wait_entered(model)
    queued = [batcher.submit(row(i), 1, far()) for i in range(4)]
    with pytest.raises(Overloaded) as caught:  # low: refused at half the mark (4 of 8)
        batcher.check_admission(priority=LOW)
    assert "shedding low-priority requests at 4 of 10" in caught.value.message
    queued += [batcher.submit(row(i), 1, far()) for i in range(4, 8)]
    with pytest.raises(Overloaded):  # normal: at the mark
        batcher.submit(row(99), 1, far())
    queued += [batcher.submit(row(i), 1, far(), priority=HIGH) for i in (100, 101)]
    with pytest.raises(Overloaded) as caught:  # high: only when full
        batcher.check_admission(priority=HIGH)
    assert caught.value.status_code == 503
    assert rejections == ["shed", "shed", "full"]
    model.gate.set()
    await asyncio.gather(blocker, *queued)
    # The high-priority requests, queued last, ran in the first batch after the blocker.
    assert model.batches[1][:2] == [100.0, 101.0]


async def test_a_tenant_over_its_share_is_refused_before_the_others(
    make: Callable[..., Batcher[Any, Any]],
) -> None:
    rejections: list[str] = []
    model = Recorder()
    model.gate = threading.Event()
    batcher = make(
        model, max_queue_size=10, shed_threshold=0.8, max_batch_size=4, on_reject=rejections.append
    )
    blocker = asyncio.ensure_future(infer(batcher, row(-1), 1, far()))
    await wait_entered(model)
    # Alone, a tenant may fill the queue up to the mark.
    queued = [batcher.submit(row(i), 1, far(), tenant="heavy") for i in range(5)]
    queued += [batcher.submit(row(i), 1, far(), tenant="light") for i in (50, 51)]
    # Past half the mark (4 of 8) with two tenants waiting, each one's share is 8 / 2.
    with pytest.raises(Overloaded) as caught:
        batcher.submit(row(99), 1, far(), tenant="heavy")
    assert "holds 5 of its 7 queued requests" in caught.value.message
    batcher.check_admission("light")
    batcher.check_admission("newcomer")
    assert rejections == ["fair_share"]
    model.gate.set()
    await asyncio.gather(blocker, *queued)
    # The light tenant's requests did not wait for the heavy one's five: one batch of four.
    assert {50.0, 51.0} <= set(model.batches[1])


async def test_one_queue_for_every_tenant_when_fair_sharing_is_off(
    make: Callable[..., Batcher[Any, Any]],
) -> None:
    model = Recorder()
    model.gate = threading.Event()
    batcher = make(model, max_queue_size=10, max_batch_size=4, fair=False)
    blocker = asyncio.ensure_future(infer(batcher, row(-1), 1, far()))
    await wait_entered(model)
    queued = [batcher.submit(row(i), 1, far(), tenant="heavy") for i in range(6)]
    queued += [batcher.submit(row(i), 1, far(), tenant="light") for i in (50, 51)]
    model.gate.set()
    await asyncio.gather(blocker, *queued)
    assert model.batches[1:] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 50.0, 51.0]]


async def test_shedding_when_the_oldest_request_waited_too_long(
    make: Callable[..., Batcher[Any, Any]],
) -> None:
    rejections: list[str] = []
    model = Recorder()
    model.gate = threading.Event()
    batcher = make(model, shed_wait=0.5, on_reject=rejections.append)
    blocker = asyncio.ensure_future(infer(batcher, row(-1), 1, far()))
    await wait_entered(model)
    loop = asyncio.get_running_loop()
    queued = batcher.submit(row(1), 1, loop.time() + 0.2)  # sheds once it waited 0.1 s
    batcher.check_admission()  # a short queue that has not waited
    await asyncio.sleep(0.15)
    with pytest.raises(Overloaded) as caught:
        batcher.check_admission()
    assert caught.value.status_code == 503
    assert "the oldest of its 1 queued requests has waited" in caught.value.message
    assert rejections == ["wait"]
    model.gate.set()
    await asyncio.gather(blocker, queued, return_exceptions=True)
    batcher.check_admission()  # the queue is empty again


async def test_full_queue_rejects_when_shedding_is_off(
    make: Callable[..., Batcher[Any, Any]],
) -> None:
    rejections: list[str] = []
    model = Recorder()
    model.gate = threading.Event()
    batcher = make(model, max_queue_size=3, shed_threshold=1.0, on_reject=rejections.append)
    blocker = asyncio.ensure_future(infer(batcher, row(-1), 1, far()))
    await wait_entered(model)
    queued = [batcher.submit(row(i), 1, far()) for i in range(3)]
    with pytest.raises(Overloaded):
        batcher.submit(row(4), 1, far())
    assert rejections == ["full"]
    model.gate.set()
    await asyncio.gather(blocker, *queued)


async def test_stop_drains_queued_work_then_refuses(
    make: Callable[..., Batcher[Any, Any]],
) -> None:
    model = Recorder(delay=0.02)
    batcher = make(model)
    pending = [asyncio.ensure_future(infer(batcher, row(i), 1, far())) for i in range(5)]
    await asyncio.sleep(0)
    await batcher.stop(grace=5)
    results = await asyncio.gather(*pending)
    assert len(results) == 5
    with pytest.raises(Overloaded, match="shutting down"):
        batcher.submit(row(1), 1, far())


async def test_stop_fails_what_cannot_finish_in_the_grace_period(
    make: Callable[..., Batcher[Any, Any]],
) -> None:
    model = Recorder()
    model.gate = threading.Event()
    batcher = make(model)
    running = asyncio.ensure_future(infer(batcher, row(0), 1, far()))
    await wait_entered(model)
    queued = asyncio.ensure_future(infer(batcher, row(1), 1, far()))
    await asyncio.sleep(0)
    await batcher.stop(grace=0.1)
    model.gate.set()
    for future in (running, queued):
        with pytest.raises(Overloaded):
            await future


async def test_batch_metrics_callback(make: Callable[..., Batcher[Any, Any]]) -> None:
    seen: list[tuple[int, float]] = []
    batcher = make(Recorder(delay=0.01), on_batch=lambda n, s: seen.append((n, s)))
    await infer(batcher, np.zeros((3, 2)), 3, far())
    assert len(seen) == 1
    assert seen[0][0] == 3
    assert seen[0][1] >= 0.01


async def test_warm_up_runs_on_every_worker_thread() -> None:
    threads: set[str] = set()
    batcher: Batcher[Any, Any] = Batcher(lambda b: b, name="warm", concurrency=3)
    await batcher.on_each_worker(lambda: threads.add(threading.current_thread().name))
    assert len(threads) == 3
    batcher.start()
    await batcher.stop()


async def test_quick_calls_move_to_the_loop_and_a_lone_request_runs_at_once(
    make: Callable[..., Batcher[Any, Any]],
) -> None:
    model = Recorder()
    batcher = make(model, inline_max=1.0)
    assert batcher.run_now(row(0), 1, far()) is None  # nothing known about the model yet
    for i in range(8):  # timed in the thread first
        await infer(batcher, row(i), 1, far())
    assert batcher.inline and batcher.stats.inline_batches == 0
    assert threading.current_thread().name not in model.threads

    done = batcher.run_now(row(9), 1, far())
    assert done is not None
    output, rows = done
    assert rows == 1 and output.tolist() == [[18.0, 0.0]]
    assert threading.current_thread().name in model.threads
    assert batcher.stats.inline_batches == 1

    # Queued requests still form one batch, run on the loop now.
    results = await asyncio.gather(*(infer(batcher, row(v), 1, far()) for v in (20, 21, 22)))
    assert [r.tolist() for r in results] == [[[40.0, 0.0]], [[42.0, 0.0]], [[44.0, 0.0]]]
    assert model.batches[-1] == [20.0, 21.0, 22.0]
    assert batcher.stats.inline_batches == 2


async def test_run_now_leaves_to_the_queue_what_it_should_not_run(
    make: Callable[..., Batcher[Any, Any]],
) -> None:
    model = Recorder()
    batcher = make(model, inline_max=1.0)
    for i in range(8):
        await infer(batcher, row(i), 1, far())
    loop = asyncio.get_running_loop()
    assert batcher.run_now(row(1), 1, loop.time() - 1) is None  # past its deadline
    assert batcher.run_now(row(1), 1, far(), lambda: True) is None  # its caller has gone
    assert batcher.run_now(row(1), 100, far()) is None  # more rows than a batch
    queued = batcher.submit(row(1), 1, far())
    assert batcher.run_now(row(2), 1, far()) is None  # another request waits
    await queued


async def test_slow_calls_stay_in_the_threads(make: Callable[..., Batcher[Any, Any]]) -> None:
    model = Recorder(delay=0.005)  # a sleep: quick on the CPU, slow on the clock
    batcher = make(model, inline_max=0.001)
    for i in range(10):
        await infer(batcher, row(i), 1, far())
    assert not batcher.inline
    assert batcher.run_now(row(1), 1, far()) is None
    assert threading.current_thread().name not in model.threads


async def test_a_failing_call_on_the_loop_raises_the_model_error(
    make: Callable[..., Batcher[Any, Any]],
) -> None:
    fail = False

    def model(batch: np.ndarray) -> np.ndarray:
        if fail:
            raise ValueError("boom")
        return batch

    batcher = make(model, inline_max=1.0)
    for i in range(8):
        await infer(batcher, row(i), 1, far())
    fail = True
    with pytest.raises(ModelError, match="boom"):
        batcher.run_now(row(1), 1, far())
    assert batcher.stats.failed_batches == 1
    fail = False
    assert batcher.run_now(row(1), 1, far()) is not None
