"""Reading an app's access lines in tests."""

from __future__ import annotations

import io
from typing import Any

import orjson


def capture_access_log(app: Any) -> io.BytesIO:
    """Send ``app``'s access lines to a buffer from now on; read them with
    :func:`access_lines`."""
    sink = io.BytesIO()
    app.access_log._sink._stream = sink
    return sink


def access_lines(app: Any, sink: io.BytesIO) -> list[dict[str, Any]]:
    """The access lines written to ``sink`` so far (the noted ones are written first)."""
    app.access_log.flush()
    return [orjson.loads(line) for line in sink.getvalue().splitlines()]
