"""Model repositories in S3: synced from a real S3 API (moto's server on loopback), verified,
and served by the app as if they were a local folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from inferd.models.repository import ModelRepository
from inferd.models.storage import (
    MANIFEST,
    RemoteRepository,
    RepositoryUnavailable,
    parse_s3_url,
)
from tests.support.s3 import S3, s3, s3_endpoint, sha256sums

__all__ = ["s3", "s3_endpoint"]  # fixtures


def remote(s3: S3, bucket: str, prefix: str, cache: Path) -> RemoteRepository:
    return RemoteRepository(
        parse_s3_url(f"s3://{bucket}/{prefix}"), cache, endpoint_url=s3.endpoint
    )


def files(root: Path) -> dict[str, bytes]:
    """Every file the loader could see (dot-files are the sync's own)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def test_sync_copies_the_demo_models_verified(s3: S3, demo_models: Path, tmp_path: Path) -> None:
    bucket = s3.bucket()
    s3.upload(demo_models, bucket, "prod/models", sha256=True, sums=True)
    cache = tmp_path / "cache"

    report = remote(s3, bucket, "prod/models", cache).sync()

    assert report.failures == []
    assert report.models == ["iris", "iris-forest"]
    expected = files(demo_models)
    synced = files(cache)
    assert {k: v for k, v in synced.items() if not k.endswith("SHA256SUMS")} == expected
    assert sorted(report.downloaded) == sorted(f"s3://{bucket}/prod/models/{k}" for k in synced)
    manifest = json.loads((cache / MANIFEST).read_text())["objects"]
    assert manifest["iris/1/model.joblib"]["verified"] == [
        "size",
        "s3-sha256",
        "sha256sums",
        "etag-md5",
    ]
    entries = ModelRepository(cache).entries()  # what the registry reads
    assert [(e.name, e.versions) for e in entries] == [("iris", (1,)), ("iris-forest", (1,))]


def test_second_sync_downloads_nothing_and_a_changed_object_alone(
    s3: S3, demo_models: Path, tmp_path: Path
) -> None:
    bucket = s3.bucket()
    s3.upload(demo_models, bucket, "", sums=True)
    cache = tmp_path / "cache"
    repo = remote(s3, bucket, "", cache)
    first = repo.sync()
    artifact = cache / "iris" / "1" / "model.joblib"
    inode = artifact.stat().st_ino

    second = repo.sync()

    assert second.downloaded == []
    assert second.reused == len(first.downloaded)
    assert artifact.stat().st_ino == inode  # not even rewritten

    # A new description for iris: only its model.toml comes down again.
    toml = (demo_models / "iris" / "model.toml").read_text()
    s3.put(bucket, "iris/model.toml", toml.replace("Logistic", "Retrained logistic").encode())
    third = repo.sync()
    assert third.downloaded == [f"s3://{bucket}/iris/model.toml"]
    assert "Retrained logistic" in (cache / "iris" / "model.toml").read_text()
    assert artifact.stat().st_ino == inode


def test_a_new_version_and_a_removed_model_are_mirrored(
    s3: S3, demo_models: Path, tmp_path: Path
) -> None:
    bucket = s3.bucket()
    s3.upload(demo_models, bucket, "m")
    cache = tmp_path / "cache"
    repo = remote(s3, bucket, "m", cache)
    repo.sync()

    s3.put(bucket, "m/iris/2/model.joblib", (demo_models / "iris/1/model.joblib").read_bytes())
    for key in ("m/iris-forest/model.toml", "m/iris-forest/1/model.joblib"):
        s3.client.delete_object(Bucket=bucket, Key=key)
    report = repo.sync()

    assert report.downloaded == [f"s3://{bucket}/m/iris/2/model.joblib"]
    assert report.models == ["iris"]
    assert not (cache / "iris-forest").exists()
    assert ModelRepository(cache).read("iris").versions == (1, 2)


def test_a_missing_object_fails_its_version_only(s3: S3, demo_models: Path, tmp_path: Path) -> None:
    bucket = s3.bucket()
    s3.upload(demo_models, bucket, "p", sums=True)
    # Version 2 of iris: SHA256SUMS lists an object that is not in the bucket.
    v1 = demo_models / "iris" / "1"
    s3.put(bucket, "p/iris/2/model.joblib", (v1 / "model.joblib").read_bytes())
    s3.put(bucket, "p/iris/2/SHA256SUMS", sha256sums(v1) + b"0" * 64 + b"  labels.json\n")
    # Version 3: the artifact that model.toml names is not there at all.
    s3.put(bucket, "p/iris/3/README.txt", b"the artifact was never uploaded")
    cache = tmp_path / "cache"

    report = remote(s3, bucket, "p", cache).sync()

    assert sorted(str(f) for f in report.failures) == [
        f"iris version 2: s3://{bucket}/p/iris/2/labels.json: missing (listed in SHA256SUMS)",
        f"iris version 3: s3://{bucket}/p/iris/3/model.joblib: "
        "missing (model.toml names this artifact)",
    ]
    assert ModelRepository(cache).read("iris").versions == (1,)
    assert report.models == ["iris", "iris-forest"]
    assert not (cache / ".staging").exists()


def test_a_corrupt_artifact_never_reaches_the_cache(
    s3: S3, demo_models: Path, tmp_path: Path
) -> None:
    bucket = s3.bucket()
    s3.upload(demo_models, bucket, "p", sums=True)
    cache = tmp_path / "cache"
    repo = remote(s3, bucket, "p", cache)
    repo.sync()
    good = files(cache)

    # A new iris v1 artifact whose bytes are not the ones SHA256SUMS lists.
    s3.put(bucket, "p/iris/1/model.joblib", b"not the model that was published")
    # iris-forest v2 whose bytes rotted in storage after upload (ETag and size as uploaded).
    forest = (demo_models / "iris-forest" / "1" / "model.joblib").read_bytes()
    s3.put(bucket, "p/iris-forest/2/model.joblib", forest)
    s3.damage(bucket, "p/iris-forest/2/model.joblib")
    report = repo.sync()

    reasons = {(f.model, f.version): (f.key, f.reason) for f in report.failures}
    key, reason = reasons[("iris", "1")]
    assert key == f"s3://{bucket}/p/iris/1/model.joblib"
    assert reason.startswith("corrupt: SHA-256 ") and "SHA256SUMS says" in reason
    key, reason = reasons[("iris-forest", "2")]
    assert key == f"s3://{bucket}/p/iris-forest/2/model.joblib"
    assert reason.startswith("corrupt: MD5 ") and "the ETag says" in reason
    assert files(cache) == good  # the verified copies stay; nothing corrupt landed
    assert not (cache / "iris-forest" / "2").exists()


def test_damage_is_caught_by_the_stores_sha256(s3: S3, demo_models: Path, tmp_path: Path) -> None:
    bucket = s3.bucket()
    s3.upload(demo_models / "iris", bucket, "iris", sha256=True)
    s3.damage(bucket, "iris/1/model.joblib")

    report = remote(s3, bucket, "", tmp_path / "cache").sync()

    [failure] = report.failures
    assert failure.key == f"s3://{bucket}/iris/1/model.joblib"
    assert failure.reason.startswith("corrupt")
    assert not (tmp_path / "cache" / "iris").exists()  # a model appears with a version only


def test_unreachable_endpoint_and_empty_prefix_are_refused_with_the_path(
    s3: S3, demo_models: Path, tmp_path: Path
) -> None:
    closed = "http://127.0.0.1:9"  # discard port: nothing listens on loopback
    repo = RemoteRepository(parse_s3_url("s3://models/prod"), tmp_path / "c", endpoint_url=closed)
    with pytest.raises(RepositoryUnavailable, match=r"s3://models/prod at http://127\.0\.0\.1:9"):
        repo.sync()

    bucket = s3.bucket()
    s3.upload(demo_models, bucket, "prod")
    with pytest.raises(RepositoryUnavailable, match=rf"no models in s3://{bucket}/staging "):
        remote(s3, bucket, "staging", tmp_path / "c").sync()
    with pytest.raises(RepositoryUnavailable, match="the bucket does not exist"):
        remote(s3, "no-such-bucket", "", tmp_path / "c").sync()


async def test_app_serves_from_the_bucket_and_loads_new_versions(
    s3: S3,
    demo_models: Path,
    tmp_path: Path,
    serve: Callable[..., Any],
) -> None:
    bucket = s3.bucket()
    s3.upload(demo_models, bucket, "models")
    url = f"s3://{bucket}/models"
    async with serve(models_dir=url, s3_endpoint_url=s3.endpoint) as served:
        settings = served.app.settings
        assert settings.model_repository == url
        assert settings.models_dir == settings.model_cache_dir
        row = {"features": [5.1, 3.5, 1.4, 0.2]}
        answer = await served.client.post("/v1/models/iris/predict", json=row)
        assert answer.status_code == 200, answer.text
        assert answer.json()["label"] == "setosa"

        # The registry syncs before it reads the repository again.
        v1 = demo_models / "iris" / "1" / "model.joblib"
        s3.put(bucket, "models/iris/2/model.joblib", v1.read_bytes())
        assert (settings.models_dir / "iris" / "2").exists() is False
        load = await served.client.post("/v1/admin/models/iris/load")
        assert load.status_code == 200, load.text
        assert (settings.models_dir / "iris" / "2" / "model.joblib").read_bytes() == v1.read_bytes()
        answer = await served.client.post("/v1/models/iris/versions/2/predict", json=row)
        assert answer.status_code == 200, answer.text

        # A version 3 whose bytes rotted in storage is never loaded: it is not in the cache.
        s3.put(bucket, "models/iris/3/model.joblib", v1.read_bytes())
        s3.damage(bucket, "models/iris/3/model.joblib")
        load = await served.client.post("/v1/admin/models/iris/load", json={"versions": [3]})
        assert load.status_code == 404, load.text
        assert load.json()["error"]["code"] == "model_not_found"
        [failure] = served.app.syncer.last.failures  # the log line says why, naming the key
        assert failure.key == f"{url}/iris/3/model.joblib"
        assert not (settings.models_dir / "iris" / "3").exists()

        # The bucket emptied (a wrong prefix looks the same): loads are refused, naming it,
        # and what is loaded keeps serving from memory and the cache.
        for key in s3.keys(bucket):
            s3.client.delete_object(Bucket=bucket, Key=key)
        load = await served.client.post("/v1/admin/models/iris/load")
        assert load.status_code == 503, load.text
        assert load.json()["error"]["code"] == "repository_unavailable"
        assert f"no models in {url} at {s3.endpoint}" in load.json()["error"]["message"]
        answer = await served.client.post("/v1/models/iris/predict", json=row)
        assert answer.status_code == 200, answer.text
        assert (settings.models_dir / "iris" / "2" / "model.joblib").is_file()


def test_a_cache_of_another_bucket_starts_over(s3: S3, demo_models: Path, tmp_path: Path) -> None:
    first, second = s3.bucket(), s3.bucket()
    s3.upload(demo_models, first, "")
    s3.upload(demo_models / "iris", second, "iris")
    cache = tmp_path / "cache"
    remote(s3, first, "", cache).sync()

    report = remote(s3, second, "", cache).sync()

    assert report.models == ["iris"]
    # model.toml, model.joblib, reference.json: nothing from the first bucket is trusted
    assert len(report.downloaded) == 3
    assert not (cache / "iris-forest").exists()
