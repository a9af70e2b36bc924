"""Settings: environment (``INFERD_*``), an optional ``.env`` file and an optional TOML file.

Precedence, highest first: explicit arguments (CLI flags), environment variables, ``.env``,
the TOML file named by ``--config`` or ``INFERD_CONFIG_FILE``, then the defaults below.
Nothing is read from the environment at import time: call :meth:`Settings.load`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from inferd.db.engine import sqlite_url
from inferd.errors import ConfigError
from inferd.s3url import parse_s3_url

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Every knob of an inferd process. Field docstrings are the reference documentation."""

    model_config = SettingsConfigDict(
        env_prefix="INFERD_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        use_attribute_docstrings=True,
        validate_default=True,
    )

    # --- server -------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    """Address the HTTP server binds to."""

    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port the HTTP server listens on (0 picks a free port)."""

    grpc_port: int | None = Field(default=None, ge=1, le=65535)
    """TCP port of the Open Inference Protocol over gRPC (KServe's ``grpc_predict_v2.proto``),
    served on ``host`` by the same process and event loop as HTTP, with the same models, keys
    and limits; unset: no gRPC server."""
    processes: int = Field(default=1, ge=0, le=512)
    """Server processes sharing the listening socket, each with its own event loop, models and
    batchers (``inferd serve --processes``); 0: one per CPU this process may run on. With more
    than one, ``/metrics``, ``/health/ready`` and the admin API speak for all of them, and
    per-key limits are kept in one place (Redis when ``redis_url`` is set, else a limiter
    process of the server's own); see docs/deploy.md. ``workers`` is per process."""

    # --- models -------------------------------------------------------------------------------
    models_dir: Path = Path("models")
    """Model repository folder: ``<models_dir>/<name>/model.toml`` and ``<name>/<version>/``.
    Only this folder is ever read for artifacts, because loading an artifact runs code.
    An ``s3://bucket/prefix`` URL here sets ``model_repository`` instead, and this then reads
    as ``model_cache_dir``, the local copy the models are loaded from (docs/storage.md)."""

    model_repository: str | None = None
    """Where models are kept when not in a local folder: ``s3://bucket/prefix`` in S3 or an
    S3-compatible store. It is synced into ``model_cache_dir`` before start-up and before the
    repository is read again at run time; only changed objects are downloaded, each verified
    (size, and checksums where available). Unset: ``models_dir`` is the repository."""

    model_cache_dir: Path | None = None
    """Local copy of a remote ``model_repository``, which is what models are loaded from.
    Unset: ``<data_dir>/model-cache``."""

    s3_endpoint_url: str | None = None
    """Endpoint of an S3-compatible store (MinIO, Cloudflare R2, ...), e.g.
    ``http://127.0.0.1:9000``; path-style addressing is used with it. Unset: AWS S3.
    Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
    ``AWS_PROFILE``, an instance or pod role)."""

    s3_region: str | None = None
    """Region of the bucket. Unset: boto3's chain (``AWS_REGION``, ``~/.aws/config``)."""

    s3_timeout_seconds: float = Field(default=10.0, gt=0)
    """Connect and read timeout of each S3 call (retries follow ``AWS_MAX_ATTEMPTS``)."""

    models: list[str] | None = None
    """Names of the models to serve; unset serves every model in the repository."""

    default_model: str | None = None
    """Model that ``POST /predict`` serves; unset picks ``iris`` if present, else the first name."""

    default_vision_model: str | None = None
    """Image model that ``POST /v1/predict`` serves; unset picks the first image model served."""

    # --- runtimes -----------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where torch image models run: ``auto`` is the GPU when torch sees one, else the CPU."""

    torch_threads: int = Field(default=0, ge=0, le=256)
    """Threads torch uses for one batch on the CPU (``torch.set_num_threads``); 0 divides the
    cores among the batches a torch model runs at once (by default ``min(4, cores)`` of them,
    see ``batch_concurrency``), which on 2 cores is one thread for each of two batches."""

    onnx_intra_op_threads: int = Field(default=0, ge=0, le=256)
    """ONNX Runtime threads used inside one operator; 0 lets ONNX Runtime choose (one per
    core)."""

    onnx_inter_op_threads: int = Field(default=0, ge=0, le=256)
    """ONNX Runtime threads that run independent operators at once; 0 lets it choose."""

    # --- images -------------------------------------------------------------------------------
    image_decode_threads: int = Field(default=2, ge=1, le=64)
    """Threads that decode and prepare uploaded images, off the event loop."""

    image_url_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Hosts that image requests may name by URL (``{"url": "https://host/cat.jpg"}``);
    empty (the default) refuses images by URL. Comma-separated in the environment."""

    image_url_timeout_s: float = Field(default=5.0, gt=0)
    """Longest wait for an image fetched by URL."""

    image_request_timeout_ms: float = Field(default=5000.0, gt=0)
    """Deadline of an image classification (decoding, queue and model); past it the caller
    gets 504. Longer than ``request_timeout_ms`` because an image model's batch takes tens of
    milliseconds per image on a CPU. ``X-Request-Timeout-Ms`` may ask for less."""

    # --- model versions -----------------------------------------------------------------------
    watch_repository: bool = False
    """Poll the folders of the served models and load what changed by itself: a new version
    folder, a removed one, a rewritten artifact or ``model.toml`` (as ``POST
    /v1/admin/models/{name}/load`` would). Off: versions change only through the admin API."""

    watch_interval_seconds: float = Field(default=2.0, gt=0)
    """How often the repository is polled when ``watch_repository`` is on."""

    version_drain_seconds: float = Field(default=10.0, ge=0)
    """When a version is swapped out or unloaded, how long the requests already queued for it
    may take to finish before they are refused with a retryable 503."""

    # --- batching and admission ---------------------------------------------------------------
    max_batch_size: int = Field(default=32, ge=1)
    """Most rows the micro-batcher hands the model at once (a model.toml may override it)."""

    batch_window_ms: float = Field(default=5.0, ge=0)
    """How long a partial batch may wait for companions while another batch of the same model is
    running. An idle model takes a lone request at once; this never delays it."""

    batch_concurrency: int = Field(default=1, ge=1, le=64)
    """Batches of one model version that may run at the same time (threads). Set here, it applies
    to every model; unset, torch image models run `min(4, cores)` batches at once (see
    docs/vision.md) and the others one."""

    inline_max_us: float = Field(default=200.0, ge=0)
    """A request that finds its model idle (nothing queued, nothing running) runs on the event
    loop instead of the model's thread when the model's calls take at most this long on average
    (measured on the batches it ran in its thread): the hop to a thread and back costs more
    than such a call. 0 always uses the thread."""

    max_queue_size: int = Field(default=2000, ge=1)
    """Bound of each model version's request queue; a full queue rejects with 503."""

    shed_threshold: float = Field(default=0.8, gt=0, le=1)
    """Fraction of ``max_queue_size`` past which new requests are shed with 503."""

    fair_sharing: bool = True
    """Share each model's queue fairly between API keys (deficit round robin over the keys
    waiting, and a key holding more than its share of a queue past half its shedding mark is
    shed first), so that one key sending ten times its share does not raise the others'
    latency. Off: one queue per priority, in arrival order. Priorities (a key's, or
    ``X-Inferd-Priority`` within it) apply either way."""

    shed_wait: float = Field(default=0.0, ge=0, le=1)
    """When above 0, new requests are also shed with 503 while the oldest request in their
    model's queue has waited there more than this fraction of its time to deadline (0.25: 25 ms
    of the default 100), whatever the queue's length. Off by default: measured on a model whose
    call takes microseconds, a 503 costs the server about 60 % of an answer, and shedding on
    queue time turned answers into rejections when the process was short of CPU (see
    bench/README.md); it pays where each shed request saves real model time."""

    request_timeout_ms: float = Field(default=100.0, gt=0)
    """Deadline of a synchronous prediction; past it the caller gets 504. A client may ask for
    less (never more) with the ``X-Request-Timeout-Ms`` header."""

    generation_max_sequences: int = Field(default=16, ge=1, le=1024)
    """Text generation with continuous batching (the OpenAI-compatible routes): the most
    sequences of one model version decoded together, each step one forward pass for all of
    them; new ones join between steps. A model.toml may set ``[generation] max_sequences``."""

    generation_max_queue: int = Field(default=64, ge=1)
    """Sequences that may wait for a place in the batch of a text model version; past that,
    new requests are refused with 503 and ``Retry-After``. A model.toml may set
    ``[generation] max_queue``."""

    retry_after_s: int = Field(default=1, ge=0)
    """Value of the ``Retry-After`` header sent with 503 responses."""

    max_body_bytes: int = Field(default=1_048_576, ge=64)
    """Largest request body accepted on prediction routes; larger bodies get 413."""

    max_instances: int = Field(default=1024, ge=1)
    """Most rows in one batch-form request (``{"instances": [...]}``); more gets 413."""

    gc_freeze: bool = True
    """After the models are loaded, move every object alive then out of the garbage collector's
    view (``gc.freeze()``). A full collection of a process with scikit-learn and FastAPI loaded
    pauses it for 50-100 ms, which would turn into a burst of 504s under load."""

    gc_threshold: int = Field(default=10_000, ge=0)
    """After the models are loaded, the garbage collector's threshold for its youngest
    generation (the first value of ``gc.set_threshold``; 0 keeps Python's 700), in the API
    and in ``inferd worker`` processes. At 700, the objects a few dozen requests hold while
    they wait for their batch are enough to start a collection: under load one ran about
    every batch, a few µs of CPU per request for nothing, as those objects are freed by
    reference counting once answered (in a worker at 1,000 jobs/s, 5 % of its busy time)."""

    # --- observability ------------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level that is logged."""

    log_format: Literal["json", "console"] = "json"
    """``json``: one JSON object per line (production); ``console``: coloured text for people."""

    access_log: bool = True
    """Log one JSON line per HTTP request with the request id, status, latency, queue depth and
    batch size."""

    otel_endpoint: str | None = None
    """OpenTelemetry collector that traces are sent to over OTLP/HTTP, e.g.
    ``http://127.0.0.1:4318`` (spans go to ``<endpoint>/v1/traces``). Unset: tracing is off,
    unless the standard ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``
    names one; ``OTEL_SDK_DISABLED=true`` keeps it off. The other ``OTEL_*`` variables
    (``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``...) apply. Off, requests make no spans and
    cost nothing more (docs/tracing.md)."""

    # --- drift and prediction monitoring ------------------------------------------------------
    drift_enabled: bool = True
    """Watch what every served version is fed and answers: class counts and confidence, and
    data drift (PSI per feature and of the predictions) against the version's
    ``reference.json``. ``false``: nothing is recorded and the request path does no drift
    work at all (docs/monitoring.md)."""

    drift_window_seconds: float = Field(default=3600.0, gt=0)
    """Length of the sliding window that drift is computed over."""

    drift_buckets: int = Field(default=60, ge=1, le=3600)
    """Time buckets the window is made of; a bucket leaves the window whole, so the window
    slides by ``drift_window_seconds / drift_buckets``."""

    drift_interval_seconds: float = Field(default=1.0, gt=0)
    """How often the rows observed are binned and the drift gauges updated."""

    drift_min_rows: int = Field(default=200, ge=1)
    """Rows the window must hold before drift gauges are exported (PSI on a few rows is
    noise); the drift endpoint shows the figures before, marked ``insufficient_data``."""

    drift_max_values_per_update: int = Field(default=200_000, ge=1000)
    """Most feature values (rows x features) binned per version per update; when more rows
    arrived, a uniform random sample of them is binned. Bounds what drift costs under load.
    Class counts and confidences always count every prediction."""

    # --- storage ------------------------------------------------------------------------------
    data_dir: Path = Path(".inferd")
    """Folder for the embedded state of this process (the SQLite database by default)."""

    database_url: str | None = None
    """Where long-running requests, their events and jobs are stored. Unset: an embedded SQLite
    file ``<data_dir>/inferd.db``. Scale-out: ``postgresql+asyncpg://user:pass@host/db``."""

    redis_url: str | None = None
    """Redis for fan-out of request events across API processes (``redis://host:6379/0``).
    Unset: events are fanned out inside this process only."""

    result_cache: Literal["memory", "redis"] = "memory"
    """Where the answers of models with a ``[cache]`` table in their ``model.toml`` are kept:
    ``memory``, in each process; ``redis``, in ``redis_url``, shared by every API process (a
    lookup is one round trip; Redis down means misses, not errors). Models without ``[cache]``
    are never cached (docs/models.md)."""

    auto_migrate: bool = True
    """Bring the database schema up to date at start-up (``inferd db upgrade`` does it alone)."""

    # --- tenancy ------------------------------------------------------------------------------
    auth: Literal["auto", "required", "off"] = "auto"
    """``required``: every route but health, metrics and docs needs an API key. ``off``: no
    keys (allowed only when the server binds a loopback address). ``auto``: ``off`` on
    loopback, ``required`` anywhere else."""

    key_cache_seconds: float = Field(default=1.0, ge=0)
    """How long a verified key is trusted without looking it up again. With ``redis_url`` set,
    a revocation clears every process's cache at once; without, within this delay."""

    limits_fail_open: bool = True
    """When the limits backend (Redis) cannot be reached: ``true`` lets requests through
    (availability first, logged once per outage), ``false`` refuses them with 503."""

    limits_timeout_seconds: float = Field(default=1.0, gt=0)
    """Longest wait for the limits backend (Redis) on one request before it counts as down.
    Too short a value turns a busy server into an outage (and, failing open, lets requests
    through unlimited)."""

    anonymous_rate: str | None = None
    """Rate allowed to each client address for requests that present no API key, e.g.
    ``"20/s"`` or ``"600/m"`` (GCRA: the count is also the burst), kept in the limits backend
    (Redis when ``redis_url`` is set, so shared by every API process). It applies to every
    route but health, metrics, docs and the console's files, whether auth is off (every
    request) or required (requests refused for want of a key are counted too); past it, 429
    with ``Retry-After``. Unset: no per-address limit."""

    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Addresses or CIDR networks of the reverse proxies in front of this server (e.g.
    ``10.0.0.0/8,127.0.0.1``). A request whose TCP peer is one of them is counted under the
    address its ``X-Forwarded-For`` names (the rightmost hop that is not a trusted proxy);
    from any other peer the header is ignored. Empty (the default): the peer is the client.
    Comma-separated in the environment."""

    # --- browsers -----------------------------------------------------------------------------
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Origins whose pages may call this server from a browser (Cross-Origin Resource Sharing),
    e.g. ``https://app.example.com,https://admin.example.com``; ``*`` allows any origin.
    Preflight requests are answered for every route, the prediction routes included; API keys
    travel in headers, not cookies, so credentials mode is not allowed. Empty (the default):
    no CORS headers, and browsers refuse cross-origin calls. Comma-separated in the
    environment."""

    # --- long-running requests ----------------------------------------------------------------
    workers: int = Field(default=2, ge=0, le=256)
    """Requests this process runs at the same time with in-process workers. 0: none (an API-only
    replica; run ``inferd worker`` processes instead)."""

    lease_seconds: float = Field(default=30.0, gt=0)
    """How long a worker's claim on a job lasts without a heartbeat before another worker may
    take the job over."""

    heartbeat_seconds: float = Field(default=1.0, gt=0)
    """How often a worker extends its lease and checks for cancellation; must be well under
    ``lease_seconds``."""

    max_attempts: int = Field(default=3, ge=1, le=100)
    """Attempts a request gets before it is ``dead``."""

    retry_base_seconds: float = Field(default=1.0, ge=0)
    """First retry delay; doubles with each attempt (with jitter) up to ``retry_max_seconds``."""

    retry_max_seconds: float = Field(default=60.0, ge=0)
    """Longest retry delay."""

    poll_seconds: float = Field(default=0.5, gt=0)
    """How often an idle worker looks for queued jobs when no announcement of queued
    requests wakes it (a lost announcement, a retry whose back-off ended)."""

    claim_interval_seconds: float = Field(default=0.01, ge=0, le=1)
    """The least time between two claims of a worker whose last claim found fewer jobs than
    it had room for: the jobs queued meanwhile are then taken in one claim (one transaction)
    instead of one each. It delays a job's start by at most this much; 0: claim at once."""

    submit_interval_seconds: float = Field(default=0.004, ge=0, le=1)
    """The least time between two transactions that store submitted requests
    (``POST /v1/requests``) while submits keep coming: those submitted meanwhile are stored
    together in the next one. A submit after a pause is stored at once; under a steady flow
    it waits at most this much. Fewer, larger transactions cost the API and the database
    less (bench/README.md: ~20 % of the API's CPU at 1,000 submits/s); 0: each transaction
    starts as soon as the one before has ended."""

    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    """On SIGTERM, how long running jobs may take to finish before they are handed back to the
    queue (without burning an attempt)."""

    max_queued_requests: int = Field(default=10_000, ge=0)
    """Queued (not yet started) requests per model past which ``POST /v1/requests`` is refused
    with 503 and ``Retry-After``; nothing already accepted is dropped. A model.toml may set
    ``[jobs] max_queued_requests``. 0: no bound. On PostgreSQL, submits that
    arrive together may overshoot it by the number in flight."""

    max_queued_requests_per_key: int = Field(default=0, ge=0)
    """Queued requests one API key may have; past it a submit gets 429 with ``Retry-After``.
    0: no bound per key. Requests submitted without a key (authentication off) are not
    counted."""

    request_ttl_seconds: float = Field(default=0.0, ge=0)
    """How long a request may wait for its first attempt (or a retry) before it ends
    ``expired``, when its body gives neither ``ttl_seconds`` nor ``expires_at`` (and its
    model.toml no ``[jobs] ttl_seconds``). 0: requests wait as long as it takes."""

    expiry_interval_seconds: float = Field(default=1.0, gt=0)
    """How often each process ends the queued requests past their ``expires_at``, and
    finishes requests that joined an identical one which has ended."""

    retention_days: float = Field(default=0.0, ge=0)
    """Delete finished requests (and their events) that ended more than this many days ago.
    0: keep everything. Deletion runs in small batches (``retention_batch_size``), each
    its own short transaction, every ``retention_interval_seconds``."""

    retention_batch_size: int = Field(default=500, ge=1, le=100_000)
    """Requests deleted per transaction by retention."""

    retention_interval_seconds: float = Field(default=300.0, gt=0)
    """How often retention looks for old requests to delete."""

    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    """``inferd worker`` only: serve the worker's Prometheus metrics (``/metrics``, with
    ``inference_tokens_processed_total``, the work done) on this port of ``host``, so that
    they can be scraped and autoscaled on. 0: workers serve nothing (``inferd serve``'s own
    ``/metrics`` holds the in-process workers' figures)."""

    sse_keepalive_seconds: float = Field(default=15.0, gt=0)
    """Seconds between keep-alive comments on an idle event stream."""

    sse_retry_ms: int = Field(default=1000, ge=0)
    """The ``retry:`` hint sent to event-stream clients (reconnection delay)."""

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            names = [part.strip() for part in value.split(",") if part.strip()]
            return names or None
        return value

    @field_validator("otel_endpoint")
    @classmethod
    def _check_otel_endpoint(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if not value.startswith(("http://", "https://")):
            raise ValueError(
                f"otel_endpoint must be an http:// or https:// URL (OTLP/HTTP), got {value!r}"
            )
        return value

    @field_validator("image_url_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip().lower() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies", "cors_origins", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"invalid trusted proxy {entry!r}: expected an IP address or a CIDR "
                    "network such as 10.0.0.0/8"
                ) from None
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins_are_origins(cls, value: list[str]) -> list[str]:
        value = [origin.rstrip("/") if origin != "*" else origin for origin in value]
        for origin in value:
            if origin != "*" and (
                not origin.startswith(("http://", "https://")) or origin.count("/") != 2
            ):
                raise ValueError(
                    f"invalid CORS origin {origin!r}: expected '*' or scheme://host[:port] "
                    "with no path, such as https://app.example.com"
                )
        return value

    @model_validator(mode="before")
    @classmethod
    def _models_dir_may_be_a_bucket(cls, data: Any) -> Any:
        # ``--models-dir s3://b/p`` arrives as a Path, which folds "//" into "/".
        if isinstance(data, dict) and _is_s3(data.get("models_dir")):
            data = dict(data)
            url = "s3://" + str(data.pop("models_dir"))[len("s3:") :].lstrip("/")
            other = data.get("model_repository")
            if other is not None and str(other).rstrip("/") != url.rstrip("/"):
                raise ValueError(
                    f"models_dir ({url}) and model_repository ({other}) name different "
                    "repositories; set one of them"
                )
            data["model_repository"] = url
        return data

    @model_validator(mode="after")
    def _grpc_port_is_its_own(self) -> Settings:
        if self.grpc_port is not None and self.grpc_port == self.port:
            raise ValueError(
                f"grpc_port and port are both {self.port}; gRPC needs a port of its own"
            )
        return self

    @model_validator(mode="after")
    def _remote_repository_is_cached(self) -> Settings:
        if self.model_repository is None:
            return self
        self.model_repository = parse_s3_url(self.model_repository).url
        cache = (self.model_cache_dir or self.data_dir / "model-cache").expanduser().resolve()
        if "models_dir" in self.model_fields_set and self.models_dir.resolve() != cache:
            raise ValueError(
                f"models_dir ({self.models_dir}) and model_repository ({self.model_repository}) "
                "both name a repository; set one of them (models_dir may be the s3:// URL)"
            )
        self.model_cache_dir = cache
        self.models_dir = cache  # what the loader reads: the synced copy
        return self

    @property
    def effective_database_url(self) -> str:
        """``database_url``, or the embedded SQLite file under ``data_dir``."""
        if self.database_url:
            return self.database_url
        return sqlite_url((self.data_dir / "inferd.db").resolve())

    @property
    def auth_required(self) -> bool:
        """Whether API keys are enforced, with ``auto`` resolved from the bind address."""
        if self.auth == "auto":
            return not _is_loopback(self.host)
        return self.auth == "required"

    @model_validator(mode="after")
    def _auth_off_only_on_loopback(self) -> Settings:
        if self.auth == "off" and not _is_loopback(self.host):
            raise ValueError(
                f"auth = off is only allowed on a loopback address, not {self.host!r}: create "
                "keys with `inferd keys create` and set auth to required (or auto)"
            )
        return self

    @model_validator(mode="after")
    def _redis_cache_has_redis(self) -> Settings:
        if self.result_cache == "redis" and not self.redis_url:
            raise ValueError("result_cache = redis needs redis_url")
        return self

    @model_validator(mode="after")
    def _heartbeat_under_lease(self) -> Settings:
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be less than lease_seconds "
                f"({self.lease_seconds}), or leases expire between heartbeats"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            TomlConfigSettingsSource(settings_cls),
            file_secret_settings,
        )

    @classmethod
    def load(cls, config_file: Path | str | None = None, **overrides: Any) -> Settings:
        """Build settings from every source; ``overrides`` (CLI flags) win over all of them.

        ``config_file`` (or ``INFERD_CONFIG_FILE``) names a TOML file whose top-level keys are the
        field names above.
        """
        path = config_file or os.environ.get("INFERD_CONFIG_FILE") or None
        target: type[Settings] = cls
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist")
            config = SettingsConfigDict(**{**cls.model_config, "toml_file": path})
            target = type("Settings", (cls,), {"model_config": config, "__doc__": cls.__doc__})
        clean = {key: value for key, value in overrides.items() if value is not None}
        try:
            return target(**clean)
        except ValueError as exc:
            raise ConfigError(f"invalid settings: {exc}") from exc


def _is_s3(value: Any) -> bool:
    return isinstance(value, str | os.PathLike) and str(value).startswith("s3:/")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
