"""PyTorch image classifiers: ``runtime = "torch"``, ``[input] type = "image"``.

The version folder holds the weights as a state dict (``torch.save(model.state_dict())``),
found by the ``weights`` glob (``resnet18-*.pth`` by default for ``architecture =
"resnet18"``, which is how torchvision names its checkpoints), and optionally ``labels.txt``
(one class name per line). Nothing is downloaded, and weights are read with
``weights_only=True``: a checkpoint cannot run code.

A batch is what the batcher concatenates: float32 arrays of shape ``(n, channels, size,
size)``, already decoded and normalized (see :mod:`inferd.models.images`). ``predict`` answers
softmax probabilities, ``(n, num_classes)`` as float64.

torch comes with the ``vision`` extra; it is imported when a model loads, so the rest of
inferd works without it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from inferd.errors import ModelLoadError
from inferd.logs import get_logger
from inferd.models.base import Capabilities, FloatArray
from inferd.models.spec import ModelSpec

__all__ = ["TorchImageClassifier", "resolve_device"]

log = get_logger("inferd.models")

_MAX_ERROR_CHARS = 600


def resolve_device(torch: Any, device: str) -> str:
    """``auto`` is ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without a GPU fails."""
    has_cuda = bool(torch.cuda.is_available())
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if device == "cuda" and not has_cuda:
        raise ModelLoadError(
            "device = cuda, but torch sees no GPU (a CPU-only torch build, or no driver); "
            "set INFERD_DEVICE=auto or cpu"
        )
    return device


class TorchImageClassifier:
    """A ResNet (or another architecture of :mod:`inferd.models.resnet`) with its weights."""

    def __init__(
        self,
        spec: ModelSpec,
        version: int,
        path: Path,
        device: str = "auto",
        threads: int = 0,
        concurrency: int = 1,
    ) -> None:
        self.spec = spec
        self.version = version
        self.path = path
        self.device_setting = device
        self.threads = threads
        self.concurrency = max(1, concurrency)
        self.device: str | None = None
        self.capabilities = Capabilities(device=None)
        self.weights_file: Path | None = None
        self._torch: Any = None
        self._net: Any = None
        self._classes: list[int | str] | None = None

    @property
    def _where(self) -> str:
        return f"model {self.spec.name!r} version {self.version}"

    def load(self) -> None:
        try:
            import torch
        except ImportError:
            raise ModelLoadError(
                f'{self._where}: runtime "torch" needs PyTorch; install it with '
                "pip install 'inferd[vision]'"
            ) from None
        from inferd.models import resnet

        spec, where = self.spec, self._where
        architecture = spec.architecture or ""
        if architecture not in resnet.ARCHITECTURES:
            known = ", ".join(sorted(resnet.ARCHITECTURES))
            raise ModelLoadError(f"{where}: unknown architecture {architecture!r} (known: {known})")
        device = resolve_device(torch, self.device_setting)
        threads = self.threads
        if threads == 0 and device == "cpu":
            # The cores shared among the batches that run at once (torch's own default, one
            # thread per core for each batch, oversubscribes them).
            threads = self.threads = max(1, (os.cpu_count() or 1) // self.concurrency)
        if threads > 0 and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        self.weights_file = self._find_weights(architecture)
        state = self._read_state(torch, self.weights_file)
        labels = self._labels()
        num_classes = self._num_classes(state, labels)
        net = resnet.build(architecture, num_classes, spec.image.n_channels)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"{where}: {self.weights_file.name} does not fit architecture "
                f"{architecture!r} with {num_classes} classes and {spec.image.n_channels} input "
                f"channel(s): {_short(str(exc))}"
            ) from None
        net.eval()
        net.to(device)
        self._torch, self._net, self.device = torch, net, device
        self.capabilities = Capabilities(device=str(device))
        self._classes = list(labels) if labels is not None and spec.output.labels is None else None
        if self._classes is None:
            self._classes = list(range(num_classes))
        log.info(
            "torch model placed",
            model=spec.name,
            version=self.version,
            weights=self.weights_file.name,
            device=device,
            threads=torch.get_num_threads(),
        )

    def _find_weights(self, architecture: str) -> Path:
        if self.path.is_file():  # ``artifact`` names the weights file itself
            return self.path
        pattern = self.spec.weights or f"{architecture}-*.pth"
        matches = sorted(p for p in self.path.glob(pattern) if p.is_file())
        if not matches:
            raise ModelLoadError(
                f"{self._where}: no weights file matching {pattern!r} in {self.path} (save the "
                "state dict there, e.g. torchvision's resnet18-f37072fd.pth)"
            )
        if len(matches) > 1:
            names = ", ".join(p.name for p in matches)
            raise ModelLoadError(
                f"{self._where}: several files match {pattern!r} in {self.path} ({names}); "
                "keep one or name it in weights"
            )
        return matches[0]

    def _read_state(self, torch: Any, file: Path) -> dict[str, Any]:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt file can raise almost anything
            raise ModelLoadError(
                f"{self._where}: {file} is corrupt or not a torch state dict "
                f"({type(exc).__name__}: {_short(str(exc))})"
            ) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # a training checkpoint
        if not isinstance(state, dict) or not state:
            raise ModelLoadError(
                f"{self._where}: {file} holds a {type(state).__name__}, not a state dict "
                "(save model.state_dict())"
            )
        if all(isinstance(k, str) and k.startswith("module.") for k in state):
            state = {k[len("module.") :]: v for k, v in state.items()}  # saved from DataParallel
        return state

    def _labels(self) -> list[str] | None:
        if self.spec.output.labels is not None:
            return list(self.spec.output.labels)
        folder = self.path if self.path.is_dir() else self.path.parent
        file = folder / "labels.txt"
        if not file.is_file():
            return None
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
        return [line for line in lines if line]

    def _num_classes(self, state: dict[str, Any], labels: list[str] | None) -> int:
        fc = state.get("fc.weight")
        from_weights = int(fc.shape[0]) if fc is not None and fc.ndim == 2 else None
        declared = self.spec.num_classes
        n = declared or from_weights or (len(labels) if labels else None)
        if n is None:
            raise ModelLoadError(
                f"{self._where}: cannot tell the number of classes; set num_classes in model.toml"
            )
        if declared is not None and from_weights is not None and declared != from_weights:
            raise ModelLoadError(
                f"{self._where}: model.toml says num_classes = {declared} but the weights' "
                f"last layer has {from_weights} outputs"
            )
        if labels is not None and len(labels) != n:
            raise ModelLoadError(
                f"{self._where}: the model has {n} classes but {len(labels)} labels are given"
            )
        return n

    def predict(self, batch: FloatArray) -> FloatArray:
        torch, net = self._torch, self._net
        if net is None:
            raise RuntimeError(f"{self._where} is not loaded")
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        with torch.inference_mode():
            if self.device != "cpu":
                x = x.to(self.device, non_blocking=True)
            probabilities = torch.softmax(net(x).float(), dim=1)
        out: FloatArray = probabilities.cpu().numpy().astype(np.float64)
        return out

    def classes(self) -> list[int | str] | None:
        return self._classes

    def unload(self) -> None:
        self._net = None
        if self.device == "cuda" and self._torch is not None:
            self._torch.cuda.empty_cache()


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + " ..."
