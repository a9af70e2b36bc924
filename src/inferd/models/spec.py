"""The ``model.toml`` schema: what a model is, what it takes and how it is batched.

Tabular models (``classification``, ``regression``) take rows of named features. Text models
(``text-generation``) take one string and are configured by a ``[generation]`` table; their
version folder is what the runtime reads (a ``from_pretrained`` folder), so ``artifact`` is
left out::

    runtime = "transformers"
    task = "text-generation"

    [input]
    type = "text"
    max_chars = 8192

    [generation]
    max_new_tokens = 64
    temperature = 0.0

Image classifiers (``[input] type = "image"``) take one picture per request, decoded and
prepared as the ``[image]`` table says (see docs/vision.md)::

    runtime = "torch"
    architecture = "resnet18"
    weights = "resnet18-*.pth"

    [input]
    type = "image"

    [image]
    size = 224
    resize = 256
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from inferd.errors import ModelLoadError

__all__ = [
    "BatchingSpec",
    "CacheSpec",
    "GenerationSpec",
    "ImageSpec",
    "InputSpec",
    "JobsSpec",
    "ModelSpec",
    "OutputSpec",
    "RollbackSpec",
    "ShadowSpec",
    "SplitSpec",
    "VersionsSpec",
    "load_spec",
]

_VERSION_KEY = re.compile(r"[1-9][0-9]{0,8}")
_STRICT = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class InputSpec(BaseModel):
    """What one request carries: a row of named features (``tabular``), a string (``text``) or
    a picture (``image``)."""

    model_config = _STRICT

    type: Literal["tabular", "text", "image"] = "tabular"
    """``tabular`` for classification and regression; ``text`` for text generation (the
    default when ``task = "text-generation"``); ``image`` for image classification, prepared
    as the ``[image]`` table says."""

    # An empty list rather than None for text input, so that tabular code can keep treating
    # ``features`` as a plain list; the ``tabular`` check below still requires at least one.
    features: list[str] = Field(default_factory=list)
    """Feature names, in the order the model expects them; a request sends this many numbers."""

    example: list[float] | None = None
    """One typical row, used for the warm-up batch and in the API documentation."""

    max_chars: int = Field(default=8192, ge=1, le=1_000_000)
    """Text input only: the longest prompt accepted, in characters."""

    @model_validator(mode="after")
    def _fits_its_type(self) -> InputSpec:
        if self.type in ("text", "image"):
            if self.features:
                raise ValueError(f"input.features is for tabular input; {self.type} input has none")
            if self.example is not None:
                raise ValueError(f"input.example is for tabular input; {self.type} input has none")
            if self.type == "image" and "max_chars" in self.model_fields_set:
                raise ValueError('input.max_chars is for text input (type = "text")')
            return self
        if not self.features:
            raise ValueError("input.features must name at least one feature")
        if "max_chars" in self.model_fields_set:
            raise ValueError('input.max_chars is for text input (type = "text")')
        if self.example is not None and len(self.example) != len(self.features):
            raise ValueError(
                f"input.example has {len(self.example)} values but input.features names "
                f"{len(self.features)}"
            )
        return self


class OutputSpec(BaseModel):
    """What the model answers."""

    model_config = _STRICT

    labels: list[str] | None = None
    """Class names, in the order of the model's classes (classification). Image models may
    instead have a ``labels.txt`` (one name per line) in their version folder."""

    name: str | None = None
    """ONNX only: the graph output to read. Unset: the first float tensor output of rank 2
    (classification) or of rank 1 or 2 (regression)."""

    softmax: bool = False
    """ONNX only: the output is logits; turn them into probabilities with a softmax."""


ImageFormat = Literal["jpeg", "png", "webp"]


def _all_formats() -> list[ImageFormat]:
    return ["jpeg", "png", "webp"]


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageSpec(BaseModel):
    """``[image]``: how an uploaded picture becomes the model's input, and what is accepted.

    The picture is converted to ``channels``, resized so that its shorter side is ``resize``,
    cropped to ``size`` x ``size`` around its centre, scaled to [0, 1] and normalized with
    ``mean`` and ``std`` per channel: torchvision's usual ``Resize``, ``CenterCrop``,
    ``ToTensor``, ``Normalize``.
    """

    model_config = _STRICT

    size: int = Field(default=224, ge=1, le=4096)
    """Side of the square the model sees, in pixels."""
    resize: int | None = Field(default=None, ge=1, le=8192)
    """Shorter side after resizing, before the centre crop (256 for the usual ImageNet
    preparation); unset means ``size`` (no crop beyond squaring)."""
    channels: Literal["RGB", "L"] = "RGB"
    """``RGB`` (3 channels) or ``L`` (1 channel, grayscale)."""
    mean: list[float] | None = None
    """Per-channel mean subtracted after scaling to [0, 1]; unset: ImageNet's for RGB, 0.5
    for L."""
    std: list[float] | None = None
    """Per-channel standard deviation divided by; unset: ImageNet's for RGB, 0.5 for L."""
    max_bytes: int = Field(default=8 * 1024 * 1024, ge=64)
    """Largest upload accepted (413 above)."""
    max_pixels: int = Field(default=40_000_000, ge=1)
    """Largest width x height accepted, read from the header before decoding (413 above)."""
    formats: list[ImageFormat] = Field(default_factory=_all_formats, min_length=1)
    """Accepted formats, recognized from the file's first bytes (415 for others)."""

    @model_validator(mode="after")
    def _consistent(self) -> ImageSpec:
        n = len(self.channels)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"image.{name} needs {n} values for channels = {self.channels!r}")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError("image.std values must be positive")
        if self.resize is not None and self.resize < self.size:
            raise ValueError(
                f"image.resize ({self.resize}) must be at least image.size ({self.size})"
            )
        return self

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @property
    def shorter_side(self) -> int:
        return self.resize if self.resize is not None else self.size

    @property
    def mean_values(self) -> tuple[float, ...]:
        if self.mean is not None:
            return tuple(self.mean)
        return _IMAGENET_MEAN if self.channels == "RGB" else (0.5,)

    @property
    def std_values(self) -> tuple[float, ...]:
        if self.std is not None:
            return tuple(self.std)
        return _IMAGENET_STD if self.channels == "RGB" else (0.5,)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(channels, size, size)``: one image as the model takes it."""
        return (self.n_channels, self.size, self.size)


class BatchingSpec(BaseModel):
    """Per-model overrides of the server-wide batching settings."""

    model_config = _STRICT

    max_batch_size: int | None = Field(default=None, ge=1)
    batch_window_ms: float | None = Field(default=None, ge=0)
    max_queue_size: int | None = Field(default=None, ge=1)
    concurrency: int | None = Field(default=None, ge=1, le=64)


class JobsSpec(BaseModel):
    """``[jobs]``: the model's long-running requests (``POST /v1/requests``).

    ``dedup = true`` answers a request whose model version, input and parameters match one
    that succeeded within ``dedup_ttl_seconds`` from that one's stored result, and joins a
    queued or running identical request instead of running it twice. Only for models whose
    answer depends on nothing but the request (no sampling with a temperature, no clock):
    requests of every user share the results.
    """

    model_config = _STRICT

    max_queued_requests: int | None = Field(default=None, ge=1)
    """Queued requests of this model past which a submit gets 503; unset: the server's
    ``max_queued_requests``."""
    ttl_seconds: float | None = Field(default=None, gt=0)
    """Default time a request may wait for its first attempt before it ends ``expired``;
    unset: the server's ``request_ttl_seconds``. A request's ``ttl_seconds`` or
    ``expires_at`` wins."""
    dedup: bool = False
    """Deduplicate identical requests (see above)."""
    dedup_ttl_seconds: float = Field(default=3600.0, gt=0)
    """How long a succeeded request's result answers identical ones."""


class CacheSpec(BaseModel):
    """``[cache]``: answers of the synchronous routes kept for inputs seen again (opt-in).

    An answer is kept under the version that computed it (its number and what was loaded) and
    the request's rows as decoded, so the same rows in another JSON spelling or another
    protocol hit too, and an answer is never served by another version than the one that
    computed it. Only for models whose answer depends on nothing but the input."""

    model_config = _STRICT

    max_entries: int = Field(default=10_000, ge=1, le=10_000_000)
    """Most answers kept; the least recently used go first."""
    ttl_seconds: float = Field(default=300.0, gt=0, le=30 * 86_400)
    """How long an answer is served from the cache after it was computed."""
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Most bytes of answers kept (the outputs' arrays); an answer larger than a tenth of it
    is not kept."""


class RollbackSpec(BaseModel):
    """``[split.rollback]``: take a canary out of the split when it does worse than the primary
    (the version with the largest weight) over a sliding window."""

    model_config = _STRICT

    window_seconds: float = Field(default=60.0, gt=0, le=86_400)
    """The window both versions are compared over."""
    min_requests: int = Field(default=20, ge=1)
    """Requests each version must have answered in the window before they are compared."""
    error_rate_margin: float = Field(default=0.05, ge=0, le=1)
    """Rolled back when the canary's error rate exceeds the primary's by more than this
    (0.05: five points)."""
    latency_margin: float = Field(default=0.5, ge=0)
    """Rolled back when the canary's p99 latency exceeds the primary's by more than this
    fraction of it (0.5: 50 % slower)."""


class SplitSpec(BaseModel):
    """``[split]``: weighted routing between served versions of requests that name none."""

    model_config = _STRICT

    weights: dict[int, float] = Field(
        min_length=1,
        json_schema_extra={
            "propertyNames": {"pattern": "^[1-9][0-9]{0,8}$"},
            "additionalProperties": {"type": "number", "minimum": 0},
            "not": {"additionalProperties": {"maximum": 0}},  # one weight above 0
        },
    )
    """Version -> weight (``[split.weights]`` ``"1" = 95``, ``"2" = 5``); the share of a
    version is its weight over the sum."""
    sticky_by: str | None = Field(default=None, pattern=r"^(key|header:[A-Za-z0-9_-]{1,128})$")
    """``key``: a caller's API key always gets the same version; ``header:<name>``: so does
    each value of that request header (``header:X-User``); unset: each request is drawn."""
    rollback: RollbackSpec | None = None
    """Automatic rollback of the canaries (``[split.rollback]``); unset: off."""

    @field_validator("weights", mode="before")
    @classmethod
    def _weights(cls, value: Any) -> Any:
        """Versions as decimal numbers (TOML and JSON keys are strings), weights as numbers:
        exactly what the schema says, nothing converted from other types."""
        if not isinstance(value, dict):
            return value  # pydantic says what is wrong
        weights: dict[int, float] = {}
        for key, weight in value.items():
            text = str(key) if isinstance(key, int) and not isinstance(key, bool) else key
            if not isinstance(text, str) or not _VERSION_KEY.fullmatch(text):
                raise ValueError(f"split.weights: {key!r} is not a version number")
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise ValueError(f"split.weights: the weight of version {text} is not a number")
            weights[int(text)] = float(weight)
        return weights

    @model_validator(mode="after")
    def _consistent(self) -> SplitSpec:
        for version, weight in self.weights.items():
            if version < 1:
                raise ValueError(f"split.weights: version {version} is not a version number")
            if not (weight >= 0 and math.isfinite(weight)):
                raise ValueError(f"split.weights: version {version} has weight {weight}")
        if sum(self.weights.values()) <= 0:
            raise ValueError("split.weights: at least one weight must be positive")
        return self


class ShadowSpec(BaseModel):
    """``[shadow]``: a candidate version gets a copy of a share of the requests once the
    version that answers has answered; its answers are compared, never sent."""

    model_config = _STRICT

    version: int = Field(ge=1)
    """The candidate; it must be served (``[versions]``)."""
    share: float = Field(default=1.0, ge=0, le=1)
    """Fraction of the answered requests copied to it."""
    max_pending: int = Field(default=64, ge=1)
    """Copies in flight at once; more are dropped."""
    tolerance: float = Field(default=1e-6, ge=0)
    """Regression: answers agree when they differ by at most this."""
    timeout_ms: float = Field(default=1000.0, gt=0)
    """A copy not answered in this time counts as an error of the candidate."""
    max_busy: float = Field(default=0.75, gt=0, le=1)
    """Copies are dropped while the event loop's thread was busy (its CPU time over wall time)
    more than this share of the last 100 ms: when the process runs short of CPU the shadow
    gives way before the answered requests slow down (1: never on this account)."""


class VersionsSpec(BaseModel):
    """``[versions]``: which version folders are served, and which one answers by default.

    ``policy = "latest"`` serves the ``count`` highest versions (1 by default);
    ``policy = "specific"`` serves exactly ``versions``. ``default`` is the version that
    ``/v1/models/{name}/predict`` uses; unset, the highest one served.
    """

    model_config = _STRICT

    policy: Literal["latest", "specific"] = "latest"
    """``latest``: the ``count`` highest version folders; ``specific``: the ones listed."""
    count: int = Field(default=1, ge=1, le=64)
    """``latest`` only: how many of the highest versions are served."""
    versions: list[int] = Field(default_factory=list, max_length=64)
    """``specific`` only: the version numbers served."""
    default: int | None = Field(default=None, ge=1)
    """The version answering requests that name none; unset: the highest served."""

    @model_validator(mode="after")
    def _fits_its_policy(self) -> VersionsSpec:
        if self.policy == "specific":
            if not self.versions:
                raise ValueError('versions.policy = "specific" needs versions = [1, ...]')
            if any(v < 1 for v in self.versions):
                raise ValueError("versions.versions are version folder numbers (1 or more)")
            if "count" in self.model_fields_set:
                raise ValueError('versions.count is for policy = "latest"')
            if self.default is not None and self.default not in self.versions:
                raise ValueError(
                    f"versions.default ({self.default}) is not among versions.versions "
                    f"{sorted(set(self.versions))}"
                )
        elif self.versions:
            raise ValueError('versions.versions is for policy = "specific"')
        return self

    def select(self, available: tuple[int, ...]) -> list[int]:
        """The versions to serve, ascending, out of ``available`` (sorted) on disk. A
        ``specific`` version that is not on disk stays in the list: loading it then fails
        and says so."""
        if self.policy == "specific":
            return sorted(set(self.versions))
        return list(available[-self.count :])


class GenerationSpec(BaseModel):
    """``[generation]``: defaults and limits of text generation.

    A request's ``parameters`` override ``max_new_tokens``, ``temperature``, ``top_k`` and
    ``top_p`` within these limits; its ``stop`` strings are added to the ones listed here.
    """

    model_config = _STRICT

    max_new_tokens: int = Field(default=64, ge=1)
    """Tokens generated when a request does not say."""
    max_new_tokens_limit: int = Field(default=1024, ge=1)
    """The most tokens any request may ask for."""
    temperature: float = Field(default=0.0, ge=0.0)
    """0 picks the most likely token every time (greedy); above 0 samples."""
    top_k: int = Field(default=0, ge=0)
    """Sample among the ``top_k`` most likely tokens only; 0 means no limit."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Sample among the most likely tokens whose probabilities add up to ``top_p``."""
    stop: list[str] = Field(default_factory=list, max_length=16)
    """Generation ends before the first of these strings; it is not part of the output."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: the GPU when one is available, else the CPU."""
    max_sequences: int | None = Field(default=None, ge=1, le=1024)
    """Sequences decoded together by continuous batching (the OpenAI-compatible routes);
    unset: the server's ``generation_max_sequences``."""
    max_queue: int | None = Field(default=None, ge=1)
    """Sequences that may wait for a free place in the batch before new ones are refused with
    503; unset: the server's ``generation_max_queue``."""

    @model_validator(mode="after")
    def _consistent(self) -> GenerationSpec:
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"generation.max_new_tokens ({self.max_new_tokens}) is over "
                f"generation.max_new_tokens_limit ({self.max_new_tokens_limit})"
            )
        if not math.isfinite(self.temperature):
            raise ValueError("generation.temperature must be a finite number")
        if any(not s for s in self.stop):
            raise ValueError("generation.stop strings must not be empty")
        return self


class ModelSpec(BaseModel):
    """One ``models/<name>/model.toml``."""

    model_config = _STRICT

    name: str
    runtime: Literal["sklearn", "python", "transformers", "onnx", "torch"] = "sklearn"
    """``sklearn``: a joblib artifact; ``python``: the class named by ``class``;
    ``transformers``: a causal language model and its tokenizer saved with
    ``save_pretrained`` (the default for ``task = "text-generation"``); ``onnx``: an ONNX
    graph run by ONNX Runtime; ``torch``: an image classifier (``architecture``) whose weights
    are a state dict in the version folder."""
    class_: str | None = Field(default=None, alias="class")
    """For ``runtime = "python"``: ``package.module:ClassName`` implementing the Model protocol."""
    task: Literal["classification", "regression", "text-generation"] = "classification"
    description: str = ""
    artifact: str | None = None
    """File name of the artifact inside each version folder (``model.joblib`` for sklearn;
    optional for python, whose class then gets the version folder; usually left out for
    transformers, which reads the version folder itself)."""
    input: InputSpec
    """Required for tabular tasks; text generation defaults to ``type = "text"``."""
    output: OutputSpec = OutputSpec()
    batching: BatchingSpec = BatchingSpec()
    versions: VersionsSpec = VersionsSpec()
    """Which versions are served and which is the default (``[versions]``)."""
    generation: GenerationSpec = GenerationSpec()
    """Text generation only."""
    jobs: JobsSpec = JobsSpec()
    """Long-running requests of this model (``[jobs]``): queue bound, TTL, deduplication."""
    image: ImageSpec = ImageSpec()
    """Image input only."""
    architecture: str | None = None
    """``runtime = "torch"``: the network, ``resnet18``, ``resnet34`` or ``resnet-small``
    (a narrow ResNet for small pictures, used by the digits demo)."""
    weights: str | None = None
    """``runtime = "torch"``: file name (a glob) of the state dict in the version folder;
    unset: ``<architecture>-*.pth`` (torchvision's naming, e.g. ``resnet18-f37072fd.pth``)."""
    num_classes: int | None = Field(default=None, ge=1)
    """``runtime = "torch"``: outputs of the last layer; unset: read from the weights."""
    cache: CacheSpec | None = None
    """``[cache]``: keep answers for repeated inputs (tabular and image models); unset: off."""
    split: SplitSpec | None = None
    """``[split]``: weighted routing between served versions (tabular and image models)."""
    shadow: ShadowSpec | None = None
    """``[shadow]``: copies of requests to a candidate version, compared (tabular and image)."""

    @model_validator(mode="before")
    @classmethod
    def _text_defaults(cls, data: Any) -> Any:
        # A text model needs no [input] table and no runtime line: fill in what can only be
        # right, before field validation, so that tabular specs keep their errors unchanged.
        if not isinstance(data, dict) or data.get("task") != "text-generation":
            return data
        data = dict(data)
        data.setdefault("runtime", "transformers")
        raw_input = data.get("input")
        if raw_input is None:
            data["input"] = {"type": "text"}
        elif isinstance(raw_input, dict) and "type" not in raw_input:
            data["input"] = {**raw_input, "type": "text"}
        return data

    @model_validator(mode="after")
    def _task_fits(self) -> ModelSpec:
        if self.task == "text-generation":
            if self.runtime not in ("transformers", "python"):
                raise ValueError(
                    f'task "text-generation" needs runtime "transformers" or "python", '
                    f"not {self.runtime!r}"
                )
            if self.input.type != "text":
                raise ValueError('task "text-generation" needs text input (input.type = "text")')
            if self.cache is not None:
                raise ValueError("[cache] is for tabular and image models, not text generation")
            if self.split is not None:
                raise ValueError("[split] is for tabular and image models, not text generation")
            if self.shadow is not None:
                raise ValueError("[shadow] is for tabular and image models, not text generation")
            return self
        if self.runtime == "transformers":
            raise ValueError(
                f'runtime "transformers" serves task "text-generation" only, not {self.task!r}'
            )
        if "generation" in self.model_fields_set:
            raise ValueError('[generation] is for task "text-generation" only')
        if self.input.type == "image":
            if self.task != "classification" or self.runtime not in ("torch", "onnx", "python"):
                raise ValueError(
                    'image input (input.type = "image") is for task "classification" with '
                    'runtime "torch", "onnx" or "python"'
                )
        elif "image" in self.model_fields_set:
            raise ValueError('[image] is for image input (input.type = "image")')
        elif self.runtime == "torch":
            raise ValueError('runtime "torch" serves image input only (input.type = "image")')
        elif self.input.type != "tabular":
            raise ValueError(f"task {self.task!r} needs tabular input with input.features")
        if self.runtime == "torch" and not self.architecture:
            raise ValueError('runtime "torch" needs architecture (e.g. "resnet18")')
        return self

    @property
    def takes_images(self) -> bool:
        """True for image classifiers, served by ``/v1/models/{name}/classify``."""
        return self.input.type == "image"

    @property
    def generates_text(self) -> bool:
        """True for text models, served by streaming requests instead of ``/predict``."""
        return self.task == "text-generation"

    @property
    def n_features(self) -> int:
        """Numbers in one input row (0 for text input)."""
        return len(self.input.features)

    @property
    def artifact_name(self) -> str | None:
        """The artifact file in a version folder; None when the folder itself is the artifact."""
        if self.artifact is not None:
            return self.artifact
        if self.runtime == "onnx":
            return "model.onnx"
        return "model.joblib" if self.runtime == "sklearn" else None


def load_spec(path: Path, name: str) -> ModelSpec:
    """Read and validate a ``model.toml``; every problem names the file."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(f"model {name!r}: {path} is missing") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ModelLoadError(f"model {name!r}: cannot read {path}: {exc}") from exc
    raw.setdefault("name", name)
    if raw["name"] != name:
        raise ModelLoadError(
            f"model {name!r}: {path} says name = {raw['name']!r}; it must match its folder name"
        )
    try:
        return ModelSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ModelLoadError(f"model {name!r}: invalid {path}: {problems}") from exc
