"""Traffic splits between the served versions of a model, and automatic rollback of canaries.

A split (``[split]`` in ``model.toml``, or set at run time through the admin API, which wins
until it is cleared) shares the requests that name no version between versions by weight.
:meth:`Traffic.route` picks the version of one request:

* ``X-Inferd-Variant: <version>`` pins it (404 when that version is not served);
* ``sticky_by = "key"``: the caller's API key always lands on the same version, and
  ``sticky_by = "header:X-User"`` each value of that header (a stable hash of it, so every API
  process agrees); without one, each request is drawn at random;
* a version that is not served (still loading, unloaded) is skipped: the request goes to the
  model's default version instead, never to an error.

A split is one immutable :class:`Split` replaced whole, so a change under load never leaves a
request half-routed.

Rollback (``[split.rollback]``)
    Every routed request's outcome (latency, and whether it failed with a 5xx) is kept per
    version over ``window_seconds``. Once the primary (the largest weight) and a canary have
    each answered ``min_requests`` in the window, a canary whose error rate exceeds the
    primary's by more than ``error_rate_margin``, or whose p99 exceeds the primary's by more
    than ``latency_margin`` of it, gets weight 0: a warning says why, and
    ``inference_split_rollbacks_total{model, version, reason}`` counts it.
"""

from __future__ import annotations

import random
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from inferd.errors import BadRequest, InferdError, ModelNotFound
from inferd.logs import get_logger
from inferd.metrics import Metrics
from inferd.models.registry import LoadedModel, ModelRegistry
from inferd.models.spec import RollbackSpec, SplitSpec
from inferd.serving.context import ClientGone, RequestContext

__all__ = ["Split", "Traffic"]

log = get_logger("inferd.traffic")

R = TypeVar("R")
_VARIANT = b"x-inferd-variant"
_MAX_SAMPLES = 20_000  # per version and window: bounds memory and the p99's sort


@dataclass(frozen=True, eq=False)
class Split:
    """One model's split; replaced whole, never changed in place."""

    weights: dict[int, float]
    sticky_by: str | None = None
    rollback: RollbackSpec | None = None
    source: Literal["model.toml", "admin"] = "model.toml"
    rolled_back: dict[int, str] = field(default_factory=dict)
    """Versions taken out by the rollback, and why."""
    _table: tuple[tuple[float, int], ...] = field(default=(), init=False, repr=False)
    _header: bytes | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        live = {v: w for v, w in sorted(self.weights.items()) if w > 0}
        total = sum(live.values())
        table, running = [], 0.0
        for version, weight in live.items():
            running += weight / total
            table.append((running, version))
        if table:
            table[-1] = (1.0, table[-1][1])
        object.__setattr__(self, "_table", tuple(table))
        sticky = self.sticky_by
        if sticky is not None and sticky.startswith("header:"):
            header = sticky.partition(":")[2].strip().lower().encode()
            object.__setattr__(self, "_header", header)

    @classmethod
    def of(cls, spec: SplitSpec, source: Literal["model.toml", "admin"]) -> Split:
        return cls(dict(spec.weights), spec.sticky_by, spec.rollback, source)

    def pick(self, fraction: float) -> int | None:
        """The version at ``fraction`` (in [0, 1)) of the cumulative weights."""
        for bound, version in self._table:
            if fraction < bound:
                return version
        return self._table[-1][1] if self._table else None

    @property
    def primary(self) -> int:
        return max(self.weights.items(), key=lambda item: (item[1], -item[0]))[0]

    def describe(self) -> dict[str, Any]:
        total = sum(self.weights.values()) or 1.0
        return {
            "weights": {str(v): w for v, w in sorted(self.weights.items())},
            "shares": {str(v): round(w / total, 6) for v, w in sorted(self.weights.items())},
            "sticky_by": self.sticky_by,
            "source": self.source,
            "primary": str(self.primary),
            "rollback": self.rollback.model_dump() if self.rollback is not None else None,
            "rolled_back": {str(v): why for v, why in self.rolled_back.items()},
        }


class _Window:
    """Outcomes of one version over the rollback window: (time, seconds, failed)."""

    __slots__ = ("samples",)

    def __init__(self) -> None:
        self.samples: deque[tuple[float, float, bool]] = deque(maxlen=_MAX_SAMPLES)

    def trim(self, since: float) -> None:
        samples = self.samples
        while samples and samples[0][0] < since:
            samples.popleft()

    def figures(self) -> tuple[int, float, float]:
        """(requests, error rate, p99 seconds) of what the window holds."""
        n = len(self.samples)
        if n == 0:
            return 0, 0.0, 0.0
        failed = sum(1 for s in self.samples if s[2])
        latencies = sorted(s[1] for s in self.samples)
        p99 = latencies[min(n - 1, int(0.99 * n))]
        return n, failed / n, p99


class Traffic:
    """The splits of every model, and the rollback watch (see the module's docstring)."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.overrides: dict[str, Split] = {}
        """Splits set at run time (admin API), by model; they win over model.toml's."""
        self._from_spec: dict[str, tuple[SplitSpec, Split]] = {}
        self._windows: dict[tuple[str, int], _Window] = {}
        self._checked: dict[str, float] = {}
        self._clock = clock
        self._random = random.random

    # ------------------------------------------------------------------ splits
    def split_of(self, name: str) -> Split | None:
        """The split in force for ``name``: the admin API's, else model.toml's."""
        split = self.overrides.get(name)
        if split is not None:
            return split
        loaded = self.registry.find(name)
        spec = loaded.entry.spec.split if loaded is not None else None
        if spec is None:
            return None
        known = self._from_spec.get(name)
        if known is None or known[0] is not spec:
            known = self._from_spec[name] = (spec, Split.of(spec, "model.toml"))
            self._gauge(name, known[1])
        return known[1]

    def set(self, name: str, spec: SplitSpec) -> Split:
        """Put ``spec`` in force for ``name`` (every version it names must be served)."""
        served = {loaded.version for loaded in self.registry.versions(name)}
        if not served:
            self.registry.get(name)  # the registry's 404 or 503
        missing = sorted(v for v, w in spec.weights.items() if v not in served and w > 0)
        if missing:
            listed = ", ".join(str(v) for v in sorted(served))
            raise ModelNotFound(
                f"model {name!r} does not serve version {', '.join(map(str, missing))} "
                f"(served: {listed}); load it first"
            )
        split = self.overrides[name] = Split.of(spec, "admin")
        self._reset(name)
        self._gauge(name, split)
        log.info("split set", model=name, weights=split.describe()["weights"])
        return split

    def clear(self, name: str) -> Split | None:
        """Drop the run-time split of ``name``; model.toml's (if any) is in force again."""
        self.overrides.pop(name, None)
        self._from_spec.pop(name, None)
        self._reset(name)
        split = self.split_of(name)
        self._gauge(name, split)
        return split

    def _reset(self, name: str) -> None:
        for key in [k for k in self._windows if k[0] == name]:
            del self._windows[key]

    def _gauge(self, name: str, split: Split | None) -> None:
        if self.metrics is None:
            return
        gauge = self.metrics.split_weight
        for loaded in self.registry.versions(name):
            share = 0.0
            if split is not None:
                total = sum(split.weights.values()) or 1.0
                share = split.weights.get(loaded.version, 0.0) / total
            gauge.labels(name, loaded.version_str).set(share)

    # ------------------------------------------------------------------ routing
    def route(self, loaded: LoadedModel, ctx: RequestContext) -> tuple[LoadedModel, Split | None]:
        """The version that serves a request for ``loaded``'s model naming no version."""
        name = loaded.name
        split = self.overrides.get(name) or self.split_of(name)
        if split is None:
            return loaded, None
        pin = sticky = None
        header = split._header
        for key, value in ctx.headers or ():
            if key == _VARIANT:
                pin = value
            elif key == header:
                sticky = value
        if pin is not None:
            try:
                pinned = int(pin)
            except ValueError:
                raise BadRequest(
                    f"X-Inferd-Variant must be a version number, got {pin.decode('latin-1')!r}"
                ) from None
            return self.registry.get(name, pinned), None  # pinned: not a split's sample
        if split.sticky_by == "key" and ctx.key is not None:
            sticky = str(ctx.key.id).encode()
        if sticky is not None:
            fraction = zlib.crc32(sticky, zlib.crc32(name.encode())) / 4294967296.0
        else:
            fraction = self._random()
        picked = split.pick(fraction)
        if picked is None or picked == loaded.version:
            return loaded, split
        try:
            return self.registry.get(name, picked), split
        except InferdError:
            return loaded, split  # not served (now): the default answers

    async def serve(
        self,
        loaded: LoadedModel,
        ctx: RequestContext,
        run: Callable[[LoadedModel], Awaitable[R]],
    ) -> R:
        """``run`` the request on the version :meth:`route` picks, watching the outcome when
        the split has a rollback."""
        chosen, split = self.route(loaded, ctx)
        if split is None or split.rollback is None:
            return await run(chosen)
        started = time.perf_counter()
        try:
            result = await run(chosen)
        except ClientGone:
            raise
        except InferdError as error:
            if error.status_code >= 500:
                self.observe(chosen.name, chosen.version, time.perf_counter() - started, True)
            raise
        except Exception:
            self.observe(chosen.name, chosen.version, time.perf_counter() - started, True)
            raise
        self.observe(chosen.name, chosen.version, time.perf_counter() - started, False)
        return result

    # ------------------------------------------------------------------ rollback
    def observe(self, name: str, version: int, seconds: float, failed: bool) -> None:
        """Count one routed request's outcome, and check the canaries now and then."""
        now = self._clock()
        window = self._windows.get((name, version))
        if window is None:
            window = self._windows[(name, version)] = _Window()
        window.samples.append((now, seconds, failed))
        if now - self._checked.get(name, 0.0) >= 0.05:
            self._checked[name] = now
            self.check(name)

    def check(self, name: str) -> list[int]:
        """Take out of ``name``'s split the canaries doing worse than its primary; the
        versions taken out."""
        split = self.overrides.get(name) or self.split_of(name)
        if split is None or split.rollback is None:
            return []
        rule = split.rollback
        since = self._clock() - rule.window_seconds
        primary = split.primary
        base = self._windows.get((name, primary))
        if base is None:
            return []
        base.trim(since)
        n_base, errors_base, p99_base = base.figures()
        if n_base < rule.min_requests:
            return []
        removed: dict[int, str] = {}
        for version, weight in split.weights.items():
            window = self._windows.get((name, version))
            if version == primary or weight <= 0 or window is None:
                continue
            window.trim(since)
            n, errors, p99 = window.figures()
            if n < rule.min_requests:
                continue
            if errors > errors_base + rule.error_rate_margin:
                removed[version] = (
                    f"error rate {errors:.1%} vs {errors_base:.1%} of version {primary} over "
                    f"{n} and {n_base} requests (margin {rule.error_rate_margin:.1%})"
                )
                reason = "error_rate"
            elif p99 > p99_base * (1.0 + rule.latency_margin):
                removed[version] = (
                    f"p99 {p99 * 1000:.1f} ms vs {p99_base * 1000:.1f} ms of version {primary} "
                    f"over {n} and {n_base} requests (margin {rule.latency_margin:.0%})"
                )
                reason = "latency"
            else:
                continue
            if self.metrics is not None:
                self.metrics.split_rollbacks.labels(name, str(version), reason).inc()
            log.warning(
                "canary rolled back",
                model=name,
                version=version,
                primary=primary,
                reason=reason,
                detail=removed[version],
            )
        if not removed:
            return []
        weights = {v: (0.0 if v in removed else w) for v, w in split.weights.items()}
        rolled = Split(
            weights,
            split.sticky_by,
            split.rollback,
            "admin",
            {**split.rolled_back, **removed},
        )
        self.overrides[name] = rolled
        self._gauge(name, rolled)
        for version in removed:
            self._windows.pop((name, version), None)
        return sorted(removed)
