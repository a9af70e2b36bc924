"""The in-process result store and the cache's keys, without a server."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from inferd.metrics import Metrics
from inferd.models.spec import CacheSpec
from inferd.serving.cache import MemoryResults, _pack, _unpack


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def row(value: float, width: int = 4) -> np.ndarray[Any, Any]:
    return np.full((1, width), value)


async def test_entries_expire_and_the_least_recently_used_go_first() -> None:
    clock = Clock()
    store = MemoryResults(clock=clock)
    spec = CacheSpec(max_entries=2, ttl_seconds=10)
    store.put("m", b"a", row(1), spec)
    store.put("m", b"b", row(2), spec)
    assert store.get_now("m", b"a") is not None  # a is now the most recently used
    store.put("m", b"c", row(3), spec)
    assert store.get_now("m", b"b") is None
    assert (await store.get("m", b"a")) is not None
    assert store.get_now("m", b"c") is not None
    assert store.get_now("other", b"a") is None  # one table per model
    clock.now += 10
    assert store.get_now("m", b"a") is None


def test_bytes_are_bounded_and_large_answers_are_not_kept() -> None:
    metrics = Metrics()
    store = MemoryResults(metrics)
    spec = CacheSpec(max_entries=1000, max_bytes=4096)  # a tenth: 409 bytes per answer
    for i in range(20):
        store.put("m", b"%d" % i, row(i, 40), spec)  # 320 bytes each
    assert store.get_now("m", b"19") is not None
    assert store.get_now("m", b"7") is None
    assert metrics.registry.get_sample_value("inference_cache_bytes", {"model": "m"}) == 3840
    assert metrics.registry.get_sample_value("inference_cache_entries", {"model": "m"}) == 12
    store.put("m", b"big", row(0, 60), spec)  # 480 bytes
    assert store.get_now("m", b"big") is None
    store.clear()
    assert metrics.registry.get_sample_value("inference_cache_entries", {"model": "m"}) == 0


@pytest.mark.parametrize("value", [np.arange(6.0).reshape(2, 3), np.arange(4, dtype=np.float32)])
def test_answers_cross_redis_unchanged(value: np.ndarray[Any, Any]) -> None:
    back = _unpack(_pack(value))
    assert back.dtype == value.dtype and back.shape == value.shape
    assert np.array_equal(back, value)
    assert not back.flags.writeable


def test_a_cache_table_is_refused_for_text_models() -> None:
    from inferd.models.spec import ModelSpec

    with pytest.raises(ValueError, match=r"\[cache\] is for tabular and image models"):
        ModelSpec.model_validate(
            {"name": "t", "task": "text-generation", "cache": {"max_entries": 10}}
        )
    spec = ModelSpec.model_validate(
        {"name": "i", "input": {"features": ["a"]}, "cache": {"ttl_seconds": 5}}
    )
    assert spec.cache is not None and spec.cache.max_entries == 10_000
    with pytest.raises(ValueError, match="max_entries"):
        ModelSpec.model_validate(
            {"name": "i", "input": {"features": ["a"]}, "cache": {"max_entries": 0}}
        )


@pytest.mark.parametrize("data", [b"garbage", b"<f8|x|", b"zz|1|abc", b"<f8|3|abc"])
def test_entries_not_written_by_the_cache_are_refused(data: bytes) -> None:
    with pytest.raises((ValueError, TypeError)):
        _unpack(data)
