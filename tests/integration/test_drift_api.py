"""Drift through the app: rows sent over HTTP, read back from /v1/models/{name}/drift and
/metrics; a version without a reference, a broken one, and drift turned off."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_iris

FEATURES = ["sepal_length_cm", "sepal_width_cm", "petal_length_cm", "petal_width_cm"]


def iris_rows() -> np.ndarray:
    """The whole iris data twice (300 rows: over drift_min_rows, 200)."""
    rows: np.ndarray = np.concatenate([load_iris().data] * 2)
    return rows


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                found[tuple(sorted(s.labels.items()))] = s.value
    return found


def feature_psi(text: str, model: str = "iris") -> dict[str, float]:
    return {
        dict(labels)["feature"]: value
        for labels, value in samples(text, "inference_feature_drift").items()
        if dict(labels)["model"] == model
    }


async def send(client: Any, rows: np.ndarray, model: str = "iris", per_request: int = 10) -> None:
    for start in range(0, len(rows), per_request):
        chunk = rows[start : start + per_request].tolist()
        r = await client.post(f"/v1/models/{model}/predict", json={"instances": chunk})
        assert r.status_code == 200, r.text


async def test_reference_rows_are_stable(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        await send(s.client, iris_rows())
        drift = await s.client.get("/v1/models/iris/drift")
        text = (await s.client.get("/metrics")).text
    assert drift.status_code == 200
    body = drift.json()
    assert body["model"] == "iris" and body["enabled"] is True
    (version,) = body["versions"]
    assert version["version"] == "1" and version["default"] is True
    assert version["status"] == "ok"
    assert version["window"]["rows"] == 300 and version["window"]["enough_rows"] is True
    assert version["reference"]["reference"] is True
    for feature in version["features"]:
        assert feature["psi"] < 0.1, feature
        assert feature["level"] == "stable"
        assert sum(b["count"] for b in feature["bins"]) == 300
    assert version["predictions"]["psi"] < 0.1
    assert 0.5 < version["predictions"]["confidence"]["window"] <= 1.0

    psi = feature_psi(text)
    assert set(psi) == set(FEATURES)
    assert all(v < 0.1 for v in psi.values()), psi
    by_class = {
        dict(labels)["class"]: value
        for labels, value in samples(text, "inference_predicted_class_total").items()
        if dict(labels)["model"] == "iris"
    }
    assert set(by_class) == {"setosa", "versicolor", "virginica"}
    assert sum(by_class.values()) == 300
    assert by_class["setosa"] == 100  # the 50 setosa flowers, twice: all recognised
    rows = samples(text, "inference_drift_window_rows")
    assert rows[(("model", "iris"), ("version", "1"))] == 300


async def test_one_shifted_feature_drifts_alone(serve: Callable[..., Any]) -> None:
    rows = iris_rows()
    async with serve() as s:
        std = s.app.registry.get("iris").reference.reference.features["petal_length_cm"].std
        rows[:, 2] += 2 * std  # petal_length_cm, +2 sigma of the training data
        await send(s.client, rows)
        # also through the V2 protocol: the monitor sits behind every route's batcher
        v2 = await s.client.post(
            "/v2/models/iris/infer",
            json={"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64",
                              "data": rows[0].tolist()}]},
        )  # fmt: skip
        assert v2.status_code == 200, v2.text
        body = (await s.client.get("/v1/models/iris/drift")).json()
        text = (await s.client.get("/metrics")).text
    version = body["versions"][0]
    assert version["window"]["rows"] == 301
    assert version["status"] == "drift"
    features = {f["name"]: f for f in version["features"]}
    assert features["petal_length_cm"]["psi"] > 0.25
    assert features["petal_length_cm"]["shift_sigmas"] == pytest.approx(2.0, abs=0.1)
    assert all(f["psi"] < 0.1 for n, f in features.items() if n != "petal_length_cm"), features
    assert version["input_drift"]["feature"] == "petal_length_cm"
    assert version["input_drift"]["psi"] == features["petal_length_cm"]["psi"]

    psi = feature_psi(text)
    assert psi["petal_length_cm"] > 0.25
    assert all(v < 0.1 for f, v in psi.items() if f != "petal_length_cm"), psi
    total = samples(text, "inference_input_drift")[(("model", "iris"), ("version", "1"))]
    assert total == pytest.approx(psi["petal_length_cm"])


async def test_unknown_model_and_a_version_without_reference(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    (models_dir / "iris-forest" / "1" / "reference.json").unlink()
    async with serve() as s:
        missing = await s.client.get("/v1/models/nope/drift")
        await send(s.client, iris_rows()[:50], model="iris-forest")
        forest = (await s.client.get("/v1/models/iris-forest/drift")).json()
        meta = (await s.client.get("/v1/models/iris-forest")).json()
        text = (await s.client.get("/metrics")).text
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    version = forest["versions"][0]
    assert version["status"] == "no_reference"
    assert "no reference.json in" in version["detail"]
    assert "inferd models profile" in version["detail"]
    assert "features" not in version
    assert version["predictions"]["rows"] == 50  # class counts do not need a reference
    assert meta["drift"]["reference"] is False
    assert "drift detection is off" in meta["drift"]["detail"]
    assert feature_psi(text, "iris-forest") == {}
    counted = samples(text, "inference_predicted_class_total")
    assert sum(v for k, v in counted.items() if dict(k)["model"] == "iris-forest") == 50


async def test_a_broken_reference_never_stops_serving(
    serve: Callable[..., Any], models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (models_dir / "iris" / "1" / "reference.json").write_text('{"format": "inferd.reference/v1"}')
    async with serve() as s:
        r = await s.client.post("/predict", json={"features": [5.1, 3.5, 1.4, 0.2]})
        meta = (await s.client.get("/v1/models/iris")).json()
        drift = (await s.client.get("/v1/models/iris/drift")).json()
    assert r.status_code == 200
    assert meta["drift"]["reference"] is False
    assert "is not usable, drift is off: features: Field required" in meta["drift"]["detail"]
    assert drift["versions"][0]["status"] == "no_reference"
    assert "drift detection is off for this version" in capsys.readouterr().out


async def test_drift_off(serve: Callable[..., Any]) -> None:
    async with serve(drift_enabled=False) as s:
        await send(s.client, iris_rows()[:20])
        body = (await s.client.get("/v1/models/iris/drift")).json()
        text = (await s.client.get("/metrics")).text
        assert s.app.monitor is None  # no drift work on the request path
    assert body["enabled"] is False and "INFERD_DRIFT_ENABLED=false" in body["detail"]
    assert body["versions"][0]["reference"]["reference"] is True
    assert samples(text, "inference_predicted_class_total") == {}
    assert feature_psi(text) == {}
