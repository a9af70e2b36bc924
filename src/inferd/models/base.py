"""The Model seam: what every runtime implements, and what each one declares it can do.

Every runtime implements :class:`Model` and declares its :class:`Capabilities`; code that
serves models reads the declaration (a streaming model goes to the workers, a model that
validates requests is asked before a request is queued...) instead of probing for methods.
The optional methods a capability promises are typed by the protocols below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from inferd.models.spec import ModelSpec

__all__ = [
    "Capabilities",
    "FloatArray",
    "Model",
    "RequestValidator",
    "StreamingModel",
    "WarmsUp",
]

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a loaded model can do beyond ``predict``, as its runtime declares it."""

    streams: bool = False
    """It answers long-running requests chunk by chunk (:class:`StreamingModel`); requests
    for it go to the workers and never to a batcher."""
    validates_requests: bool = False
    """It checks a long-running request's input and parameters before the request is queued
    (:class:`RequestValidator`)."""
    warms_up: bool = False
    """It has its own warm-up after loading (:class:`WarmsUp`) instead of a sample batch."""
    fast_path: bool = False
    """It answers through a numeric fast path verified against the library at load."""
    device: str | None = "cpu"
    """Where it computes (``cpu``, ``cuda``...); None until it knows."""


@runtime_checkable
class Model(Protocol):
    """A loaded model version. ``predict`` is blocking and is only ever called off the event loop.

    For a classifier, ``predict`` takes rows of shape ``(n, n_features)`` and returns class
    probabilities of shape ``(n, n_classes)``; for a regressor, values of shape ``(n,)``.

    A model may also stream (``capabilities.streams``, :class:`StreamingModel`): long-running
    requests then run through ``stream(input, parameters, should_stop)``, which yields chunks
    one by one. Text-generation models work only this way: their ``predict`` raises.
    """

    spec: ModelSpec
    version: int
    capabilities: Capabilities
    """Declared by the runtime; a runtime may refine it in :meth:`load` (device, fast path)."""

    def load(self) -> None:
        """Read the artifact and check it against the spec; raise ModelLoadError if it is wrong."""

    def predict(self, batch: FloatArray) -> FloatArray:
        """Compute one batch."""

    def classes(self) -> list[int | str] | None:
        """Class values in the order of the probability columns (classifiers), else None."""

    def unload(self) -> None:
        """Release what ``load`` took."""


class RequestValidator(Protocol):
    """``Capabilities.validates_requests``: blocking, only ever called off the event loop."""

    def validate_request(self, input: Any, parameters: dict[str, Any]) -> None:
        """Raise :class:`inferd.errors.ValidationFailed` if ``input`` or ``parameters`` are
        wrong, so the request is refused before it is queued rather than failing later."""


class WarmsUp(Protocol):
    """``Capabilities.warms_up``: blocking, called once after :meth:`Model.load`."""

    def warm_up(self) -> None:
        """Run the model once (a short generation) so the first request is not the slow one."""


@runtime_checkable
class StreamingModel(Model, Protocol):
    """``Capabilities.streams``: a model that answers long-running requests chunk by chunk
    (text generation). ``stream`` is blocking and only ever called off the event loop."""

    def stream(
        self,
        input: Any,
        parameters: dict[str, Any],
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[Any]:
        """Yield the answer in chunks as they are computed (text pieces for a text model).

        Invalid input or parameters raise ``ValidationFailed`` before the first chunk at the
        latest. ``should_stop`` is polled between chunks; once it returns True the stream
        ends without computing another chunk, which is how a request is cancelled.
        """
