"""Continuous batching of text generation: sequences share forward passes, join and leave
between steps (see :mod:`inferd.generation.scheduler`)."""

from inferd.generation.scheduler import (
    Engine,
    GenerationRequest,
    GenerationScheduler,
    GenerationStream,
    Step,
)

__all__ = ["Engine", "GenerationRequest", "GenerationScheduler", "GenerationStream", "Step"]
