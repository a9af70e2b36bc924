"""Tenancy: API keys (:mod:`.keys`), authentication (:mod:`.auth`) and per-key limits.

The limits engine (:mod:`.limits`, :mod:`.limits_redis`) is re-exported here; importing it
pulls in neither Redis nor the key store.
"""

from inferd.tenancy.limits import (
    Limiter,
    LimiterUnavailable,
    MemoryLimiter,
    QuotaDecision,
    Rate,
    RateDecision,
    create_limiter,
    parse_rate,
    rate_limit_headers,
)
from inferd.tenancy.limits_redis import RedisLimiter

__all__ = [
    "Limiter",
    "LimiterUnavailable",
    "MemoryLimiter",
    "QuotaDecision",
    "Rate",
    "RateDecision",
    "RedisLimiter",
    "create_limiter",
    "parse_rate",
    "rate_limit_headers",
]
