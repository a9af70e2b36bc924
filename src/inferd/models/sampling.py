"""One step of text generation: the next token (greedy, or sampled after temperature, top-k
and top-p from a sequence's own generator), stop strings, and the cache a forward pass gave.

Shared by :class:`~inferd.models.textgen.TextStream` (one sequence) and continuous batching
(:mod:`inferd.generation`), so both pick the same tokens from the same logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["GenerationSettings", "output_cache", "pick_token", "split_at_stop"]


@dataclass(frozen=True, slots=True)
class GenerationSettings:
    """One request's prompt and generation parameters, checked and merged with the spec's."""

    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: tuple[str, ...]

    @property
    def greedy(self) -> bool:
        """True when every step takes the most likely token (``temperature == 0``)."""
        return self.temperature == 0.0


def output_cache(out: Any) -> Any:
    """The key/value cache a forward pass returned (``cache``, or ``past_key_values`` in
    transformers releases before the rename)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def pick_token(
    logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None
) -> int:
    """The next token: the most likely one, or a sample after temperature, top-k and top-p."""
    import torch

    if settings.greedy or generator is None:
        return int(torch.argmax(logits).item())
    scores = logits.float() / settings.temperature
    if 0 < settings.top_k < scores.numel():
        kth = torch.topk(scores, settings.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if settings.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # Drop a token once the ones before it already cover top_p; the first always stays.
        drop = torch.cumsum(probs, dim=-1) - probs >= settings.top_p
        drop[0] = False
        scores = scores.scatter(0, order, ordered.masked_fill(drop, -math.inf))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def split_at_stop(text: str, stops: tuple[str, ...], final: bool = False) -> tuple[str, str, bool]:
    """``(ready, held, hit)``: ``ready`` can be yielded; ``held`` may still become a stop
    string (always "" when ``final``); ``hit`` says a stop string was found, and then ``ready``
    is the text before it."""
    if not stops:
        return text, "", False
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    if found:
        return text[: min(found)], "", True
    if final:
        return text, "", False
    keep = _partial_stop(text, stops)
    return text[: len(text) - keep], text[len(text) - keep :], False


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is the start of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
