"""Micro-batching of concurrent requests into model batches."""

from inferd.batching.batcher import Batcher, BatcherStats

__all__ = ["Batcher", "BatcherStats"]
