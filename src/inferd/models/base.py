"""The Model seam: what every runtime implements, and the per-row result it gives back."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from inferd.models.spec import ModelSpec

__all__ = ["FloatArray", "Model", "StreamingModel"]

FloatArray = npt.NDArray[np.float64]


@runtime_checkable
class Model(Protocol):
    """A loaded model version. ``predict`` is blocking and is only ever called off the event loop.

    For a classifier, ``predict`` takes rows of shape ``(n, n_features)`` and returns class
    probabilities of shape ``(n, n_classes)``; for a regressor, values of shape ``(n,)``.

    A model may also stream (see :class:`StreamingModel`): long-running requests then run
    through ``stream(input, parameters, should_stop)``, which yields chunks one by one, and
    ``validate_request(input, parameters)`` when present is called before a request is queued.
    Text-generation models work only this way: their ``predict`` raises.
    """

    spec: ModelSpec
    version: int

    def load(self) -> None:
        """Read the artifact and check it against the spec; raise ModelLoadError if it is wrong."""

    def predict(self, batch: FloatArray) -> FloatArray:
        """Compute one batch."""

    def classes(self) -> list[int | str] | None:
        """Class values in the order of the probability columns (classifiers), else None."""

    def unload(self) -> None:
        """Release what ``load`` took."""


@runtime_checkable
class StreamingModel(Model, Protocol):
    """A model that answers long-running requests chunk by chunk (text generation).

    ``stream`` and ``validate_request`` are blocking and are only ever called off the event loop.
    """

    def validate_request(self, input: Any, parameters: dict[str, Any]) -> None:
        """Raise :class:`inferd.errors.ValidationFailed` if ``input`` or ``parameters`` are
        wrong, so the request is refused before it is queued rather than failing later."""

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
