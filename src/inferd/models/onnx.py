"""ONNX models: ``runtime = "onnx"``, ``artifact = "model.onnx"``, run by ONNX Runtime.

The graph takes one input tensor whose first axis is the batch: ``(n, n_features)`` for
tabular models, ``(n, channels, size, size)`` for image models. That axis must be dynamic
(a named dimension), or the batcher could not hand it more than one row; a fixed one is a
load error that says how to export. The input's element type (float32, float64 or float16)
is what the rows are converted to.

The answer is one output: the one named by ``[output] name``, or else the first float output
of rank 2 (classification: ``(n, n_classes)``) or of rank 1 or 2 (regression: ``(n,)`` or
``(n, 1)``). Classifiers must give probabilities; for a graph that ends in logits set
``[output] softmax = true``. Converters that add a label output and a list-of-maps
probability output (skl2onnx's ``ZipMap``) should be run with ``zipmap=False``; the label
output is not read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from inferd.errors import ModelLoadError
from inferd.models.base import Capabilities, FloatArray
from inferd.models.spec import ModelSpec

__all__ = ["OnnxModel"]

_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
}


class OnnxModel:
    """One ONNX graph in an ONNX Runtime session."""

    def __init__(
        self,
        spec: ModelSpec,
        version: int,
        path: Path,
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        device: str = "auto",
    ) -> None:
        self.spec = spec
        self.version = version
        self.path = path
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.device = device
        self.capabilities = Capabilities(device=None)
        self.input_name = ""
        self.output_name = ""
        self.providers: list[str] = []
        self._dtype: Any = np.float32
        self._session: Any = None
        self._classes: list[int | str] | None = None

    @property
    def _where(self) -> str:
        return f"model {self.spec.name!r} version {self.version}"

    def load(self) -> None:
        import onnxruntime as ort

        where = self._where
        if not self.path.is_file():
            raise ModelLoadError(f"{where}: artifact {self.path} is missing")
        options = ort.SessionOptions()
        if self.intra_op_threads:
            options.intra_op_num_threads = self.intra_op_threads
        if self.inter_op_threads:
            options.inter_op_num_threads = self.inter_op_threads
        available = ort.get_available_providers()
        wanted = ["CPUExecutionProvider"]
        if self.device != "cpu" and "CUDAExecutionProvider" in available:
            wanted.insert(0, "CUDAExecutionProvider")
        try:
            session = ort.InferenceSession(str(self.path), sess_options=options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(
                f"{where}: {self.path} is corrupt or not an ONNX model ({_first_line(exc)})"
            ) from None
        self._check_input(session)
        self._pick_output(session)
        self._session = session
        self.providers = list(session.get_providers())
        on_gpu = self.providers[0] == "CUDAExecutionProvider"
        self.capabilities = Capabilities(device="cuda" if on_gpu else "cpu")
        if self.spec.task == "classification":
            self._classes = self._find_classes(session)

    def _check_input(self, session: Any) -> None:
        where, spec = self._where, self.spec
        inputs = session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise ModelLoadError(
                f"{where}: the graph has {len(inputs)} inputs ({names}); inferd feeds one "
                "tensor whose first axis is the batch"
            )
        tensor = inputs[0]
        if tensor.type not in _DTYPES:
            raise ModelLoadError(
                f"{where}: input {tensor.name!r} is {tensor.type}; inferd feeds float, double "
                "or float16 tensors"
            )
        expected: tuple[int, ...] = (
            spec.image.input_shape if spec.takes_images else (spec.n_features,)
        )
        shape = list(tensor.shape or [])
        if len(shape) != 1 + len(expected):
            raise ModelLoadError(
                f"{where}: input {tensor.name!r} has shape {shape}; expected "
                f"[batch, {', '.join(map(str, expected))}]"
            )
        if isinstance(shape[0], int):
            raise ModelLoadError(
                f"{where}: the batch axis of input {tensor.name!r} is fixed at {shape[0]}; "
                "export the model with a dynamic first axis (torch.onnx.export's dynamic_axes, "
                "or a named dim_param) so that requests can be batched"
            )
        for got, want in zip(shape[1:], expected, strict=True):
            if isinstance(got, int) and got != want:
                raise ModelLoadError(
                    f"{where}: input {tensor.name!r} has shape {shape} but model.toml describes "
                    f"[batch, {', '.join(map(str, expected))}]"
                )
        self.input_name = tensor.name
        self._dtype = _DTYPES[tensor.type]

    def _pick_output(self, session: Any) -> None:
        where, spec = self._where, self.spec
        outputs = session.get_outputs()
        wanted = spec.output.name
        if wanted is not None:
            found = [o for o in outputs if o.name == wanted]
            if not found:
                names = ", ".join(o.name for o in outputs)
                raise ModelLoadError(f"{where}: no output named {wanted!r} (outputs: {names})")
            if found[0].type not in _DTYPES:
                raise ModelLoadError(
                    f"{where}: output {wanted!r} is {found[0].type}, not a float tensor"
                )
            self.output_name = wanted
            return
        ranks = (2,) if spec.task == "classification" else (1, 2)
        for out in outputs:
            if out.type in _DTYPES and (out.shape is None or len(out.shape) in ranks):
                self.output_name = out.name
                return
        described = ", ".join(f"{o.name} ({o.type}, {o.shape})" for o in outputs)
        raise ModelLoadError(
            f"{where}: no float output of rank {' or '.join(map(str, ranks))} among "
            f"{described}; name the one to read in [output] name"
        )

    def _find_classes(self, session: Any) -> list[int | str]:
        out = next(o for o in session.get_outputs() if o.name == self.output_name)
        n = out.shape[1] if out.shape is not None and len(out.shape) == 2 else None
        if not isinstance(n, int):
            n = int(self.predict(self._probe()).shape[1])
        labels = self.spec.output.labels
        if labels is not None and len(labels) != n:
            raise ModelLoadError(
                f"{self._where}: output {self.output_name!r} has {n} classes but model.toml "
                f"lists {len(labels)} labels"
            )
        return list(range(n))

    def _probe(self) -> FloatArray:
        spec = self.spec
        shape = (2, *spec.image.input_shape) if spec.takes_images else (2, spec.n_features)
        return np.zeros(shape, dtype=np.float64)

    def predict(self, batch: FloatArray) -> FloatArray:
        session = self._session
        if session is None:
            raise RuntimeError(f"{self._where} is not loaded")
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=self._dtype)}
        out = np.asarray(session.run([self.output_name], feed)[0], dtype=np.float64)
        if self.spec.task != "classification":
            return out.reshape(out.shape[0]) if out.ndim == 2 and out.shape[1] == 1 else out
        if self.spec.output.softmax:
            out -= out.max(axis=1, keepdims=True)
            np.exp(out, out=out)
            out /= out.sum(axis=1, keepdims=True)
        return out

    def classes(self) -> list[int | str] | None:
        return self._classes

    def unload(self) -> None:
        self._session = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]
