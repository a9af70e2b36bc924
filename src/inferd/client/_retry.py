"""When the client tries a call again, and how long it waits first.

A call is retried only when the server said it could not take it *now* (503 or 429, waiting
what ``Retry-After`` says) or, for calls that are safe to repeat, when no answer came (the
connection failed or broke). Every call has a budget: at most ``max_attempts`` tries and at
most ``max_wait`` seconds spent waiting between them; a ``Retry-After`` longer than what is
left of the budget ends the call at once rather than waiting part of it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from inferd.client.errors import ConnectionFailed, InferdClientError

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The retry budget of one call (``RetryPolicy(max_attempts=1)`` turns retries off)."""

    max_attempts: int = 4
    """Tries in all, the first included."""
    max_wait: float = 30.0
    """Most seconds spent waiting between tries of one call."""
    backoff: float = 0.25
    """First wait when the server gave no ``Retry-After`` (a broken connection); it doubles
    on each try, up to ``max_backoff``, with jitter."""
    max_backoff: float = 4.0
    retry_statuses: frozenset[int] = field(default_factory=lambda: frozenset({429, 503}))
    """Statuses that mean "not now": the request was refused before it did anything."""
    jitter: float = 0.1
    """Up to this fraction is added to a ``Retry-After`` wait, so that clients told the same
    second do not all come back in the same instant."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.max_wait < 0 or self.backoff < 0 or self.max_backoff < 0 or self.jitter < 0:
            raise ValueError("max_wait, backoff, max_backoff and jitter must be >= 0")

    def attempts(self, idempotent: bool) -> Attempts:
        """A fresh budget for one call."""
        return Attempts(self, idempotent)


class Attempts:
    """The tries of one call so far; :meth:`next_delay` says whether and when to try again."""

    __slots__ = ("_rng", "idempotent", "policy", "tries", "waited")

    def __init__(self, policy: RetryPolicy, idempotent: bool, rng: random.Random | None = None):
        self.policy = policy
        self.idempotent = idempotent
        self.tries = 1
        self.waited = 0.0
        self._rng = rng or random.Random()

    def next_delay(self, error: InferdClientError) -> float | None:
        """Seconds to wait before the next try after ``error``, or None to give up (raise)."""
        policy = self.policy
        if not self.idempotent or self.tries >= policy.max_attempts:
            return None
        if isinstance(error, ConnectionFailed):
            delay = self._backoff()
        elif error.status in policy.retry_statuses:
            if error.retry_after is not None:
                delay = error.retry_after * (1.0 + policy.jitter * self._rng.random())
            else:
                delay = self._backoff()
        else:
            return None
        if self.waited + delay > policy.max_wait:
            return None
        self.tries += 1
        self.waited += delay
        return delay

    def _backoff(self) -> float:
        policy = self.policy
        base = min(policy.max_backoff, policy.backoff * 2 ** (self.tries - 1))
        return float(base * (0.5 + 0.5 * self._rng.random()))
