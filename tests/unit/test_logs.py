"""Logging: the buffered JSON access log, and JSON lines from structlog and the stdlib."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from inferd import logs
from inferd.logs import AccessLog, configure_logging, get_logger

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
ACCESS_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


def json_lines(data: bytes) -> list[dict[str, Any]]:
    assert data.endswith(b"\n")
    return [orjson.loads(line) for line in data.splitlines()]


def parse_time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


# --- access log -----------------------------------------------------------------------------


def test_access_line_is_one_json_object_with_the_fields() -> None:
    stream = io.BytesIO()
    access = AccessLog(stream=stream)
    before = datetime.now(UTC)

    access.request(request_id="r-1", method="POST", path="/predict", status_code=200,
                   latency_ms=1.25, queue_depth=0, batch_size=3, detail=None)  # fmt: skip
    access.flush()

    [line] = json_lines(stream.getvalue())
    assert line == {
        "timestamp": line["timestamp"],
        "level": "info",
        "event": "request",
        "request_id": "r-1",
        "method": "POST",
        "path": "/predict",
        "status_code": 200,
        "latency_ms": 1.25,
        "queue_depth": 0,
        "batch_size": 3,
        "detail": None,
    }
    assert ACCESS_TIMESTAMP.match(line["timestamp"])
    stamped = parse_time(line["timestamp"])
    assert abs((stamped - before).total_seconds()) < 5


def test_a_finished_request_is_written_from_its_context_in_order() -> None:
    from inferd.serving import RequestContext

    stream = io.BytesIO()
    access = AccessLog(stream=stream)
    ctx = RequestContext("r-2", 0.0, 0.0)
    ctx.model, ctx.version, ctx.queue_depth, ctx.batch_size = "iris", "1", 4, 8
    ctx.submitted, ctx.dequeued = 1.0, 1.0025
    access.request(request_id="r-1")
    access.finished(ctx, "POST", "/predict", 200, 0.0012345)

    assert stream.getvalue() == b""  # formatted when written
    access.flush()
    first, line = json_lines(stream.getvalue())
    assert first["request_id"] == "r-1"
    assert line == {
        "timestamp": line["timestamp"],
        "level": "info",
        "event": "request",
        "request_id": "r-2",
        "method": "POST",
        "path": "/predict",
        "status_code": 200,
        "latency_ms": 1.234,
        "queue_ms": 2.5,
        "queue_depth": 4,
        "batch_size": 8,
        "model": "iris",
        "model_version": "1",
        "detail": None,
        "trace_id": None,
    }
    assert ACCESS_TIMESTAMP.match(line["timestamp"])
    assert list(line)[:4] == ["request_id", "method", "path", "status_code"]


def test_access_lines_are_buffered_until_flush() -> None:
    stream = io.BytesIO()
    access = AccessLog(stream=stream)

    access.request(request_id="a")
    access.request(request_id="b")

    assert stream.getvalue() == b""
    access.flush()
    assert [line["request_id"] for line in json_lines(stream.getvalue())] == ["a", "b"]
    access.flush()  # nothing new: nothing written twice
    assert len(json_lines(stream.getvalue())) == 2


def test_a_large_backlog_is_written_without_flush() -> None:
    stream = io.BytesIO()
    access = AccessLog(stream=stream)

    for i in range(2000):
        access.request(request_id=f"r-{i}", detail="x" * 40)

    assert stream.getvalue() != b""
    access.flush()
    assert [line["request_id"] for line in json_lines(stream.getvalue())] == [
        f"r-{i}" for i in range(2000)
    ]


def test_values_json_cannot_hold_are_written_as_text() -> None:
    stream = io.BytesIO()
    access = AccessLog(stream=stream)

    access.request(request_id="r", detail=Path("/models/iris"))
    access.flush()

    [line] = json_lines(stream.getvalue())
    assert isinstance(line["detail"], str)
    assert "/models/iris" in line["detail"]


def test_a_closed_stream_does_not_break_requests() -> None:
    stream = io.BytesIO()
    access = AccessLog(stream=stream)
    stream.close()

    access.request(request_id="r")
    access.flush()  # must not raise


@pytest.mark.parametrize(
    ("enabled", "level", "expected"),
    [
        (True, "info", True),
        (True, "debug", True),
        (True, "warning", False),
        (True, "error", False),
        (False, "info", False),
    ],
)
def test_access_log_switch(enabled: bool, level: str, expected: bool) -> None:
    assert AccessLog(stream=io.BytesIO(), enabled=enabled, level=level).enabled is expected


# --- configure_logging ----------------------------------------------------------------------


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo configure_logging: structlog's configuration and the stdlib loggers it touches."""
    monkeypatch.setattr(logs, "_default_stream", logs._default_stream)
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    names = ("uvicorn", "uvicorn.error", "uvicorn.access")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate,
                 logging.getLogger(n).disabled) for n in names}  # fmt: skip
    yield
    structlog.reset_defaults()
    root.handlers[:], level = saved_root
    root.setLevel(level)
    for name, (handlers, propagate, disabled) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.propagate = propagate
        logger.disabled = disabled


def text_stream() -> io.TextIOWrapper:
    """A text stream over bytes, like ``sys.stdout``."""
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)


def written(stream: io.TextIOWrapper) -> bytes:
    stream.flush()
    buffer = stream.buffer
    assert isinstance(buffer, io.BytesIO)
    return buffer.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_structlog_and_stdlib_records_become_json_lines() -> None:
    out = text_stream()
    configure_logging(level="info", fmt="json", stream=out)
    before = datetime.now(UTC)

    get_logger("x").info("hello", a=1)
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)

    mine, uvicorn = json_lines(written(out))
    assert mine["event"] == "hello"
    assert mine["a"] == 1
    assert mine["logger"] == "x"
    assert mine["level"] == "info"
    assert uvicorn["event"] == "Started server process [42]"
    assert uvicorn["logger"] == "uvicorn.error"
    assert uvicorn["level"] == "info"
    for line in (mine, uvicorn):
        assert ISO_UTC.match(line["timestamp"]), line["timestamp"]
        assert abs((parse_time(line["timestamp"]) - before).total_seconds()) < 5


@pytest.mark.usefixtures("restore_logging")
def test_level_filters_both_kinds_of_records() -> None:
    out = text_stream()
    configure_logging(level="warning", fmt="json", stream=out)

    get_logger("x").info("quiet")
    logging.getLogger("uvicorn.error").info("quiet too")
    get_logger("x").warning("loud", code=7)
    logging.getLogger("inferd.models").error("louder")

    lines = json_lines(written(out))
    assert [(line["event"], line["level"]) for line in lines] == [
        ("loud", "warning"),
        ("louder", "error"),
    ]


@pytest.mark.usefixtures("restore_logging")
def test_exceptions_are_rendered_into_the_line() -> None:
    out = text_stream()
    configure_logging(fmt="json", stream=out)

    try:
        raise ValueError("boom")
    except ValueError:
        get_logger("x").error("failed", exc_info=True)

    [line] = json_lines(written(out))
    assert "ValueError: boom" in line["exception"]


@pytest.mark.usefixtures("restore_logging")
def test_uvicorn_access_lines_are_silenced() -> None:
    out = text_stream()
    configure_logging(fmt="json", stream=out)

    logging.getLogger("uvicorn.access").info('127.0.0.1 - "GET / HTTP/1.1" 200')

    assert written(out) == b""


@pytest.mark.usefixtures("restore_logging")
def test_access_log_defaults_to_the_configured_stream() -> None:
    out = text_stream()
    configure_logging(fmt="json", stream=out)

    access = AccessLog()
    access.request(request_id="r-9")
    access.flush()

    [line] = json_lines(written(out))
    assert line["request_id"] == "r-9"


@pytest.mark.usefixtures("restore_logging")
def test_console_format_is_readable_text() -> None:
    out = io.StringIO()
    configure_logging(fmt="console", stream=out)

    get_logger("x").info("hello", a=1)

    text = out.getvalue()
    assert "hello" in text
    assert "a=1" in text
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(text)
