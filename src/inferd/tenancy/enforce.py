"""Per-key limits on the request path: a request rate and a daily token budget.

What a token is depends on the model: a row for tabular models (a batch request of 20 rows
costs 20), the ``max_new_tokens`` asked for by a text-generation request. The rate is checked
for every authenticated request, before anything else is done; the budget is reserved once the
request is read and its size is known. Both answers carry ``RateLimit-Policy`` and ``RateLimit``
headers; a refusal is a 429 with ``Retry-After``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, NoReturn

from inferd.errors import InferdError
from inferd.metrics import Metrics
from inferd.tenancy.keys import ApiKey
from inferd.tenancy.limits import (
    Limiter,
    QuotaDecision,
    Rate,
    RateDecision,
    parse_rate,
    rate_limit_headers,
)
from inferd.tenancy.limits_memory import MemoryLimiter
from inferd.tenancy.usage import UsageLedger

__all__ = ["Enforcer", "QuotaExceeded", "RateLimited"]


class _Limited(InferdError):
    status_code = 429
    retryable = True

    def __init__(self, message: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self._headers = headers

    def headers(self) -> dict[str, str]:
        return self._headers


class RateLimited(_Limited):
    """The key sent requests faster than its rate."""

    code = "rate_limited"


class QuotaExceeded(_Limited):
    """The key has used its token budget for the day (it resets at UTC midnight)."""

    code = "quota_exceeded"


class Enforcer:
    """Applies a key's rate and daily budget through a :class:`Limiter`."""

    def __init__(
        self, limiter: Limiter, metrics: Metrics, ledger: UsageLedger | None = None
    ) -> None:
        self.limiter = limiter
        self.metrics = metrics
        self.ledger = ledger
        self._rates: dict[str, Rate] = {}
        self._tokens: dict[str, Any] = {}  # prometheus child per user label

    @property
    def limiter(self) -> Limiter:
        return self._limiter

    @limiter.setter
    def limiter(self, limiter: Limiter) -> None:
        self._limiter = limiter
        # The in-process backend never waits: call it without a coroutine per decision.
        self._memory = limiter if isinstance(limiter, MemoryLimiter) else None
        self.immediate = self._memory is not None
        """Whether decisions are made without waiting (the in-process limiter): then
        :meth:`admit_now` and :meth:`charge_now` make them without a coroutine."""

    def _rate(self, text: str) -> Rate:
        rate = self._rates.get(text)
        if rate is None:
            rate = self._rates[text] = parse_rate(text)
        return rate

    async def admit(self, key: ApiKey) -> RateDecision | None:
        """Count one request against the key's rate; raise :class:`RateLimited` when over."""
        if key.rate is None:
            return None
        if self._memory is not None:
            return self.admit_now(key)
        rate = self._rates.get(key.rate) or self._rate(key.rate)
        decision = await self.limiter.check_rate(key.id, rate)
        if not decision.allowed:
            self._rate_limited(rate, decision)
        return decision

    def admit_now(self, key: ApiKey) -> RateDecision | None:
        """:meth:`admit` without a coroutine, where :attr:`immediate`."""
        if key.rate is None:
            return None
        assert self._memory is not None, "admit_now needs the in-process limiter"
        rate = self._rates.get(key.rate) or self._rate(key.rate)
        decision = self._memory.check_rate_now(key.id, rate)
        if not decision.allowed:
            self._rate_limited(rate, decision)
        return decision

    def _rate_limited(self, rate: Rate, decision: RateDecision) -> NoReturn:
        self.metrics.limit_rejections.labels("rate").inc()
        raise RateLimited(
            f"rate limit of {rate.limit} requests per {_period(rate.period)} exceeded; "
            f"retry in {max(1, round(decision.retry_after))} s",
            rate_limit_headers(decision),
        )

    async def admit_address(self, address: str, rate: Rate) -> RateDecision:
        """Count one request that presented no key against the limit of its client address
        (``anonymous_rate``); raise :class:`RateLimited` when over."""
        memory = self._memory
        key = "addr:" + address
        if memory is not None:
            decision = memory.check_rate_now(key, rate)
        else:
            decision = await self.limiter.check_rate(key, rate)
        if not decision.allowed:
            self.metrics.limit_rejections.labels("address_rate").inc()
            raise RateLimited(
                f"rate limit of {rate.limit} requests per {_period(rate.period)} for requests "
                f"without an API key from one address exceeded; retry in "
                f"{max(1, round(decision.retry_after))} s (or send an API key)",
                rate_limit_headers(decision),
            )
        return decision

    async def charge(
        self, key: ApiKey | None, tokens: int, rate: RateDecision | None = None
    ) -> QuotaDecision | None:
        """Reserve ``tokens`` of today's budget; raise :class:`QuotaExceeded` when over."""
        if key is None or key.daily_tokens is None or tokens <= 0:
            return None
        if self._memory is not None:
            return self.charge_now(key, tokens, rate)
        decision = await self.limiter.reserve(key.id, key.daily_tokens, tokens)
        return self._charged(key, tokens, rate, decision)

    def charge_now(
        self, key: ApiKey | None, tokens: int, rate: RateDecision | None = None
    ) -> QuotaDecision | None:
        """:meth:`charge` without a coroutine, where :attr:`immediate`."""
        if key is None or key.daily_tokens is None or tokens <= 0:
            return None
        assert self._memory is not None, "charge_now needs the in-process limiter"
        decision = self._memory.reserve_now(key.id, key.daily_tokens, tokens)
        return self._charged(key, tokens, rate, decision)

    def _charged(
        self, key: ApiKey, tokens: int, rate: RateDecision | None, decision: QuotaDecision
    ) -> QuotaDecision:
        assert key.daily_tokens is not None
        if not decision.allowed:
            self.metrics.limit_rejections.labels("quota").inc()
            raise QuotaExceeded(
                f"daily token budget of {key.daily_tokens} exhausted ({decision.remaining} "
                f"left, this request needs {tokens}); it resets at "
                f"{decision.reset_at.isoformat()}",
                rate_limit_headers(rate, decision),
            )
        counter = self._tokens.get(key.user)
        if counter is None:  # noted, applied with the request path's other metrics
            counter = self._tokens[key.user] = self.metrics.deferred.slot(
                self.metrics.tokens_used.labels(_user_label(key)).inc
            )
        counter(tokens)
        return decision

    async def refund(self, key: ApiKey, decision: QuotaDecision) -> None:
        """Give back a reservation whose request was not served (504, 5xx, gone)."""
        await self.limiter.settle(key.id, decision.reserved, 0, day=decision.day)

    async def settle(self, key: ApiKey, decision: QuotaDecision, model: str, used: int) -> None:
        """A request that reserved ``decision.reserved`` tokens used ``used`` of them: keep
        those, give the rest back, and count them in the usage ledger."""
        await self.limiter.settle(key.id, decision.reserved, used, day=decision.day)
        if used > 0:
            self.record(key, model, decision.day, used)

    def record(self, key: ApiKey, model: str, day: str, tokens: int) -> None:
        """Count a served request in the usage ledger."""
        if self.ledger is not None:
            self.ledger.record(key.user, key.id, model, day, tokens)

    async def settle_request(
        self, request_id: str, model: str, actual: int | None, executor_tokens: int
    ) -> None:
        """Settle a long-running request's reservation with what it used (``actual``, or
        ``executor_tokens`` when the model does not stream)."""
        if self.ledger is None:
            return
        charge = await self.ledger.take(request_id)
        if charge is None:
            return
        key_id, user, day, reserved = charge
        used = executor_tokens if actual is None else actual
        await self.limiter.settle(key_id, reserved, used, day=day)
        self.ledger.record(user, key_id, model, day, used)

    async def usage(self, key: ApiKey) -> dict[str, Any]:
        """The key's limits and what is left of them today (``GET /v1/usage``)."""
        day, used = await self.limiter.usage(key.id)
        now = datetime.now(UTC)
        midnight = datetime(now.year, now.month, now.day, tzinfo=UTC).timestamp() + 86400
        return {
            "user": key.user,
            "key_id": key.id,
            "scopes": sorted(key.scopes),
            "rate": key.rate,
            "daily_tokens": key.daily_tokens,
            "day": day,
            "tokens_used_today": used,
            "tokens_left_today": (
                max(0, key.daily_tokens - used) if key.daily_tokens is not None else None
            ),
            "resets_at": datetime.fromtimestamp(midnight, UTC).isoformat(),
            "models": await self.ledger.today(key.id, day) if self.ledger is not None else {},
        }


def _period(seconds: float) -> str:
    names = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day"}
    return names.get(seconds, f"{seconds:g} s")


def _user_label(key: ApiKey) -> str:
    # Bounded cardinality: the user, not the key (users are few; keys rotate).
    return key.user
