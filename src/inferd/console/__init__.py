"""The web console at ``/console``: static pages over the public API, and ``GET /v1/stats``."""

from inferd.console.routes import build_console_router
from inferd.console.stats import Stats

__all__ = ["Stats", "build_console_router"]
