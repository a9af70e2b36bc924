"""``reference.json``: what a model version's inputs and predictions looked like in training.

A version folder may hold a ``reference.json`` beside its artifact. It describes each input
feature as bins with their share of the reference data (numeric features: cut points and the
share of rows in each bin; categorical features: the share of each category) and, optionally,
the model's predictions on that data (the share of each class and the mean confidence, or bins
of the predicted value for a regressor). The server compares what it serves against it (see
docs/monitoring.md for the format and the PSI it computes).

Anyone may write one (``inferd models profile`` does it from a CSV file). A missing file turns
drift off for that version; a malformed one too, with a warning that says what is wrong: drift
never stops a version from serving.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

if TYPE_CHECKING:  # inferd.models imports this module: no import back at run time
    from inferd.models.spec import ModelSpec

__all__ = [
    "FORMAT",
    "REFERENCE_FILE",
    "Bins",
    "CategoricalProfile",
    "ClassProfile",
    "LoadedReference",
    "NumericProfile",
    "Reference",
    "load_reference",
]

REFERENCE_FILE = "reference.json"
FORMAT = "inferd.reference/v1"
MAX_BINS = 1000

_STRICT = ConfigDict(extra="forbid", frozen=True)
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def _shares(counts: list[int] | None, proportions: list[float] | None, n: int, what: str) -> None:
    """Check the counts and/or proportions of ``n`` bins."""
    if counts is None and proportions is None:
        raise ValueError(f"{what}: give counts or proportions ({n} values)")
    for name, values in (("counts", counts), ("proportions", proportions)):
        if values is None:
            continue
        if len(values) != n:
            raise ValueError(f"{what}: {name} has {len(values)} values; expected {n}")
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError(f"{what}: {name} must be finite and not negative")
        if sum(values) <= 0:
            raise ValueError(f"{what}: {name} add up to 0")
    if proportions is not None and abs(sum(proportions) - 1.0) > 1e-3:
        raise ValueError(f"{what}: proportions add up to {sum(proportions):.4f}, not 1")


class NumericProfile(BaseModel):
    """A numeric feature (or a regressor's predicted value): bins between cut points.

    ``edges`` are the k interior cut points, increasing; they make k + 1 bins:
    ``(-inf, e1]``, ``(e1, e2]``, ..., ``(ek, +inf)``. ``counts`` or ``proportions`` (or both)
    give the reference data's share of each bin."""

    model_config = _STRICT

    kind: Literal["numeric"] = "numeric"
    edges: list[float] = Field(min_length=1, max_length=MAX_BINS - 1)
    counts: list[int] | None = None
    proportions: list[float] | None = None
    mean: float | None = None
    std: float | None = Field(default=None, ge=0)
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _consistent(self) -> NumericProfile:
        if any(not math.isfinite(e) for e in self.edges):
            raise ValueError("edges must be finite numbers")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("edges must be strictly increasing")
        _shares(self.counts, self.proportions, len(self.edges) + 1, "bins")
        return self


class CategoricalProfile(BaseModel):
    """A categorical feature: the share of each category (its numeric code). Values that are
    not among ``categories`` fall into an extra "other" bin, whose reference share is 0."""

    model_config = _STRICT

    kind: Literal["categorical"]
    categories: list[float] = Field(min_length=1, max_length=MAX_BINS - 1)
    counts: list[int] | None = None
    proportions: list[float] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> CategoricalProfile:
        if any(not math.isfinite(c) for c in self.categories):
            raise ValueError("categories must be finite numbers")
        if len(set(self.categories)) != len(self.categories):
            raise ValueError("categories must be distinct")
        _shares(self.counts, self.proportions, len(self.categories), "categories")
        return self


class ClassProfile(BaseModel):
    """A classifier's predictions on the reference data: the share of each predicted class
    (by label) and the mean confidence (top-class probability)."""

    model_config = _STRICT

    kind: Literal["classes"] = "classes"
    labels: list[str] = Field(min_length=1)
    counts: list[int] | None = None
    proportions: list[float] | None = None
    mean_confidence: float | None = Field(default=None, ge=0, le=1)

    @model_validator(mode="after")
    def _consistent(self) -> ClassProfile:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be distinct")
        _shares(self.counts, self.proportions, len(self.labels), "classes")
        return self


def _kind(default: str) -> Discriminator:
    """The ``kind`` tag, ``default`` when left out (a numeric feature needs none)."""

    def tag(value: Any) -> str:
        kind = value.get("kind", default) if isinstance(value, dict) else value.kind
        return str(kind)

    return Discriminator(tag)


FeatureProfile = Annotated[
    Annotated[NumericProfile, Tag("numeric")] | Annotated[CategoricalProfile, Tag("categorical")],
    _kind("numeric"),
]
PredictionProfile = Annotated[
    Annotated[NumericProfile, Tag("numeric")] | Annotated[ClassProfile, Tag("classes")],
    _kind("classes"),
]


class Reference(BaseModel):
    """The whole ``reference.json``."""

    model_config = _STRICT

    format: Literal["inferd.reference/v1"]
    created_at: str | None = None
    source: str | None = None
    """Where the data came from (a file name, "training split"...), for people."""
    rows: int | None = Field(default=None, ge=1)
    features: dict[str, FeatureProfile]
    predictions: PredictionProfile | None = None

    def dump(self) -> str:
        """The JSON text: indented, with each list of numbers or labels on one line."""
        text = json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2)
        return _FLAT_LIST.sub(lambda m: re.sub(r"(,?)\n\s*", _fold, m.group(0)), text) + "\n"


# A list holding no list or object; JSON strings hold no raw newline, so folding is safe.
_FLAT_LIST = re.compile(r"\[[^\[\]{}]*\]")


def _fold(match: re.Match[str]) -> str:
    return ", " if match.group(1) else ""


@dataclass(frozen=True, slots=True)
class Bins:
    """How values fall into the bins of one profile, and the reference's share of each bin.

    Numeric: bin ``searchsorted(edges, x, "left")``, so a value equal to a cut point belongs
    to the bin below it. Categorical: the category's position, or the last ("other") bin."""

    kind: str
    edges: FloatArray
    """Cut points (numeric) or the sorted category codes (categorical)."""
    expected: FloatArray
    """The reference's share of each bin (sums to 1)."""

    @property
    def size(self) -> int:
        return len(self.expected)

    @classmethod
    def of(cls, profile: NumericProfile | CategoricalProfile) -> Bins:
        raw = profile.proportions if profile.proportions is not None else profile.counts
        assert raw is not None  # checked by the model
        shares = np.asarray(raw, dtype=np.float64)
        shares = shares / shares.sum()
        if isinstance(profile, NumericProfile):
            return cls("numeric", np.asarray(profile.edges, dtype=np.float64), shares)
        order = np.argsort(np.asarray(profile.categories, dtype=np.float64))
        categories = np.asarray(profile.categories, dtype=np.float64)[order]
        return cls("categorical", categories, np.append(shares[order], 0.0))

    def index(self, values: FloatArray) -> IntArray:
        """The bin of each value."""
        at: IntArray = np.searchsorted(self.edges, values, side="left").astype(np.int64)
        if self.kind == "numeric":
            return at
        n = len(self.edges)
        inside = at < n
        hit = np.zeros(len(values), dtype=bool)
        hit[inside] = self.edges[at[inside]] == values[inside]
        return np.where(hit, at, n)

    def describe(self) -> list[dict[str, Any]]:
        """Each bin's bounds (numeric) or category, for people."""
        if self.kind == "numeric":
            lows: list[float | None] = [None, *self.edges.tolist()]
            highs: list[float | None] = [*self.edges.tolist(), None]
            return [{"lower": lo, "upper": hi} for lo, hi in zip(lows, highs, strict=True)]
        return [{"category": c} for c in self.edges.tolist()] + [{"category": "other"}]


@dataclass(frozen=True, slots=True)
class LoadedReference:
    """What a version found in its folder: the reference, or why drift is off for it."""

    path: Path
    reference: Reference | None
    detail: str
    """A summary of the reference, or why there is none (for the model's metadata)."""
    features: dict[str, Bins] | None = None
    """The bins of each feature, in the model's feature order."""
    predictions: Bins | None = None
    """The bins of the predictions: one per label, in the model's label order, or numeric."""
    mean_confidence: float | None = None

    @property
    def enabled(self) -> bool:
        return self.reference is not None

    def describe(self) -> dict[str, Any]:
        return {"reference": self.enabled, "path": str(self.path), "detail": self.detail}


def load_reference(path: Path, spec: ModelSpec, labels: list[str] | None) -> LoadedReference:
    """Read and check ``path`` against the model (feature names, task, labels). Blocking.

    Never raises: a missing or malformed file gives a :class:`LoadedReference` without a
    reference, whose ``detail`` says why."""
    if not path.is_file():
        return LoadedReference(
            path,
            None,
            f"no {path.name} in {path.parent}: drift detection is off for this version "
            "(write one with `inferd models profile`)",
        )
    try:
        reference = Reference.model_validate_json(path.read_bytes())
        features, predictions = _match(reference, spec, labels)
    except (OSError, ValidationError, ValueError) as exc:
        reason = _reason(exc)
        return LoadedReference(path, None, f"{path} is not usable, drift is off: {reason}")
    confidence = (
        reference.predictions.mean_confidence
        if isinstance(reference.predictions, ClassProfile)
        else None
    )
    parts = [f"{len(features)} features"]
    if reference.rows:
        parts.insert(0, f"{reference.rows} rows")
    if predictions is not None:
        parts.append("predictions")
    return LoadedReference(
        path,
        reference,
        f"{path.name}: " + ", ".join(parts),
        features,
        predictions,
        confidence,
    )


def _match(
    reference: Reference, spec: ModelSpec, labels: list[str] | None
) -> tuple[dict[str, Bins], Bins | None]:
    names = list(spec.input.features)
    given = set(reference.features)
    missing, extra = [n for n in names if n not in given], sorted(given - set(names))
    if missing or extra:
        said = []
        if missing:
            said.append("it lacks " + ", ".join(missing))
        if extra:
            said.append("model.toml has no feature " + ", ".join(extra))
        raise ValueError(
            f"its features do not match model.toml's ({'; '.join(said)}); "
            f"expected {', '.join(names) or 'none'}"
        )
    features = {name: Bins.of(reference.features[name]) for name in names}
    profile = reference.predictions
    if profile is None:
        return features, None
    if isinstance(profile, ClassProfile):
        if spec.task != "classification" or not labels:
            raise ValueError(f"predictions are classes but the model's task is {spec.task}")
        if set(profile.labels) != set(labels) or len(profile.labels) != len(labels):
            raise ValueError(
                f"predictions.labels ({', '.join(profile.labels)}) are not the model's labels "
                f"({', '.join(labels)})"
            )
        raw = profile.proportions if profile.proportions is not None else profile.counts
        assert raw is not None
        by_label = dict(zip(profile.labels, raw, strict=True))
        shares = np.asarray([by_label[label] for label in labels], dtype=np.float64)
        codes = np.arange(len(labels), dtype=np.float64)
        return features, Bins("classes", codes, shares / shares.sum())
    if spec.task != "regression":
        raise ValueError(
            "predictions are numeric bins, which is for a regressor; a classifier's are "
            '{"kind": "classes", "labels": [...]}'
        )
    return features, Bins.of(profile)


_KINDS = ("numeric", "categorical", "classes")  # the union's tags, in pydantic's error paths


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p not in _KINDS)
        message = str(first["msg"]).removeprefix("Value error, ")
        return f"{where}: {message}" if where else message
    return str(exc)
