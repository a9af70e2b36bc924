"""``inferd serve`` and ``inferd models list`` with the models in a bucket, as a user runs
them: real processes talking to a real S3 API (moto's server on loopback)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.e2e.conftest import Server, run_cli
from tests.support.s3 import S3, s3, s3_endpoint

__all__ = ["s3", "s3_endpoint"]  # fixtures

SETOSA = {"features": [5.1, 3.5, 1.4, 0.2]}


def config(tmp_path: Path, endpoint: str) -> Path:
    """A settings file naming the S3-compatible endpoint (credentials come from AWS_*)."""
    path = tmp_path / "inferd.toml"
    path.write_text(f's3_endpoint_url = "{endpoint}"\ndata_dir = "{tmp_path / "data"}"\n')
    return path


def test_serve_loads_models_from_a_bucket(
    s3: S3, demo_models: Path, tmp_path: Path, start_server: type[Server]
) -> None:
    bucket = s3.bucket()
    s3.upload(demo_models, bucket, "prod", sums=True)
    url = f"s3://{bucket}/prod"

    server = start_server(["--models-dir", url, "--config", str(config(tmp_path, s3.endpoint))])
    server.wait_ready()

    answer = httpx.post(f"{server.url}/v1/models/iris/predict", json=SETOSA, timeout=5)
    assert answer.status_code == 200, answer.text
    assert answer.json()["label"] == "setosa"
    cache = tmp_path / "data" / "model-cache"
    assert (cache / "iris" / "1" / "model.joblib").is_file()
    synced = [
        line
        for line in map(json.loads, server.output().splitlines())
        if line.get("event") == "model repository synced"
    ]
    assert synced[0]["source"] == f"{url} at {s3.endpoint}"
    # 2 x (model.toml, model.joblib, reference.json, SHA256SUMS)
    assert synced[0]["downloaded"] == 8

    # A second version uploaded while the server runs is fetched when it is loaded.
    forest = (demo_models / "iris-forest" / "1" / "model.joblib").read_bytes()
    s3.put(bucket, "prod/iris/2/model.joblib", forest)
    load = httpx.post(f"{server.url}/v1/admin/models/iris/load", json={}, timeout=30)
    assert load.status_code == 200, load.text
    assert (cache / "iris" / "2" / "model.joblib").read_bytes() == forest
    two = httpx.post(f"{server.url}/v1/models/iris/versions/2/predict", json=SETOSA, timeout=5)
    assert two.status_code == 200, two.text
    assert two.json()["label"] == "setosa"


def test_serve_exits_2_naming_the_bucket_when_it_cannot_sync(tmp_path: Path) -> None:
    closed = config(tmp_path, "http://127.0.0.1:9")  # nothing listens there

    run = run_cli("serve", "--models-dir", "s3://models/prod", "-c", str(closed), cwd=tmp_path)

    assert run.returncode == 2, run.stderr
    assert "cannot list the model repository s3://models/prod at http://127.0.0.1:9" in run.stderr
    assert not (tmp_path / "data" / "model-cache" / "models").exists()


def test_models_list_reads_the_bucket(s3: S3, demo_models: Path, tmp_path: Path) -> None:
    bucket = s3.bucket()
    s3.upload(demo_models, bucket, "")

    listed = run_cli(
        "models",
        "list",
        "--json",
        "-m",
        f"s3://{bucket}",
        "-c",
        str(config(tmp_path, s3.endpoint)),
        cwd=tmp_path,
    )

    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(row["name"], row["versions"]) for row in rows] == [
        ("iris", [1]),
        ("iris-forest", [1]),
    ]
    assert f"synced s3://{bucket} → " in listed.stderr
