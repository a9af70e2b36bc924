"""User code as a model: ``runtime = "python"`` with ``class = "package.module:Class"``.

The class is constructed as ``Class(spec, version, path)`` (``path`` is the version folder, or
the artifact inside it when ``artifact`` is set) and must implement :class:`inferd.Model`'s
methods. This is how black-box models that are not scikit-learn artifacts are served.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from inferd.errors import ModelLoadError
from inferd.models.base import Capabilities, FloatArray
from inferd.models.spec import ModelSpec

__all__ = ["PythonModel"]

_REQUIRED = ("load", "predict")


class PythonModel:
    """Delegates to an instance of the user's class."""

    def __init__(self, spec: ModelSpec, version: int, path: Path) -> None:
        self.spec = spec
        self.version = version
        self.path = path
        self.capabilities = Capabilities()
        self._impl: Any = None

    def load(self) -> None:
        where = f"model {self.spec.name!r} version {self.version}"
        target = self.spec.class_
        if not target or ":" not in target:
            raise ModelLoadError(
                f'{where}: runtime "python" needs class = "package.module:ClassName" in model.toml'
            )
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelLoadError(f"{where}: cannot import {module_name!r}: {exc}") from exc
        cls = getattr(module, attr, None)
        if cls is None:
            raise ModelLoadError(f"{where}: {module_name!r} has no attribute {attr!r}")
        impl = cls(self.spec, self.version, self.path)
        missing = [m for m in _REQUIRED if not callable(getattr(impl, m, None))]
        if missing:
            raise ModelLoadError(f"{where}: {target} lacks {', '.join(missing)}()")
        impl.load()
        self._impl = impl
        # User code is duck-typed by the documented contract: read it once, here.
        self.capabilities = Capabilities(
            streams=callable(getattr(impl, "stream", None)),
            validates_requests=callable(getattr(impl, "validate_request", None)),
        )

    def predict(self, batch: FloatArray) -> FloatArray:
        result: FloatArray = self._impl.predict(batch)
        return result

    def validate_request(self, input: Any, parameters: dict[str, Any]) -> None:
        """Delegate to the user's ``validate_request`` (``capabilities.validates_requests``)."""
        self._impl.validate_request(input, parameters)

    def stream(self, input: Any, parameters: dict[str, Any], should_stop: Any) -> Any:
        """Delegate to the user's ``stream``."""
        return self._impl.stream(input, parameters, should_stop)

    def classes(self) -> list[int | str] | None:
        classes = getattr(self._impl, "classes", None)
        if callable(classes):
            value: list[int | str] | None = classes()
            return value
        labels = self.spec.output.labels
        return list(range(len(labels))) if labels else None

    def unload(self) -> None:
        unload = getattr(self._impl, "unload", None)
        if callable(unload):
            unload()
        self._impl = None
