"""Micro-batching of concurrent requests into model batches."""

from inferd.batching.batcher import Batcher, BatcherStats
from inferd.batching.fair import HIGH, LOW, NORMAL, PRIORITIES, FairQueue, parse_priority

__all__ = [
    "HIGH",
    "LOW",
    "NORMAL",
    "PRIORITIES",
    "Batcher",
    "BatcherStats",
    "FairQueue",
    "parse_priority",
]
