"""Tenancy: API keys (:mod:`.keys`), authentication (:mod:`.auth`) and per-key limits.

The limits engine (:mod:`.limits`, :mod:`.limits_memory`, :mod:`.limits_redis`) is re-exported
here; importing it pulls in neither Redis nor the key store.
"""

from inferd.tenancy.limits import (
    Limiter,
    LimiterUnavailable,
    QuotaDecision,
    Rate,
    RateDecision,
    parse_rate,
    rate_limit_headers,
)
from inferd.tenancy.limits_memory import MemoryLimiter
from inferd.tenancy.limits_redis import RedisLimiter

__all__ = [
    "Limiter",
    "LimiterUnavailable",
    "MemoryLimiter",
    "QuotaDecision",
    "Rate",
    "RateDecision",
    "RedisLimiter",
    "parse_rate",
    "rate_limit_headers",
]
