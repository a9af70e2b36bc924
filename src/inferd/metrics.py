"""Every Prometheus metric inferd exports, in one place.

Each app owns a :class:`Metrics` on its own registry, so several apps (tests) can live in one
process. Labelled children are cached by the components that use them on the hot path.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

__all__ = ["LATENCY_BUCKETS", "Deferred", "Metrics", "observe_many"]

# Millisecond-scale buckets: the interesting region is 0.5 ms .. 100 ms (the deadline).
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
    0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)
# Text generation: the first token waits for the queue and the prompt; later ones for a step.
FIRST_TOKEN_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
TOKEN_GAP_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class Deferred:
    """Increments and observations of the request path, applied to their metrics in batches.

    The request path notes values through a *slot* per metric child (:meth:`slot`: the
    ``append`` of a list, no Python function of ours per value) or, elsewhere,
    ``add(apply, value)``; the notes are applied by :meth:`fold`: every 0.1 s, before every
    collection of the registry (``/metrics``, peers), and when the HTTP middleware says so (a
    request that ends alone, or every few hundred requests). Applied one at a time between
    requests, prometheus-client's ``inc`` and ``observe`` (a lock each, a search of the buckets
    in Python) cost ~7 µs a request in a server at 50 connections. A fold applies a counter's
    notes as one increment by their sum and counts a histogram's values into its buckets
    with :func:`observe_many` (one lock per bucket touched, not two per value). Only the event
    loop's thread notes and folds.
    """

    __slots__ = ("_batch", "_pending", "_slots")

    def __init__(self, batch: int = 256) -> None:
        self._pending: list[tuple[Callable[[Any], None], Any]] = []
        # apply -> (its noted values, how a fold applies them: _OBSERVE, _INC or one by one)
        self._slots: dict[Callable[[Any], None], tuple[list[Any], str | None]] = {}
        self._batch = batch

    def slot(self, apply: Callable[[Any], None]) -> Callable[[Any], None]:
        """``note(value)``: ``apply(value)`` at the next fold. ``apply`` is a metric child's
        bound ``inc`` or ``observe`` (or any function of one value, applied value by value);
        the same ``apply`` gives the same slot."""
        slot = self._slots.get(apply)
        if slot is None:
            how = _GROUPED.get(getattr(apply, "__func__", None))
            slot = self._slots[apply] = ([], how)
        return slot[0].append

    def add(self, apply: Callable[[Any], None], value: Any) -> None:
        """``apply(value)`` at the next fold (applied at once past ``batch`` notes)."""
        pending = self._pending
        pending.append((apply, value))
        if len(pending) >= self._batch:
            self.fold()

    def fold(self) -> None:
        pending = self._pending
        if pending:
            self._pending = []
            for apply, value in pending:
                self.slot(apply)(value)
        for apply, (values, how) in list(self._slots.items()):  # (a slot may be added meanwhile)
            if not values:
                continue
            if len(values) == 1:  # (a request that ended alone): as prometheus-client does
                apply(values.pop())
                continue
            # The slot's list stays (callers hold its append); a note added meanwhile (an
            # exporter's thread collecting) lies past the part taken and is kept.
            noted = values[:]
            del values[: len(noted)]
            if how is _OBSERVE:
                observe_many(apply.__self__, noted)  # type: ignore[attr-defined]
            elif how is _INC:
                apply(sum(noted))
            else:
                for value in noted:
                    apply(value)

    async def run(self, interval: float = 0.1) -> None:
        """Fold every ``interval`` seconds, until cancelled (a process whose notes are not
        folded by a server's own timer: the worker)."""
        while True:
            await asyncio.sleep(interval)
            self.fold()

    def collect(self) -> list[Any]:
        """A collector of no family: registered first, it folds before the others collect."""
        self.fold()
        return []


_OBSERVE, _INC = "observe", "inc"
_GROUPED: dict[Any, str] = {Histogram.observe: _OBSERVE, Counter.inc: _INC}


def observe_many(histogram: Histogram, values: list[float]) -> None:
    """``histogram.observe(value)`` for each of ``values`` (a labelled child, or a histogram
    without labels), counted per bucket first: the same exposition, a lock per bucket touched
    and one for the sum instead of two per value. A NaN (in no bucket, as ``observe`` leaves
    it) is observed on its own."""
    histogram._raise_if_not_observable()  # type: ignore[no-untyped-call]
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    total = 0.0
    for value in values:
        if value != value:  # NaN: observe's own handling
            histogram.observe(value)
            continue
        total += value
        counts[bisect_left(bounds, value)] += 1
    if total or any(counts):
        histogram._sum.inc(total)
        buckets = histogram._buckets
        for i, n in enumerate(counts):
            if n:
                buckets[i].inc(n)


class Metrics:
    """The metric families of one inferd process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.deferred = Deferred()
        r.register(self.deferred)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        mv = ("model", "version")

        # The serving path: latency, batching, queue, shedding, deadlines.
        self.request_latency = Histogram(
            "inference_request_latency_seconds",
            "End-to-end latency of a prediction request, queue wait and inference included.",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "inference_batch_size",
            "Rows per batch handed to the model.",
            mv,
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_latency = Histogram(
            "inference_batch_latency_seconds",
            "Model time per batch, queue wait excluded.",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "inference_queue_depth",
            "Requests waiting in the model's queue.",
            mv,
            registry=r,
        )
        self.queue_rejections = Counter(
            "inference_queue_rejections_total",
            "Requests rejected by load shedding (reason=shed: queue past its priority's mark; "
            "reason=wait: its oldest request waited too long; reason=fair_share: the caller's "
            "key holds more than its share of the queue) or a full queue (reason=full).",
            (*mv, "reason"),
            registry=r,
        )
        self.request_timeouts = Counter(
            "inference_request_timeouts_total",
            "Requests whose deadline passed before the model answered (504).",
            mv,
            registry=r,
        )

        # Per-route HTTP traffic, prediction values and the served versions.
        self.requests = Counter(
            "inference_requests_total",
            "HTTP requests by route template, method and status code.",
            ("endpoint", "method", "status"),
            registry=r,
        )
        self.request_duration = Histogram(
            "inference_request_duration_seconds",
            "HTTP request duration by route template, as the server saw it.",
            ("endpoint", "method"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prediction_value = Histogram(
            "prediction_value_distribution",
            "Confidence of each prediction (top class probability), or the value for regressors.",
            mv,
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.model_version_info = Gauge(
            "model_version_info",
            "1 for each model version being served, with its runtime; 0 once unloaded.",
            (*mv, "runtime"),
            registry=r,
        )

        # Image classification (the names of the dashboards that came before inferd).
        self.predictions = Counter(
            "predictions_total",
            "Images classified, by model, version and outcome (status=success, or the error code).",
            (*mv, "status"),
            registry=r,
        )
        self.prediction_duration = Histogram(
            "prediction_duration_seconds",
            "Time to classify one image: decoding, queue wait and inference.",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        # Readiness and loading.
        self.model_ready = Gauge(
            "inference_model_ready",
            "1 when the model version is loaded, warmed up and taking requests.",
            mv,
            registry=r,
        )
        self.model_load_seconds = Gauge(
            "inference_model_load_seconds",
            "Seconds the last load (read, validate, warm up) of the model version took.",
            mv,
            registry=r,
        )
        self.model_load_failures = Counter(
            "inference_model_load_failures_total",
            "Failed loads of a model version.",
            mv,
            registry=r,
        )
        # Traffic management: the result cache.
        self.cache_requests = Counter(
            "inference_cache_requests_total",
            "Predictions of models with a [cache] table, by whether the answer came from the "
            "cache (hit) or from the model (miss).",
            ("model", "result"),
            registry=r,
        )
        self.cache_entries = Gauge(
            "inference_cache_entries",
            "Answers held in this process's result cache, by model (in-process cache only).",
            ("model",),
            registry=r,
        )
        self.cache_bytes = Gauge(
            "inference_cache_bytes",
            "Bytes of answers held in this process's result cache, by model (in-process only).",
            ("model",),
            registry=r,
        )
        # Traffic management: splits and their rollbacks.
        self.split_weight = Gauge(
            "inference_split_share",
            "Share of a model's requests (naming no version) that its split sends to a version.",
            mv,
            registry=r,
        )
        self.split_rollbacks = Counter(
            "inference_split_rollbacks_total",
            "Canaries taken out of a split automatically, by why (error_rate, latency).",
            (*mv, "reason"),
            registry=r,
        )
        # Traffic management: shadow traffic.
        self.shadow_requests = Counter(
            "inference_shadow_requests_total",
            "Copies of answered requests sent to a shadow version, by outcome: agree or "
            "disagree with the answer sent, error (it failed or timed out), dropped (shed "
            "under load, before any request that is answered).",
            (*mv, "result"),
            registry=r,
        )
        self.shadow_difference = Histogram(
            "inference_shadow_score_difference",
            "Largest absolute difference between the shadow's scores and the answer's.",
            mv,
            buckets=(0.0, 1e-6, 1e-4, 0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, float("inf")),
            registry=r,
        )
        self.shadow_latency = Histogram(
            "inference_shadow_latency_seconds",
            "Time a shadow version took to answer a copy (queue and model).",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Tenancy.
        self.limit_rejections = Counter(
            "inference_limit_rejections_total",
            "Requests refused by authentication (unauthorized, forbidden) or limits (rate, quota).",
            ("reason",),
            registry=r,
        )

        self.tokens_used = Counter(
            "inference_tokens_used_total",
            "Tokens charged to daily budgets, by user (rows, images or generated tokens).",
            ("user",),
            registry=r,
        )

        # Text generation with continuous batching (the OpenAI-compatible routes). The decode
        # steps themselves are inference_batch_size (sequences per step) and
        # inference_batch_latency_seconds; the waiting sequences are inference_queue_depth.
        self.generations = Counter(
            "inference_generations_total",
            "Text generations by model, version and how they ended (finish_reason: stop, "
            "length, cancelled, error).",
            (*mv, "finish_reason"),
            registry=r,
        )
        self.generated_tokens = Counter(
            "inference_generated_tokens_total",
            "Tokens generated; rate() of it is the token throughput.",
            mv,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "inference_prompt_tokens_total",
            "Prompt tokens read by text generations.",
            mv,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "inference_time_to_first_token_seconds",
            "From the request's arrival to its first generated token (queue and prompt included).",
            mv,
            buckets=FIRST_TOKEN_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "inference_inter_token_latency_seconds",
            "Time between two consecutive tokens of one generation.",
            mv,
            buckets=TOKEN_GAP_BUCKETS,
            registry=r,
        )

        # Long-running requests.
        self.jobs = Gauge(
            "inference_jobs",
            "Long-running requests by status (queued, running, succeeded, failed, cancelled, dead,"
            " expired),"
            " read from the database; the queue depth to autoscale workers on.",
            ("status",),
            registry=r,
        )
        self.job_runs = Counter(
            "inference_job_runs_total",
            "Attempts run by this process's workers, by model and outcome.",
            ("model", "outcome"),
            registry=r,
        )
        self.jobs_expired = Counter(
            "inference_jobs_expired_total",
            "Long-running requests that ended expired: not started before their expires_at.",
            ("model",),
            registry=r,
        )
        self.job_rejections = Counter(
            "inference_job_rejections_total",
            "Submits refused by the bounded queue: reason=queue_full (503, the model's "
            "max_queued_requests) or too_many_queued (429, max_queued_requests_per_key).",
            ("model", "reason"),
            registry=r,
        )
        self.jobs_deduplicated = Counter(
            "inference_jobs_deduplicated_total",
            "Submits answered by an identical request ([jobs] dedup): kind=hit (from a stored "
            "result) or join (waiting for a queued or running one).",
            ("model", "kind"),
            registry=r,
        )
        self.tokens_processed = Counter(
            "inference_tokens_processed_total",
            "Work done by the workers of this process on long-running requests, in tokens: "
            "chunks of a streaming model (a text model's generated tokens), rows of a "
            "tabular one; rate() of it is the throughput to autoscale workers on.",
            ("model",),
            registry=r,
        )
        self.requests_purged = Counter(
            "inference_requests_purged_total",
            "Finished long-running requests deleted by retention (retention_days).",
            registry=r,
        )
        self.job_seconds = Histogram(
            "inference_job_seconds",
            "Time a worker spent on one attempt of a long-running request.",
            ("model",),
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        # Data drift and prediction monitoring (inferd.monitoring). The gauges are set every
        # drift_interval_seconds, from the drift window against the version's reference.json;
        # label values come from model.toml (features, [output] labels), never from requests.
        self.feature_drift = Gauge(
            "inference_feature_drift",
            "PSI of one input feature over the drift window against the version's reference.",
            (*mv, "feature"),
            registry=r,
        )
        self.input_drift = Gauge(
            "inference_input_drift",
            "Total input drift of the version: the largest inference_feature_drift.",
            mv,
            registry=r,
        )
        self.prediction_drift = Gauge(
            "inference_prediction_drift",
            "PSI of the predicted classes (or predicted values) over the drift window against "
            "the reference's.",
            mv,
            registry=r,
        )
        self.prediction_confidence = Gauge(
            "inference_prediction_confidence",
            "Mean confidence (top-class probability) of the predictions in the drift window.",
            mv,
            registry=r,
        )
        self.reference_confidence = Gauge(
            "inference_reference_confidence",
            "Mean confidence of the model on its reference data (reference.json).",
            mv,
            registry=r,
        )
        self.drift_window_rows = Gauge(
            "inference_drift_window_rows",
            "Input rows in the drift window (sampled under load); PSI is exported from "
            "drift_min_rows on.",
            mv,
            registry=r,
        )
        self.predicted_class = Counter(
            "inference_predicted_class_total",
            "Predictions by predicted class; class is one of the labels in model.toml.",
            (*mv, "class"),
            registry=r,
        )
        self.client_disconnects = Counter(
            "inference_client_disconnects_total",
            "Prediction requests whose client went away before the answer; dropped unrun.",
            mv,
            registry=r,
        )
