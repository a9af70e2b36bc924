"""inferd: serve machine-learning models over HTTP with tail-latency control."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "create_app"]


def __getattr__(name: str) -> object:
    # Lazy, so `import inferd` (the CLI's start-up) does not pull in FastAPI and numpy.
    if name == "create_app":
        from inferd.app import create_app

        return create_app
    raise AttributeError(name)
