"""One server made of several processes: the routes that must speak for all of them.

``inferd serve --processes N`` runs N processes on one listening socket; a connection lands on
whichever process accepts it. Most routes are answered by that process alone (a prediction,
a long-running request: the store is shared). A few describe or change the whole server, and
:class:`PeerRoutes` answers them for every process: each process also listens on a Unix
socket of its own (in a folder only the server's user can open), and the process that takes
such a request asks its siblings over theirs, marking the call with the server's secret
``x-inferd-peer`` token so that the sibling answers for itself only.

``GET /metrics``
    Every process's metric families (siblings send theirs as JSON), merged
    (:func:`merge_families`) and rendered as one exposition: counters and histograms
    are summed, gauges summed or reduced as :data:`GAUGE_MODES` says, plus
    ``inference_server_processes`` and ``inference_server_processes_reporting``. Nothing is
    shared on the request path, so the hot path observes in-process values as with one process.
``GET /health/ready``
    Ready only when every process is ready (and answers), with each process's state.
``POST /v1/admin/...``
    Load, unload, default (rollback): done by every process at once. The answer is this
    process's when every process answered alike; otherwise the first failure's, with each
    process's status, so that a partial change is never reported as success.
``GET /v1/stats``
    The console's summary from every process: rates and counts summed, percentiles the
    largest of the processes' (a bound, not a merged percentile).
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from inferd.logs import get_logger

__all__ = ["GAUGE_MODES", "PEER_HEADER", "PeerRoutes", "Peers", "merge_families", "merge_stats"]

log = get_logger("inferd.http.peers")

PEER_HEADER = "x-inferd-peer"
_PEER_HEADER = PEER_HEADER.encode()

CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()
ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

GAUGE_MODES: dict[str, str] = {
    # 1 only where every process serves the version ready.
    "inference_model_ready": "min",
    # The same fact seen by every process (the repository, the shared database).
    "model_version_info": "max",
    "inference_model_load_seconds": "max",
    "inference_jobs": "max",
    # Drift is computed per process, on its share of the traffic: the worst one.
    "inference_feature_drift": "max",
    "inference_input_drift": "max",
    "inference_prediction_drift": "max",
    "inference_prediction_confidence": "min",
    "inference_reference_confidence": "max",
    "inference_drift_window_rows": "sum",
    "process_start_time_seconds": "min",
    "process_max_fds": "max",
    "python_info": "max",
}
"""How a gauge of several processes is reduced; a gauge not named is summed (queue depth,
memory, open files)."""

_REDUCE: dict[str, Callable[[float, float], float]] = {
    "sum": lambda a, b: a + b,
    "max": max,
    "min": min,
}


@dataclass
class Answer:
    """A response read whole."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Peers:
    """This process's place among the server's processes: its index, every process's Unix
    socket (``paths[index]`` is its own) and the token that marks a sibling's call."""

    index: int
    paths: list[str]
    token: str
    timeout: float = 2.0  # readiness, metrics, stats: a sibling slower than this is down
    admin_timeout: float = 600.0  # a load may take minutes

    @property
    def count(self) -> int:
        return len(self.paths)

    @property
    def siblings(self) -> list[int]:
        return [i for i in range(self.count) if i != self.index]

    async def ask(
        self,
        index: int,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes = b"",
        within: float | None = None,
    ) -> Answer:
        """One sibling's own answer to a request (HTTP/1.1 on its Unix socket, one connection
        per call: these routes are rare)."""
        async with asyncio.timeout(within or self.timeout):
            reader, writer = await asyncio.open_unix_connection(self.paths[index])
            try:
                lines = [f"{method} {path} HTTP/1.1", "host: inferd", "connection: close"]
                lines += [f"{k}: {v}" for k, v in headers.items()]
                lines += [f"{PEER_HEADER}: {self.token}", f"content-length: {len(body)}"]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
                head = await reader.readuntil(b"\r\n\r\n")
                status_line, *fields = head[:-4].split(b"\r\n")
                status = int(status_line.split(b" ", 2)[1])
                pairs = [tuple(f.split(b":", 1)) for f in fields if b":" in f]
                answer_headers = [(k.strip().lower(), v.strip()) for k, v in pairs]
                length = dict(answer_headers).get(b"content-length")
                content = (
                    await reader.readexactly(int(length))
                    if length is not None
                    else await reader.read()
                )
            finally:
                writer.close()
        return Answer(status, answer_headers, content)

    async def ask_all(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes = b"",
        within: float | None = None,
    ) -> dict[int, Answer | BaseException]:
        """Every sibling's answer, or why there is none (it is restarting, or timed out)."""
        siblings = self.siblings
        answers = await asyncio.gather(
            *(self.ask(i, method, path, headers, body, within) for i in siblings),
            return_exceptions=True,
        )
        return dict(zip(siblings, answers, strict=True))


# --------------------------------------------------------------------------- metrics


Family = tuple[str, str, str, str, list[tuple[str, dict[str, str], float]]]
"""A metric family as it crosses between processes: name, help, type, unit, samples."""


def collect(registry: CollectorRegistry) -> list[Family]:
    """A registry's families, ready for :func:`merge_families` or for JSON."""
    return [
        (m.name, m.documentation, m.type, m.unit, [(s.name, s.labels, s.value) for s in m.samples])
        for m in registry.collect()
    ]


def encode_families(families: list[Family]) -> bytes:
    return orjson.dumps(families, option=orjson.OPT_SERIALIZE_NUMPY)


def decode_families(body: bytes) -> list[Family]:
    return [
        (name, doc, kind, unit, [(n, labels, math.nan if v is None else v) for n, labels, v in ss])
        for name, doc, kind, unit, ss in orjson.loads(body)
    ]


def merge_families(processes: Iterable[list[Family]], expected: int) -> bytes:
    """Several processes' metric families as one Prometheus text exposition (see the module
    docstring)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    reporting = 0
    for one in processes:
        reporting += 1
        for name, documentation, kind, unit, samples in one:
            known = families.get(name)
            if known is None:
                known = families[name] = Metric(name, documentation, kind, unit)
                values[name] = {}
            reduce = _reducer(known)
            merged = values[name]
            for sample, labels, value in samples:
                key = (sample, tuple(sorted(labels.items())))
                before = merged.get(key)
                if before is None:
                    merged[key] = value
                elif sample.endswith("_created"):
                    merged[key] = min(before, value)
                else:
                    merged[key] = reduce(before, value)
    for name, family in families.items():
        family.samples = [
            Sample(sample, dict(labels), value) for (sample, labels), value in values[name].items()
        ]
    processes_metric = Metric(
        "inference_server_processes", "Processes of this server (--processes).", "gauge"
    )
    processes_metric.add_sample("inference_server_processes", {}, float(expected))
    answered = Metric(
        "inference_server_processes_reporting",
        "Processes whose metrics are in this scrape; fewer than inference_server_processes "
        "while one restarts.",
        "gauge",
    )
    answered.add_sample("inference_server_processes_reporting", {}, float(reporting))
    ordered = [*families.values(), processes_metric, answered]

    class _Collected:
        def collect(self) -> list[Metric]:
            return ordered

    return generate_latest(_Collected())


def _reducer(family: Metric) -> Callable[[float, float], float]:
    if family.type == "gauge":
        return _REDUCE[GAUGE_MODES.get(family.name, "sum")]
    return _REDUCE["sum"]


# --------------------------------------------------------------------------- stats

_STATS_KEEP = frozenset({"window_seconds", "time"})  # the same for every process: the first's
_STATS_MAX = frozenset({"uptime_seconds", "mean_ms", "mean_batch_size", "jobs"})


def merge_stats(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """The console summaries (``/v1/stats``) of several processes as one: counts and rates
    summed; percentiles and means the largest of the processes' (an upper bound: a window's
    histograms are not kept across processes); ``jobs`` (read from the shared database) the
    largest, as every process reads the same."""
    merged: dict[str, Any] = {}
    for answer in answers:
        _merge_into(merged, answer, "sum")
    return merged


def _merge_into(into: dict[str, Any], other: Mapping[str, Any], mode: str) -> None:
    for key, value in other.items():
        how = "max" if key in _STATS_MAX or _is_percentile(key) else mode
        before = into.get(key)
        if before is None:
            into[key] = _copy(value)
        elif isinstance(value, Mapping) and isinstance(before, dict):
            _merge_into(before, value, how)
        elif key in _STATS_KEEP or not (_is_number(value) and _is_number(before)):
            continue  # text, flags, the window: the first process's
        elif how == "max":
            into[key] = max(before, value)
        else:
            into[key] = round(before + value, 3) if isinstance(value, float) else before + value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_percentile(key: str) -> bool:
    return key.startswith("p") and key.endswith("_ms") and key[1:-3].isdigit()


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- the middleware


class PeerRoutes:
    """ASGI middleware answering the server-wide routes for every process (module docstring);
    every other request goes straight to ``app``."""

    def __init__(self, app: ASGIApp, peers: Peers, registry: CollectorRegistry) -> None:
        self.app = app
        self.peers = peers
        self.registry = registry  # this process's metrics
        self._token = peers.token.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if method == "GET" and path == "/metrics":
            handler: Any = self._metrics
        elif method == "GET" and path == "/health/ready":
            handler = self._ready
        elif method == "GET" and path == "/v1/stats":
            handler = self._stats
        elif method == "POST" and path.startswith("/v1/admin/models/"):
            handler = self._admin
        else:
            await self.app(scope, receive, send)
            return
        if self._from_peer(scope):  # a sibling asks for this process alone
            if handler == self._ready:
                await _respond(send, await self._local_ready(scope))
            elif handler == self._metrics:  # its families as JSON: no text to parse
                await _respond(send, _json(200, None, encode_families(collect(self.registry))))
            else:
                await self.app(scope, receive, send)
            return
        await handler(scope, receive, send)

    def _from_peer(self, scope: dict[str, Any]) -> bool:
        for name, value in scope["headers"]:
            if name == _PEER_HEADER:
                return bool(value == self._token)
        return False

    async def _local(self, scope: dict[str, Any], body: bytes) -> Answer:
        """This process's own answer, read whole."""
        sent = False
        answer = Answer(500, [], b"")
        chunks: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # nothing more will come: wait to be cancelled
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer.status = message["status"]
                answer.headers = list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send)
        answer.body = b"".join(chunks)
        return answer

    @staticmethod
    def _forwarded(scope: dict[str, Any]) -> dict[str, str]:
        """The caller's headers a sibling needs: its key and how it wants the answer."""
        keep = {b"authorization", b"x-api-key", b"content-type", b"accept", b"x-request-id"}
        return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in keep}

    async def _gather(
        self, scope: dict[str, Any], body: bytes = b"", within: float | None = None
    ) -> tuple[Answer, dict[int, Answer | BaseException]]:
        path = scope["path"]
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("latin-1")
        local, others = await asyncio.gather(
            self._local(scope, body),
            self.peers.ask_all(scope["method"], path, self._forwarded(scope), body, within),
        )
        return local, others

    async def _metrics(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        others = await self.peers.ask_all("GET", "/metrics", {})
        processes = [collect(self.registry)]
        for index, answer in others.items():
            if isinstance(answer, Answer) and answer.status == 200:
                processes.append(decode_families(answer.body))
            else:
                log.warning("metrics: a process did not answer", process=index, why=_why(answer))
        merged = await asyncio.to_thread(merge_families, processes, self.peers.count)
        await _respond(send, Answer(200, [(b"content-type", CONTENT_TYPE)], merged))

    async def _local_ready(self, scope: dict[str, Any]) -> Answer:
        """This process's readiness, with its process id."""
        answer = await self._local(scope, b"")
        try:
            body = answer.json()
        except orjson.JSONDecodeError:
            return answer
        body["pid"] = os.getpid()
        return _json(answer.status, body)

    async def _ready(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        local, others = await asyncio.gather(
            self._local_ready(scope),
            self.peers.ask_all("GET", "/health/ready", self._forwarded(scope)),
        )
        states: list[dict[str, Any]] = []
        body: dict[str, Any] = {}
        ready = True
        for index in range(self.peers.count):
            answer = local if index == self.peers.index else others[index]
            if isinstance(answer, Answer):
                try:
                    one = answer.json()
                except orjson.JSONDecodeError:
                    one = {"status": "not_ready"}
                if index == self.peers.index:
                    body = {k: v for k, v in one.items() if k != "pid"}
                ready = ready and answer.status == 200
                state = {
                    "process": index,
                    "pid": one.get("pid"),
                    "status": one.get("status", "not_ready"),
                }
                if "error" in one:
                    state["error"] = one["error"]
            else:
                ready = False
                state = {"process": index, "status": "unreachable", "error": _why(answer)}
            states.append(state)
        body["status"] = "ready" if ready else "not_ready"
        body["processes"] = states
        await _respond(send, _json(200 if ready else 503, body))

    async def _stats(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        local, others = await self._gather(scope)
        if local.status != 200:
            await _respond(send, local)
            return
        answers = [local.json()]
        answers += [a.json() for a in others.values() if isinstance(a, Answer) and a.status == 200]
        merged = merge_stats(answers)
        merged["processes"] = {"total": self.peers.count, "reporting": len(answers)}
        await _respond(send, _json(200, merged))

    async def _admin(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await _read_body(receive)
        local, others = await self._gather(scope, body, self.peers.admin_timeout)
        statuses = {self.peers.index: local.status}
        failure: Answer | None = None if local.status < 300 else local
        failure_why = ""
        for index, answer in sorted(others.items()):
            if isinstance(answer, Answer):
                statuses[index] = answer.status
                if failure is None and answer.status >= 300:
                    failure = answer
            else:
                statuses[index] = 0
                failure_why = failure_why or f"process {index}: {_why(answer)}"
        if len(set(statuses.values())) == 1:  # every process did the same: one answer
            await _respond(send, local)
            return
        per_process = [{"process": i, "status": s or None} for i, s in sorted(statuses.items())]
        if failure is not None:
            try:
                payload = failure.json()
            except orjson.JSONDecodeError:
                payload = {"error": {"code": "peer_failed", "message": failure.body.decode()}}
            payload["processes"] = per_process
            await _respond(send, _json(failure.status, payload))
            return
        payload = {
            "error": {
                "code": "process_unreachable",
                "message": "the change was made by some of the server's processes only ("
                + failure_why
                + "); repeat it once every process is ready",
                "retryable": True,
            },
            "processes": per_process,
        }
        await _respond(send, _json(502, payload))


def _why(answer: Answer | BaseException) -> str:
    if isinstance(answer, Answer):
        return f"status {answer.status}"
    return repr(answer)


def _json(status: int, payload: Any, body: bytes | None = None) -> Answer:
    content = body if body is not None else orjson.dumps(payload)
    return Answer(status, [(b"content-type", b"application/json")], content)


async def _read_body(receive: Any) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _respond(send: Any, answer: Answer) -> None:
    headers = [
        (k, v) for k, v in answer.headers if k.lower() not in (b"content-length", b"connection")
    ]
    headers.append((b"content-length", str(len(answer.body)).encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})
