"""Models for tests, served through the ``python`` runtime.

Each reads ``behaviour.json`` from its version folder: ``delay_s`` (per batch),
``load_delay_s``, ``fail_on`` (a first-feature value that makes the whole batch raise),
``record_to`` (a file that gets one line of first-feature values per batch).
Every batch it computes is recorded in :data:`BATCHES` under the model's name.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

BATCHES: dict[str, list[list[float]]] = {}
_LOCK = threading.Lock()


class ScriptedModel:
    """Three classes; the probabilities follow the first feature so answers are checkable."""

    def __init__(self, spec: Any, version: int, path: Path) -> None:
        self.spec = spec
        self.version = version
        self.path = path
        self.behaviour: dict[str, Any] = {}

    def load(self) -> None:
        config = self.path / "behaviour.json"
        self.behaviour = json.loads(config.read_text()) if config.is_file() else {}
        time.sleep(float(self.behaviour.get("load_delay_s", 0.0)))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        firsts = [float(v) for v in batch[:, 0]]
        with _LOCK:
            BATCHES.setdefault(self.spec.name, []).append(firsts)
            record = self.behaviour.get("record_to")
            if record:  # for models served by another process
                with open(record, "a") as out:
                    out.write(" ".join(str(v) for v in firsts) + "\n")
        fail_on = self.behaviour.get("fail_on")
        if fail_on is not None and fail_on in firsts:
            raise ValueError(f"cannot score a row whose first feature is {fail_on}")
        time.sleep(float(self.behaviour.get("delay_s", 0.0)))
        out = np.full((batch.shape[0], 3), 0.1)
        out[np.arange(batch.shape[0]), batch[:, 0].astype(int) % 3] = 0.8
        return out

    def classes(self) -> list[int | str]:
        return [0, 1, 2]

    def unload(self) -> None:
        self.behaviour = {}


def write_scripted_model(
    root: Path,
    name: str,
    version: int = 1,
    batching: dict[str, Any] | None = None,
    **behaviour: Any,
) -> Path:
    """Write ``root/name`` as a scripted model and return its version folder."""
    folder = root / name
    (folder / str(version)).mkdir(parents=True, exist_ok=True)
    lines = [
        'runtime = "python"',
        'class = "tests.support.models:ScriptedModel"',
        'description = "scripted test model"',
        "[input]",
        'features = ["a", "b", "c", "d"]',
        "example = [0.0, 0.0, 0.0, 0.0]",
        "[output]",
        'labels = ["zero", "one", "two"]',
    ]
    if batching:
        lines.append("[batching]")
        lines.extend(f"{key} = {value!r}" for key, value in batching.items())
    (folder / "model.toml").write_text("\n".join(lines) + "\n")
    (folder / str(version) / "behaviour.json").write_text(json.dumps(behaviour))
    return folder / str(version)


class ScriptedStreamer:
    """A streaming model for long-running requests.

    ``input`` is a string; the model yields ``parameters["chunks"]`` (default 3) pieces
    ``"<input>-<i>"``, sleeping ``behaviour["chunk_delay_s"]`` before each. ``input == "boom"``
    raises on every attempt; ``"flaky:N"`` raises on the first N attempts of that request
    (counted in ``behaviour["state_dir"]``). It stops between chunks when asked to.
    """

    def __init__(self, spec: Any, version: int, path: Path) -> None:
        self.spec = spec
        self.version = version
        self.path = path
        self.behaviour: dict[str, Any] = {}

    def load(self) -> None:
        config = self.path / "behaviour.json"
        self.behaviour = json.loads(config.read_text()) if config.is_file() else {}

    def predict(self, batch: np.ndarray) -> np.ndarray:
        out = np.full((batch.shape[0], 3), 0.1)
        out[:, 0] = 0.8
        return out

    def classes(self) -> list[int | str]:
        return [0, 1, 2]

    def validate_request(self, input: Any, parameters: dict[str, Any]) -> None:
        from inferd.errors import ValidationFailed

        if not isinstance(input, str):
            raise ValidationFailed("input must be a string")
        unknown = set(parameters) - {"chunks"}
        if unknown:
            raise ValidationFailed(f"unknown parameters: {', '.join(sorted(unknown))}")

    def stream(self, input: str, parameters: dict[str, Any], should_stop: Any) -> Any:
        if input == "boom":
            raise RuntimeError("the model exploded")
        if input.startswith("flaky:"):
            state = Path(self.behaviour["state_dir"]) / input.replace(":", "_")
            seen = int(state.read_text()) if state.exists() else 0
            state.write_text(str(seen + 1))
            if seen < int(input.split(":", 1)[1]):
                raise RuntimeError(f"flaky failure {seen + 1}")
        delay = float(self.behaviour.get("chunk_delay_s", 0.0))
        for i in range(int(parameters.get("chunks", 3))):
            if should_stop():
                return
            time.sleep(delay)
            if should_stop():
                return
            yield f"{input}-{i}"

    def unload(self) -> None:
        self.behaviour = {}


def write_streaming_model(root: Path, name: str = "streamer", **behaviour: Any) -> Path:
    """Write ``root/name`` as a :class:`ScriptedStreamer` and return its version folder."""
    folder = root / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "model.toml").write_text(
        "\n".join(
            [
                'runtime = "python"',
                'class = "tests.support.models:ScriptedStreamer"',
                'description = "scripted streaming test model"',
                "[input]",
                'features = ["x", "y", "z", "w"]',
                "example = [0.0, 0.0, 0.0, 0.0]",
                "[output]",
                'labels = ["a", "b", "c"]',
            ]
        )
        + "\n"
    )
    (folder / "1" / "behaviour.json").write_text(json.dumps(behaviour))
    return folder / "1"
