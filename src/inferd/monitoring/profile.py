"""Build a ``reference.json`` from data: quantile bins per feature, and the model's predictions.

Used at training time (``inferd models train-demo``) and by ``inferd models profile DATA.csv``.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from inferd.errors import ValidationFailed
from inferd.monitoring.reference import (
    FORMAT,
    Bins,
    CategoricalProfile,
    ClassProfile,
    NumericProfile,
    Reference,
)

__all__ = [
    "DEFAULT_BINS",
    "build_reference",
    "profile_categorical",
    "profile_numeric",
    "profile_predictions",
    "read_csv",
]

DEFAULT_BINS = 10
"""Bins per numeric feature: cut at the deciles of the reference data."""

FloatArray = npt.NDArray[np.float64]


def profile_numeric(values: FloatArray, bins: int = DEFAULT_BINS) -> NumericProfile:
    """Cut points at the ``1/bins .. (bins-1)/bins`` quantiles (ties merged), the count of
    values in each bin, and the mean, standard deviation, min and max."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to profile")
    if bins < 2:
        raise ValueError("bins must be at least 2")
    # Rounded to 12 significant digits (6.54, not 6.540000000000001), before counting.
    cuts = [float(f"{q:.12g}") for q in np.quantile(x, np.arange(1, bins) / bins)]
    edges = np.unique(np.asarray(cuts, dtype=np.float64))
    counts = _count(Bins("numeric", edges, np.ones(len(edges) + 1)), x)
    return NumericProfile(
        edges=edges.tolist(),
        counts=counts,
        proportions=_proportions(counts),
        mean=float(x.mean()),
        std=float(x.std()),
        min=float(x.min()),
        max=float(x.max()),
    )


def profile_categorical(values: FloatArray) -> CategoricalProfile:
    """The count and share of each distinct value (a category's numeric code)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to profile")
    categories, counts = np.unique(x, return_counts=True)
    if len(categories) > 999:
        raise ValueError(
            f"{len(categories)} distinct values is too many for a categorical feature (999 at most)"
        )
    counted = [int(c) for c in counts]
    return CategoricalProfile(
        kind="categorical",
        categories=categories.tolist(),
        counts=counted,
        proportions=_proportions(counted),
    )


def profile_predictions(
    outputs: FloatArray, task: str, labels: Sequence[str] | None, bins: int = DEFAULT_BINS
) -> ClassProfile | NumericProfile:
    """A classifier's class shares and mean confidence (``outputs``: probabilities, one
    column per label), or quantile bins of a regressor's predicted values."""
    out = np.asarray(outputs, dtype=np.float64)
    if task != "classification":
        return profile_numeric(out.reshape(-1), bins)
    if out.ndim != 2 or not labels or out.shape[1] != len(labels):
        raise ValueError(
            f"a classifier's outputs must have one column per label ({len(labels or [])}), "
            f"got shape {out.shape}"
        )
    counts = np.bincount(out.argmax(axis=1), minlength=len(labels))
    counted = [int(c) for c in counts]
    return ClassProfile(
        labels=list(labels),
        counts=counted,
        proportions=_proportions(counted),
        mean_confidence=float(out.max(axis=1).mean()),
    )


def build_reference(
    rows: FloatArray,
    features: Sequence[str],
    *,
    categorical: Sequence[str] = (),
    outputs: FloatArray | None = None,
    task: str = "classification",
    labels: Sequence[str] | None = None,
    bins: int = DEFAULT_BINS,
    source: str | None = None,
) -> Reference:
    """The reference of ``rows`` (one column per name in ``features``) and, when given, of the
    model's ``outputs`` on them."""
    x = np.asarray(rows, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(features) or x.shape[0] == 0:
        raise ValueError(f"rows must be a non-empty table of {len(features)} columns")
    unknown = sorted(set(categorical) - set(features))
    if unknown:
        raise ValueError(f"categorical names no feature: {', '.join(unknown)}")
    profiles: dict[str, NumericProfile | CategoricalProfile] = {}
    for i, name in enumerate(features):
        column = x[:, i]
        profiles[name] = (
            profile_categorical(column) if name in categorical else profile_numeric(column, bins)
        )
    return Reference(
        format=FORMAT,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        source=source,
        rows=int(x.shape[0]),
        features=profiles,
        predictions=(
            profile_predictions(outputs, task, labels, bins) if outputs is not None else None
        ),
    )


def read_csv(
    path: Path,
    columns: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[str], FloatArray]:
    """The header of a CSV file (comma-separated, a header line) and its ``columns`` (all of
    them when None) as a table of numbers, in the order of ``columns``. Other columns may
    hold anything (a label column, ids) and are not read.

    ``progress(bytes_read, bytes_total)`` is called every few thousand rows. Raises
    :class:`~inferd.errors.ValidationFailed` naming the line and column of a bad value, or
    the columns the header lacks."""
    total = path.stat().st_size
    read = [0]  # characters so far; a text file cannot tell() while it is iterated

    def lines(handle: Iterable[str]) -> Iterator[str]:
        for line in handle:
            read[0] += len(line)
            yield line

    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(lines(handle))
        try:
            header = [name.strip() for name in next(reader)]
        except StopIteration:
            raise ValidationFailed(f"{path} is empty; expected a header line") from None
        if len(set(header)) != len(header) or not all(header):
            raise ValidationFailed(f"{path}: the header must name each column once")
        wanted = list(columns) if columns is not None else header
        missing = [name for name in wanted if name not in header]
        if missing:
            raise ValidationFailed(
                f"{path}: the header has no column {', '.join(missing)} "
                f"(it has {', '.join(header)})"
            )
        at = [header.index(name) for name in wanted]
        rows: list[list[float]] = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise ValidationFailed(
                    f"{path} line {reader.line_num}: {len(row)} values; the header names "
                    f"{len(header)}"
                )
            rows.append(_numbers([row[i] for i in at], wanted, path, reader.line_num))
            if progress is not None and len(rows) % 4096 == 0:
                progress(min(read[0], total), total)
    if not rows:
        raise ValidationFailed(f"{path} has a header but no rows")
    if progress is not None:
        progress(total, total)
    return header, np.asarray(rows, dtype=np.float64).reshape(len(rows), len(wanted))


def _numbers(row: list[str], names: list[str], path: Path, line: int) -> list[float]:
    values = []
    for name, cell in zip(names, row, strict=True):
        try:
            value = float(cell)
        except ValueError:
            raise ValidationFailed(
                f"{path} line {line}, column {name}: {cell!r} is not a number"
            ) from None
        if not math.isfinite(value):
            raise ValidationFailed(f"{path} line {line}, column {name}: {cell!r} is not finite")
        values.append(value)
    return values


def _count(bins: Bins, values: FloatArray) -> list[int]:
    return [int(c) for c in np.bincount(bins.index(values), minlength=bins.size)]


def _proportions(counts: list[int]) -> list[float]:
    total = sum(counts)
    return [c / total for c in counts]
