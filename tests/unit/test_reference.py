"""reference.json: what a well-formed one is, what a broken one says, and building one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inferd.errors import ValidationFailed
from inferd.models.repository import ModelRepository
from inferd.models.spec import ModelSpec
from inferd.monitoring import Reference, build_reference, load_reference, read_csv
from inferd.monitoring.reference import CategoricalProfile, ClassProfile

FEATURES = ["sepal_length_cm", "sepal_width_cm", "petal_length_cm", "petal_width_cm"]
LABELS = ["setosa", "versicolor", "virginica"]


def hand_written() -> dict[str, Any]:
    """A reference as a person writes it: proportions only, a categorical feature."""
    numeric = {"edges": [1.0, 2.0], "proportions": [0.25, 0.5, 0.25]}
    return {
        "format": "inferd.reference/v1",
        "features": {
            "sepal_length_cm": numeric,
            "sepal_width_cm": {"kind": "numeric", **numeric, "mean": 1.5, "std": 0.5},
            "petal_length_cm": numeric,
            "petal_width_cm": {"kind": "categorical", "categories": [0, 1], "counts": [3, 1]},
        },
        "predictions": {"labels": ["virginica", "setosa", "versicolor"], "counts": [1, 2, 1]},
    }


@pytest.fixture
def spec(demo_models: Path) -> ModelSpec:
    return ModelRepository(demo_models).read("iris").spec


def write(tmp_path: Path, doc: Any) -> Path:
    path = tmp_path / "reference.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_a_hand_written_reference_loads(tmp_path: Path, spec: ModelSpec) -> None:
    loaded = load_reference(write(tmp_path, hand_written()), spec, LABELS)
    assert loaded.enabled, loaded.detail
    assert loaded.detail == "reference.json: 4 features, predictions"
    assert loaded.features is not None and list(loaded.features) == FEATURES
    assert loaded.features["petal_width_cm"].expected.tolist() == [0.75, 0.25, 0.0]
    # the predictions' shares follow the model's label order, not the file's
    assert loaded.predictions is not None
    assert loaded.predictions.expected.tolist() == [0.5, 0.25, 0.25]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda d: d.pop("format"), "format: Field required"),
        (lambda d: d.update(format="v2"), "format: Input should be 'inferd.reference/v1'"),
        (lambda d: d["features"].pop("petal_width_cm"), "it lacks petal_width_cm"),
        (lambda d: d["features"].update(colour={"edges": [1], "counts": [1, 1]}),
         "model.toml has no feature colour"),
        (lambda d: d["features"]["sepal_length_cm"].update(edges=[2.0, 1.0]),
         "features.sepal_length_cm: edges must be strictly increasing"),
        (lambda d: d["features"]["sepal_length_cm"].update(proportions=[0.5, 0.5, 0.5]),
         "proportions add up to 1.5000, not 1"),
        (lambda d: d["features"]["sepal_length_cm"].update(proportions=[0.5, 0.5]),
         "proportions has 2 values; expected 3"),
        (lambda d: d["features"]["petal_width_cm"].update(counts=None),
         "give counts or proportions (2 values)"),
        (lambda d: d["predictions"].update(labels=["a", "b", "c"]),
         "predictions.labels (a, b, c) are not the model's labels"),
        (lambda d: d.update(predictions={"kind": "numeric", "edges": [1], "counts": [1, 1]}),
         "which is for a regressor"),
        (lambda d: d.update(extra=1), "extra: Extra inputs are not permitted"),
    ],
)  # fmt: skip
def test_a_malformed_reference_turns_drift_off_saying_why(
    tmp_path: Path, spec: ModelSpec, change: Any, says: str
) -> None:
    doc = hand_written()
    change(doc)
    loaded = load_reference(write(tmp_path, doc), spec, LABELS)
    assert not loaded.enabled
    assert says in loaded.detail, loaded.detail
    assert loaded.detail.startswith(f"{tmp_path / 'reference.json'} is not usable, drift is off")


def test_not_json_and_no_file(tmp_path: Path, spec: ModelSpec) -> None:
    broken = load_reference(write(tmp_path, "{not json"), spec, LABELS)
    assert not broken.enabled and "Invalid JSON" in broken.detail
    missing = load_reference(tmp_path / "nowhere" / "reference.json", spec, LABELS)
    assert not missing.enabled
    assert missing.describe()["reference"] is False
    assert "no reference.json in" in missing.detail and "drift detection is off" in missing.detail


def test_a_built_reference_round_trips(tmp_path: Path, spec: ModelSpec) -> None:
    rng = np.random.default_rng(0)
    rows = np.column_stack([rng.normal(size=(500, 3)), rng.integers(0, 3, size=500)])
    outputs = rng.dirichlet([1, 1, 1], size=500)
    reference = build_reference(
        rows, FEATURES, categorical=["petal_width_cm"], outputs=outputs, labels=LABELS
    )
    text = reference.dump()
    assert '"edges": [' in text and "\n      -" not in text  # number lists on one line
    again = Reference.model_validate_json(text)
    assert again == reference
    category = again.features["petal_width_cm"]
    assert isinstance(category, CategoricalProfile) and category.categories == [0.0, 1.0, 2.0]
    predicted = again.predictions
    assert isinstance(predicted, ClassProfile)
    assert predicted.counts == np.bincount(outputs.argmax(axis=1), minlength=3).tolist()
    assert predicted.mean_confidence == pytest.approx(outputs.max(axis=1).mean())
    assert load_reference(write(tmp_path, text), spec, LABELS).enabled


def test_read_csv_reads_the_named_columns_and_names_bad_cells(tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    data.write_text("b,label,a\n1,x,2\n3,y,4.5\n")
    header, rows = read_csv(data, ["a", "b"])
    assert header == ["b", "label", "a"]
    assert rows.tolist() == [[2.0, 1.0], [4.5, 3.0]]
    with pytest.raises(ValidationFailed, match="line 2, column label: 'x' is not a number"):
        read_csv(data)
    with pytest.raises(ValidationFailed, match="the header has no column c"):
        read_csv(data, ["a", "c"])
    data.write_text("a,b\n1,2\n3\n")
    with pytest.raises(ValidationFailed, match="line 3: 1 values; the header names 2"):
        read_csv(data)
    data.write_text("a,b\n1,nan\n")
    with pytest.raises(ValidationFailed, match="'nan' is not finite"):
        read_csv(data)
