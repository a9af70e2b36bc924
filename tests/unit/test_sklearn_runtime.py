"""The scikit-learn runtime: loading, the linear fast path, and refusals of bad artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LinearRegression, LogisticRegression

from inferd.errors import ModelLoadError
from inferd.models.repository import ModelRepository
from inferd.models.sklearn import SklearnModel
from inferd.models.spec import ModelSpec, load_spec

FEATURES = ["sepal_length_cm", "sepal_width_cm", "petal_length_cm", "petal_width_cm"]


def spec(name: str = "custom", **fields: Any) -> ModelSpec:
    raw: dict[str, Any] = {"name": name, "input": {"features": FEATURES}, **fields}
    return ModelSpec.model_validate(raw)


def dump(estimator: Any, folder: Path) -> Path:
    path = folder / "model.joblib"
    joblib.dump(estimator, path)
    return path


def demo(models_dir: Path, name: str) -> SklearnModel:
    entry = ModelRepository(models_dir).get(name)
    return SklearnModel(entry.spec, entry.latest, entry.artifact(entry.latest))


def random_rows(n_features: int = 4, n: int = 200) -> np.ndarray:
    return np.random.default_rng(7).normal(4.0, 2.5, size=(n, n_features))


def load_error(model: SklearnModel) -> str:
    with pytest.raises(ModelLoadError) as info:
        model.load()
    return info.value.message


def test_demo_logistic_regression_uses_the_fast_path(models_dir: Path) -> None:
    model = demo(models_dir, "iris")
    model.load()
    rows = random_rows()

    out = model.predict(rows)

    assert model.capabilities.fast_path is True
    assert isinstance(model.estimator, LogisticRegression)
    assert out.dtype == np.float64
    assert out.shape == (200, 3)
    np.testing.assert_allclose(out, model.estimator.predict_proba(rows), rtol=0, atol=1e-9)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_demo_classes_are_plain_python_values(models_dir: Path) -> None:
    model = demo(models_dir, "iris")
    model.load()

    assert model.classes() == [0, 1, 2]
    assert all(type(c) is int for c in model.classes() or [])


def test_demo_forest_uses_scikit_learn(models_dir: Path) -> None:
    model = demo(models_dir, "iris-forest")
    model.load()
    rows = random_rows(n=20)

    assert model.capabilities.fast_path is False
    np.testing.assert_array_equal(model.predict(rows), model.estimator.predict_proba(rows))


def test_single_row_and_batch_agree(models_dir: Path) -> None:
    model = demo(models_dir, "iris")
    model.load()
    rows = random_rows(n=5)

    singles = np.vstack([model.predict(rows[i : i + 1]) for i in range(5)])

    np.testing.assert_allclose(singles, model.predict(rows), rtol=0, atol=1e-12)


def test_binary_logistic_regression_fast_path(tmp_path: Path) -> None:
    x, y = load_iris(return_X_y=True)
    estimator = LogisticRegression(max_iter=1000).fit(x, (y == 2).astype(int))
    model = SklearnModel(
        spec(output={"labels": ["other", "virginica"]}), 1, dump(estimator, tmp_path)
    )
    model.load()
    rows = random_rows()

    out = model.predict(rows)

    assert model.capabilities.fast_path is True
    assert out.shape == (200, 2)
    np.testing.assert_allclose(out, estimator.predict_proba(rows), rtol=0, atol=1e-9)


def test_regressor_predicts_values(tmp_path: Path) -> None:
    x, _ = load_iris(return_X_y=True)
    estimator = LinearRegression().fit(x, x @ np.array([1.0, -2.0, 0.5, 3.0]))
    model = SklearnModel(spec(task="regression"), 1, dump(estimator, tmp_path))
    model.load()

    out = model.predict(x[:3])

    assert model.classes() is None
    assert out.shape == (3,)
    np.testing.assert_allclose(out, x[:3] @ np.array([1.0, -2.0, 0.5, 3.0]), atol=1e-9)


def test_predict_before_load_is_refused(models_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="not loaded"):
        demo(models_dir, "iris").predict(random_rows(n=1))


def test_missing_artifact(tmp_path: Path) -> None:
    path = tmp_path / "1" / "model.joblib"

    message = load_error(SklearnModel(spec(), 1, path))

    assert f"artifact {path} is missing" in message


def test_random_bytes_are_refused_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "model.joblib"
    path.write_bytes(np.random.default_rng(1).bytes(2000))

    message = load_error(SklearnModel(spec(), 1, path))

    assert str(path) in message
    assert "corrupt or not a joblib file" in message


def test_truncated_artifact_is_refused_with_the_path(models_dir: Path, tmp_path: Path) -> None:
    data = (models_dir / "iris" / "1" / "model.joblib").read_bytes()
    path = tmp_path / "model.joblib"
    path.write_bytes(data[: len(data) // 2])

    message = load_error(
        SklearnModel(load_spec(models_dir / "iris" / "model.toml", "iris"), 1, path)
    )

    assert str(path) in message
    assert "corrupt or not a joblib file" in message


@pytest.mark.parametrize("kind", ["cut-in-frame-header", "zlib-like"])
def test_every_corrupt_artifact_is_a_model_load_error(
    models_dir: Path, tmp_path: Path, kind: str
) -> None:
    data = (models_dir / "iris" / "1" / "model.joblib").read_bytes()
    path = tmp_path / "model.joblib"
    path.write_bytes(data[:10] if kind == "cut-in-frame-header" else b"x" + bytes(100))

    message = load_error(SklearnModel(spec(), 1, path))

    assert str(path) in message


def test_feature_count_mismatch_names_both_counts(tmp_path: Path) -> None:
    x, y = load_iris(return_X_y=True)
    path = dump(LogisticRegression(max_iter=1000).fit(x[:, :3], y), tmp_path)

    message = load_error(SklearnModel(spec(), 1, path))

    assert f"{path} expects 3 features but model.toml declares 4" in message
    assert ", ".join(FEATURES) in message


def test_label_count_mismatch(tmp_path: Path) -> None:
    x, y = load_iris(return_X_y=True)
    path = dump(LogisticRegression(max_iter=1000).fit(x, y), tmp_path)

    message = load_error(SklearnModel(spec(output={"labels": ["a", "b"]}), 1, path))

    assert "has 3 classes but model.toml lists 2 labels" in message


def test_regressor_declared_as_classifier_is_refused(tmp_path: Path) -> None:
    x, y = load_iris(return_X_y=True)
    path = dump(LinearRegression().fit(x, y), tmp_path)

    message = load_error(SklearnModel(spec(task="classification"), 1, path))

    assert "LinearRegression" in message
    assert "no predict_proba()" in message
    assert str(path) in message
