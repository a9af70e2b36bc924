"""A tiny image classifier for tests, served through the ``python`` runtime.

It calls a picture ``dark`` or ``light`` from its mean pixel value after the usual
preparation, so the answer to a black or a white upload is known without any weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BrightnessModel", "write_brightness_model"]


class BrightnessModel:
    """Two classes, ``dark`` and ``light``: the probability of ``light`` is the mean pixel."""

    def __init__(self, spec: Any, version: int, path: Path) -> None:
        self.spec = spec

    def load(self) -> None:
        pass

    def predict(self, batch: np.ndarray) -> np.ndarray:
        # Inputs are normalized with mean 0.5 and std 0.5 (grayscale): back to [0, 1].
        light = np.clip(batch.reshape(batch.shape[0], -1).mean(axis=1) * 0.5 + 0.5, 0.0, 1.0)
        return np.stack([1.0 - light, light], axis=1)

    def classes(self) -> list[int | str]:
        return [0, 1]

    def unload(self) -> None:
        pass


def write_brightness_model(root: Path, name: str = "brightness") -> Path:
    """Write ``root/name`` (version 1) as a :class:`BrightnessModel`; returns its folder."""
    folder = root / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "model.toml").write_text(
        "\n".join(
            [
                'runtime = "python"',
                'class = "tests.support.images:BrightnessModel"',
                'description = "calls a picture dark or light"',
                "[input]",
                'type = "image"',
                "[image]",
                "size = 8",
                'channels = "L"',
                "[output]",
                'labels = ["dark", "light"]',
            ]
        )
        + "\n"
    )
    return folder
