"""Remote repositories without a network: URLs, settings, SHA256SUMS and key layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from inferd.errors import ConfigError
from inferd.models.storage import (
    S3Location,
    _Object,
    _parse_sums,
    _place,
    _RemoteModel,
    _VersionFailed,
    create_syncer,
    parse_s3_url,
)
from inferd.settings import Settings


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    overrides.setdefault("data_dir", tmp_path / "data")
    return Settings.load(None, **overrides)


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://models", "models", ""),
        ("s3://models/", "models", ""),
        ("s3://models/prod/eu", "models", "prod/eu/"),
        ("s3://models/prod/", "models", "prod/"),
    ],
)
def test_parse_s3_url(url: str, bucket: str, prefix: str) -> None:
    location = parse_s3_url(url)
    assert location == S3Location(bucket, prefix)
    assert location.uri("iris/model.toml") == f"s3://{bucket}/{prefix}iris/model.toml"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("/srv/models", "not an s3:// URL"),
        ("s3://", "not a valid bucket name"),
        ("s3://Models/prod", "not a valid bucket name"),
        ("s3://models/a//b", "empty, '.' or '..'"),
        ("s3://models/../etc", "empty, '.' or '..'"),
    ],
)
def test_bad_s3_urls_say_what_is_wrong(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem.replace(".", r"\.")):
        parse_s3_url(url)


def test_models_dir_may_be_a_bucket_and_then_reads_as_the_cache(tmp_path: Path) -> None:
    s = settings(tmp_path, models_dir="s3://models/prod/")

    assert s.model_repository == "s3://models/prod"
    assert s.model_cache_dir == (tmp_path / "data" / "model-cache").resolve()
    assert s.models_dir == s.model_cache_dir  # what the registry reads
    syncer = create_syncer(s)
    assert syncer is not None
    assert syncer.url == "s3://models/prod"
    assert create_syncer(settings(tmp_path, models_dir=tmp_path)) is None


def test_a_models_dir_flag_folded_by_path_still_names_the_bucket(tmp_path: Path) -> None:
    # typer turns `--models-dir s3://models/prod` into Path("s3:/models/prod").
    s = settings(tmp_path, models_dir=Path("s3://models/prod"), model_cache_dir=tmp_path / "c")

    assert s.model_repository == "s3://models/prod"
    assert s.models_dir == (tmp_path / "c").resolve()


def test_repository_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERD_MODEL_REPOSITORY", "s3://models/prod")
    monkeypatch.setenv("INFERD_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    s = settings(tmp_path)

    assert s.model_repository == "s3://models/prod"
    assert s.s3_endpoint_url == "http://127.0.0.1:9000"
    again = Settings(_env_file=None, **s.model_dump())  # type: ignore[call-arg]
    assert (again.model_repository, again.models_dir) == (s.model_repository, s.models_dir)


def test_two_different_repositories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="set one of them"):
        settings(tmp_path, models_dir=tmp_path / "models", model_repository="s3://models/prod")
    with pytest.raises(ConfigError, match="set one of them"):
        settings(tmp_path, models_dir="s3://models/a", model_repository="s3://models/b")
    with pytest.raises(ConfigError, match="not a valid bucket name"):
        settings(tmp_path, model_repository="s3://x")


def test_sha256sums_in_sha256sum_format() -> None:
    digest = "ab" * 32
    text = f"# published 2026-11-23\n{digest}  model.joblib\n{digest.upper()} *./sub/x.bin\n\n"

    assert _parse_sums("s3://b/m/1/SHA256SUMS", text.encode()) == {
        "model.joblib": digest,
        "sub/x.bin": digest,
    }
    with pytest.raises(_VersionFailed, match=r"s3://b/m/1/SHA256SUMS: line 1 is not"):
        _parse_sums("s3://b/m/1/SHA256SUMS", b"md5 model.joblib\n")


def test_keys_are_filed_by_model_and_version() -> None:
    models: dict[str, _RemoteModel] = {}
    for rel in [
        "iris/model.toml",
        "iris/1/model.joblib",
        "iris/2/tokenizer/vocab.json",
        "iris/2/",  # a folder marker
        "iris/0/model.joblib",  # versions start at 1
        "iris/latest/model.joblib",
        "iris/README.md",
        "notes.txt",
        ".hidden/model.toml",
        "evil/model.toml",
        "evil/1/../../escape",
    ]:
        _place(models, _Object(key="p/" + rel, rel=rel, size=1, etag="e"))

    iris = models["iris"]
    assert iris.spec is not None and iris.spec.key == "p/iris/model.toml"
    assert {v: sorted(files) for v, files in iris.versions.items()} == {
        "1": ["model.joblib"],
        "2": ["tokenizer/vocab.json"],
    }
    assert models["evil"].bad_keys == {"1": "evil/1/../../escape"}
    assert ".hidden" not in models
