"""Remote model repositories: an S3-compatible bucket mirrored into a local cache folder.

The bucket holds the same layout as a local repository, under a prefix::

    s3://bucket/prefix/<name>/model.toml
    s3://bucket/prefix/<name>/<version>/<files>        (SHA256SUMS optional)

:meth:`RemoteRepository.sync` copies it into the cache folder, which the ordinary
:class:`~inferd.models.repository.ModelRepository` then reads; nothing else in the model code
knows that the models came from a bucket. A sync downloads only what changed since the last
one (size and ETag, kept in a small manifest in the cache). Each version is assembled and
verified in a staging folder and moved into place with one rename, so the loader sees either
the previous copy of a version or the complete new one, never a half-written or unverified
file. Every object is checked for its size; for its SHA-256 where the store kept one
(``x-amz-checksum-sha256``, asked for with ``ChecksumMode=ENABLED``) and where the version's
``SHA256SUMS`` lists it; for the MD5 of a plain upload's ETag. A version with a missing or
corrupt object fails alone, with the object's ``s3://`` address, and its previous copy (if
any) stays as it was.

Every method here blocks (network, disk): call them from a thread (``run_blocking``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferd.errors import ConfigError
from inferd.logs import get_logger
from inferd.models.spec import ModelSpec
from inferd.s3url import S3Location, parse_s3_url

__all__ = [
    "RemoteRepository",
    "RepositoryUnavailable",
    "S3Location",
    "SyncFailure",
    "SyncReport",
    "create_syncer",
    "parse_s3_url",
]

log = get_logger("inferd.storage")

MANIFEST = ".inferd-sync.json"
"""What the last sync wrote, per cache-relative path: size, ETag, SHA-256."""
SUMS_FILE = "SHA256SUMS"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # as ModelRepository accepts
_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64})\s+\*?(.+)$")
_SMALL = 1 << 20  # model.toml and SHA256SUMS are read into memory; more than this is wrong
_CHUNK = 1 << 20
_PARALLEL = 8  # downloads at a time within one version


class RepositoryUnavailable(ConfigError):
    """The remote repository cannot be listed: unreachable, no such bucket, or no access."""

    status_code = 503
    code = "repository_unavailable"
    retryable = True


class _VersionFailed(Exception):
    """One version cannot be synced; ``key`` is the ``s3://`` address at fault."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SyncFailure:
    """A model version (or a whole model, ``version`` None) that was not synced, and why."""

    model: str
    version: str | None
    key: str
    reason: str

    def __str__(self) -> str:
        what = self.model if self.version is None else f"{self.model} version {self.version}"
        return f"{what}: {self.key}: {self.reason}"


@dataclass(slots=True)
class SyncReport:
    """What one sync did."""

    source: str
    cache: Path
    downloaded: list[str] = field(default_factory=list)
    """``s3://`` addresses of the objects fetched."""
    reused: int = 0
    """Objects already in the cache and unchanged."""
    removed: list[str] = field(default_factory=list)
    """Cache paths removed because the bucket no longer has them."""
    failures: list[SyncFailure] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    """Models in the cache after the sync."""
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class _Object:
    key: str
    rel: str  # path under the prefix, which is also its path in the cache
    size: int
    etag: str


@dataclass(slots=True)
class _RemoteModel:
    name: str
    spec: _Object | None = None
    versions: dict[str, dict[str, _Object]] = field(default_factory=dict)
    """version folder name → path inside the version folder → object."""
    bad_keys: dict[str, str] = field(default_factory=dict)
    """version → a key that cannot be placed in the cache safely."""


class RemoteRepository:
    """An S3-compatible bucket mirrored into ``cache_dir``; :meth:`sync` brings it up to date.

    ``client`` is a boto3 S3 client; by default one is built from the endpoint, the region
    and boto3's usual credential chain (environment, shared files, instance role).
    """

    def __init__(
        self,
        location: S3Location,
        cache_dir: Path,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        timeout: float = 10.0,
        client: Any = None,
    ) -> None:
        self.location = location
        self.cache = cache_dir.expanduser().resolve()
        self.endpoint_url = endpoint_url
        self.region = region
        self.timeout = timeout
        self._client = client
        self._lock = threading.Lock()
        self.last: SyncReport | None = None
        """The report of the last successful sync (None before the first)."""

    @classmethod
    def from_settings(cls, settings: Any) -> RemoteRepository:
        if settings.model_repository is None:
            raise ConfigError("the model repository is a local folder, not a bucket")
        return cls(
            parse_s3_url(settings.model_repository),
            settings.models_dir,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            timeout=settings.s3_timeout_seconds,
        )

    @property
    def url(self) -> str:
        return self.location.url

    @property
    def source(self) -> str:
        """What the cache is a copy of: the bucket, and the endpoint when it is not AWS."""
        return self.url + (f" at {self.endpoint_url}" if self.endpoint_url else "")

    # ------------------------------------------------------------------ public
    def sync(self) -> SyncReport:
        """Bring the cache up to date with the bucket; blocking.

        Raises :class:`RepositoryUnavailable` when the bucket cannot be listed or holds no
        model, and ConfigError when the cache cannot be written; a version that fails
        verification is left out (its previous copy stays) and reported in
        :attr:`SyncReport.failures`.
        """
        started = time.perf_counter()
        with self._lock, self._cache_lock():
            report = SyncReport(source=self.source, cache=self.cache)
            remote = self._list()
            staging = self.cache / ".staging"
            shutil.rmtree(staging, ignore_errors=True)  # what a killed sync left behind
            staging.mkdir()
            try:
                manifest = self._read_manifest()
                for model in remote.values():
                    self._sync_model(model, manifest, staging, report)
                for name in sorted({rel.split("/", 1)[0] for rel in manifest} - set(remote)):
                    self._remove(name, manifest, staging, report)
            except OSError as exc:  # disk full, permissions: say which folder
                raise ConfigError(f"cannot write the model cache {self.cache}: {exc}") from exc
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            report.models = sorted(
                name
                for name in remote
                if (self.cache / name / "model.toml").is_file() and f"{name}/model.toml" in manifest
            )
        report.seconds = time.perf_counter() - started
        for failure in report.failures:
            log.error(
                "model version not synced",
                model=failure.model,
                version=failure.version,
                key=failure.key,
                detail=failure.reason,
            )
        log.info(
            "model repository synced",
            source=report.source,
            cache=str(report.cache),
            downloaded=len(report.downloaded),
            reused=report.reused,
            removed=len(report.removed),
            failed=len(report.failures),
            ms=round(report.seconds * 1000, 1),
        )
        self.last = report
        return report

    def __call__(self) -> SyncReport:
        """The registry's hook: sync before the repository is read again."""
        return self.sync()

    # ------------------------------------------------------------------ listing
    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:  # pragma: no cover - boto3 is in the s3 extra
            raise ConfigError(
                f"the model repository {self.url} is in S3, which needs boto3: "
                "pip install 'inferd[s3]'"
            ) from exc
        config = Config(
            connect_timeout=self.timeout,
            read_timeout=self.timeout,
            retries={"mode": "standard"},  # AWS_MAX_ATTEMPTS still applies
            # S3-compatible servers (MinIO, test servers) seldom resolve bucket subdomains.
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
            response_checksum_validation="when_supported",
        )
        session = boto3.session.Session()
        try:
            return session.client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
            )
        except ValueError as exc:  # a malformed endpoint URL or region
            raise ConfigError(
                f"cannot use the S3 endpoint {self.endpoint_url!r} (region {self.region!r}) "
                f"for {self.url}: {exc}"
            ) from exc

    def _list(self) -> dict[str, _RemoteModel]:
        """Every model under the prefix, with its objects; raises when none is there."""
        models: dict[str, _RemoteModel] = {}
        prefix = self.location.prefix
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.location.bucket, Prefix=prefix
            )
            for page in pages:
                for item in page.get("Contents", ()):
                    obj = _Object(
                        key=item["Key"],
                        rel=item["Key"][len(prefix) :],
                        size=int(item["Size"]),
                        etag=str(item.get("ETag", "")).strip('"'),
                    )
                    _place(models, obj)
        except _boto_errors() as exc:
            raise RepositoryUnavailable(
                f"cannot list the model repository {self.source}: {_describe(exc)}"
            ) from exc
        found = {name: m for name, m in models.items() if m.spec is not None}
        if not found:  # unusable as a repository, and a wrong prefix looks just like this
            raise RepositoryUnavailable(
                f"no models in {self.source}: expected <name>/model.toml and "
                f"<name>/<version>/ under {self.location.uri('')}"
            )
        return found

    # ------------------------------------------------------------------ one model
    def _sync_model(
        self,
        model: _RemoteModel,
        manifest: dict[str, dict[str, Any]],
        staging: Path,
        report: SyncReport,
    ) -> None:
        assert model.spec is not None
        name = model.name
        spec_obj = model.spec
        spec_changed = not self._fresh(spec_obj, manifest)
        try:
            if spec_changed:
                spec_bytes, spec_record = self._fetch_small(spec_obj)
                report.downloaded.append(self.location.uri(spec_obj.rel))
            else:
                spec_bytes = (self.cache / spec_obj.rel).read_bytes()
                spec_record = manifest[spec_obj.rel]
                report.reused += 1
            artifact = _artifact_name(self.location.uri(spec_obj.rel), name, spec_bytes)
        except _VersionFailed as exc:
            report.failures.append(SyncFailure(name, None, exc.key, exc.reason))
            return

        for version in sorted(set(model.versions) | set(model.bad_keys), key=int):
            try:
                if version in model.bad_keys:
                    raise _VersionFailed(
                        self.location.uri(model.bad_keys[version]),
                        "a key with an empty, '.' or '..' path part cannot be placed in the cache",
                    )
                self._sync_version(
                    name, version, model.versions[version], artifact, manifest, staging, report
                )
            except _VersionFailed as exc:
                report.failures.append(SyncFailure(name, version, exc.key, exc.reason))

        prefix = f"{name}/"
        for version in sorted(
            {rel.split("/")[1] for rel in manifest if rel.startswith(prefix) and rel.count("/") > 1}
            - set(model.versions)
        ):
            self._remove(f"{name}/{version}", manifest, staging, report)

        has_version = any(
            (self.cache / name / v).is_dir() and any(r.startswith(f"{name}/{v}/") for r in manifest)
            for v in model.versions
        )
        if has_version and spec_changed:
            # Written last: a model appears to the loader only once it has a version.
            _write_atomic(self.cache / spec_obj.rel, spec_bytes)
            manifest[spec_obj.rel] = spec_record
            self._write_manifest(manifest)

    def _sync_version(
        self,
        name: str,
        version: str,
        objects: dict[str, _Object],
        artifact: str | None,
        manifest: dict[str, dict[str, Any]],
        staging: Path,
        report: SyncReport,
    ) -> None:
        base = f"{name}/{version}/"
        owned = {rel for rel in manifest if rel.startswith(base)}
        target = self.cache / name / version
        unchanged = owned == {o.rel for o in objects.values()} and all(
            self._fresh(o, manifest) for o in objects.values()
        )
        if unchanged and target.is_dir():
            report.reused += len(objects)
            return

        if artifact is not None and not any(
            path == artifact or path.startswith(artifact + "/") for path in objects
        ):
            raise _VersionFailed(
                self.location.uri(base + artifact), "missing (model.toml names this artifact)"
            )
        sums: dict[str, str] = {}
        sums_obj = objects.get(SUMS_FILE)
        sums_fetched: tuple[bytes, dict[str, Any]] | None = None
        if sums_obj is not None:
            if self._fresh(sums_obj, manifest):
                sums_bytes = (self.cache / sums_obj.rel).read_bytes()
            else:
                sums_fetched = self._fetch_small(sums_obj)
                sums_bytes = sums_fetched[0]
            sums = _parse_sums(self.location.uri(sums_obj.rel), sums_bytes)
            for path in sorted(sums):
                if path not in objects:
                    raise _VersionFailed(
                        self.location.uri(base + path), f"missing (listed in {SUMS_FILE})"
                    )

        build = staging / f"{name}-{version}-{uuid.uuid4().hex[:8]}"
        records: dict[str, dict[str, Any]] = {}
        fetched: list[str] = []
        pending: list[tuple[_Object, Path, str | None]] = []
        for path, obj in sorted(objects.items()):
            dest = build / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            expected = sums.get(path)
            current = self.cache / obj.rel
            record = manifest.get(obj.rel)
            if record is not None and self._fresh(obj, manifest):
                if expected is not None and record.get("sha256") != expected:
                    raise _VersionFailed(
                        self.location.uri(obj.rel),
                        f"corrupt: SHA-256 {record.get('sha256')}, {SUMS_FILE} says {expected}",
                    )
                os.link(current, dest)  # same file system: the cache's own copy, no download
                records[obj.rel] = record
                report.reused += 1
            elif path == SUMS_FILE and sums_fetched is not None:  # fetched and checked above
                _write_atomic(dest, sums_fetched[0])
                records[obj.rel] = sums_fetched[1]
                fetched.append(self.location.uri(obj.rel))
            else:
                pending.append((obj, dest, expected))
        if pending:  # several objects at a time: a folder artifact may hold hundreds
            with ThreadPoolExecutor(min(_PARALLEL, len(pending)), "model-sync") as pool:
                futures = [(obj, pool.submit(self._fetch, obj, d, e)) for obj, d, e in pending]
                try:
                    for obj, future in futures:
                        records[obj.rel] = future.result()
                        fetched.append(self.location.uri(obj.rel))
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise

        (self.cache / name).mkdir(parents=True, exist_ok=True)
        if target.exists():
            old = staging / f"old-{name}-{version}-{uuid.uuid4().hex[:8]}"
            target.rename(old)
        build.rename(target)
        for rel in owned:
            manifest.pop(rel, None)
        manifest.update(records)
        self._write_manifest(manifest)
        report.downloaded.extend(fetched)

    def _remove(
        self,
        rel: str,
        manifest: dict[str, dict[str, Any]],
        staging: Path,
        report: SyncReport,
    ) -> None:
        """Drop a model or version the bucket no longer has (only what a sync wrote)."""
        path = self.cache / rel
        if path.exists():
            path.rename(staging / f"gone-{uuid.uuid4().hex[:8]}")
        for key in [k for k in manifest if k == rel or k.startswith(rel + "/")]:
            del manifest[key]
        self._write_manifest(manifest)
        report.removed.append(str(path))

    # ------------------------------------------------------------------ objects
    def _fresh(self, obj: _Object, manifest: dict[str, dict[str, Any]]) -> bool:
        """Whether the cache holds this exact object (same ETag and size) already."""
        record = manifest.get(obj.rel)
        if record is None or record.get("etag") != obj.etag or record.get("size") != obj.size:
            return False
        try:
            return (self.cache / obj.rel).stat().st_size == obj.size
        except OSError:
            return False

    def _fetch_small(self, obj: _Object) -> tuple[bytes, dict[str, Any]]:
        """A small object (model.toml, SHA256SUMS), verified, in memory."""
        uri = self.location.uri(obj.rel)
        if obj.size > _SMALL:
            raise _VersionFailed(uri, f"{obj.size} bytes; a file of this kind is never that big")
        chunks: list[bytes] = []
        record = self._download(obj, chunks.append, None)
        return b"".join(chunks), record

    def _fetch(self, obj: _Object, dest: Path, expected_sha256: str | None) -> dict[str, Any]:
        """Stream one object to ``dest`` (in a staging folder), verified; removed if bad."""
        try:
            with dest.open("wb") as out:
                record = self._download(obj, out.write, expected_sha256)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        return record

    def _download(self, obj: _Object, write: Any, expected_sha256: str | None) -> dict[str, Any]:
        uri = self.location.uri(obj.rel)
        sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        received = 0
        try:
            response = self.client.get_object(
                Bucket=self.location.bucket,
                Key=obj.key,
                IfMatch=f'"{obj.etag}"',  # the object listed, not one uploaded since
                ChecksumMode="ENABLED",
            )
            for chunk in response["Body"].iter_chunks(_CHUNK):
                received += len(chunk)
                sha256.update(chunk)
                md5.update(chunk)
                write(chunk)
        except _boto_errors() as exc:
            code = _error_code(exc)
            if code in ("NoSuchKey", "404"):
                raise _VersionFailed(uri, "missing (listed a moment ago, gone now)") from exc
            if code in ("PreconditionFailed", "412"):
                raise _VersionFailed(uri, "changed while it was being synced; sync again") from exc
            if type(exc).__name__ == "FlexibleChecksumError":  # botocore checked the store's
                raise _VersionFailed(
                    uri, f"corrupt: the store's checksum does not match ({exc})"
                ) from exc
            if code is not None:
                raise _VersionFailed(uri, _describe(exc)) from exc
            raise RepositoryUnavailable(f"cannot download {uri}: {_describe(exc)}") from exc

        if received != obj.size:
            raise _VersionFailed(uri, f"corrupt: {received} bytes received, {obj.size} expected")
        length = response.get("ContentLength")
        if length is not None and int(length) != obj.size:
            raise _VersionFailed(uri, f"corrupt: Content-Length {length}, {obj.size} listed")
        checks = ["size"]
        digest = sha256.hexdigest()
        stored = response.get("ChecksumSHA256")
        if stored and "-" not in stored and response.get("ChecksumType") != "COMPOSITE":
            stored_hex = base64.b64decode(stored).hex()
            if stored_hex != digest:
                raise _VersionFailed(
                    uri, f"corrupt: SHA-256 {digest}, the store's checksum is {stored_hex}"
                )
            checks.append("s3-sha256")
        if expected_sha256 is not None:
            if expected_sha256 != digest:
                raise _VersionFailed(
                    uri, f"corrupt: SHA-256 {digest}, {SUMS_FILE} says {expected_sha256}"
                )
            checks.append("sha256sums")
        if _etag_is_md5(obj.etag, response):
            if md5.hexdigest() != obj.etag.lower():
                raise _VersionFailed(
                    uri, f"corrupt: MD5 {md5.hexdigest()}, the ETag says {obj.etag}"
                )
            checks.append("etag-md5")
        return {"size": obj.size, "etag": obj.etag, "sha256": digest, "verified": checks}

    # ------------------------------------------------------------------ cache files
    @contextlib.contextmanager
    def _cache_lock(self) -> Iterator[None]:
        """One sync at a time per cache folder, across processes (serve, worker, list)."""
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            handle = (self.cache / ".sync.lock").open("a")
        except OSError as exc:
            raise ConfigError(f"cannot use the model cache {self.cache}: {exc}") from exc
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read_manifest(self) -> dict[str, dict[str, Any]]:
        """The cache's manifest; a cache of another bucket starts over (its files are removed
        as models the bucket does not have)."""
        path = self.cache / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("model cache manifest unreadable; syncing everything", detail=repr(exc))
            return {}
        objects = data.get("objects") if isinstance(data, dict) else None
        if not isinstance(objects, dict):
            return {}
        if data.get("source") != self.source:
            # Another bucket's copy: forget its records so that nothing is trusted, but keep
            # the paths so that the sync removes the models this bucket does not have.
            return {rel: {} for rel in objects}
        return objects

    def _write_manifest(self, manifest: dict[str, dict[str, Any]]) -> None:
        body = {"source": self.source, "objects": dict(sorted(manifest.items()))}
        _write_atomic(self.cache / MANIFEST, json.dumps(body, indent=1).encode())


def create_syncer(settings: Any) -> RemoteRepository | None:
    """The syncer of a remote repository, or None when the repository is a local folder."""
    if getattr(settings, "model_repository", None) is None:
        return None
    return RemoteRepository.from_settings(settings)


# ---------------------------------------------------------------------- helpers
def _place(models: dict[str, _RemoteModel], obj: _Object) -> None:
    """File one listed object under its model and version; keys of no model are ignored."""
    parts = obj.rel.split("/")
    if len(parts) < 2 or not _NAME.match(parts[0]) or obj.rel.endswith("/"):
        return  # not part of a model (or a folder marker)
    model = models.setdefault(parts[0], _RemoteModel(parts[0]))
    if len(parts) == 2:
        if parts[1] == "model.toml":
            model.spec = obj
        return
    version = parts[1]
    if not version.isdigit() or int(version) <= 0:
        return
    inner = parts[2:]
    if any(part in ("", ".", "..") for part in inner):
        model.bad_keys.setdefault(version, obj.rel)
        return
    model.versions.setdefault(version, {})["/".join(inner)] = obj


def _artifact_name(uri: str, name: str, spec_bytes: bytes) -> str | None:
    """The artifact file each version must have, from the model's ``model.toml``."""
    try:
        raw = tomllib.loads(spec_bytes.decode("utf-8"))
        raw.setdefault("name", name)
        return ModelSpec.model_validate(raw).artifact_name
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise _VersionFailed(uri, f"invalid model.toml: {detail}") from exc


def _parse_sums(uri: str, data: bytes) -> dict[str, str]:
    """``sha256sum`` output: ``<hex>  <path>`` per line (``*path`` for binary mode too)."""
    sums: dict[str, str] = {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _VersionFailed(uri, "not UTF-8 text") from exc
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _SUMS_LINE.match(line.strip())
        if match is None:
            raise _VersionFailed(uri, f"line {number} is not '<sha256>  <path>'")
        path = match.group(2).strip()
        path = path.removeprefix("./")
        sums[path] = match.group(1).lower()
    return sums


def _etag_is_md5(etag: str, response: dict[str, Any]) -> bool:
    """A single-part upload without KMS or customer keys has the MD5 of its bytes as ETag."""
    if len(etag) != 32 or any(c not in "0123456789abcdefABCDEF" for c in etag):
        return False  # multipart ("<md5>-<parts>") or some other store's scheme
    if str(response.get("ServerSideEncryption", "")).startswith("aws:kms"):
        return False
    return not response.get("SSECustomerAlgorithm")


def _write_atomic(path: Path, data: bytes) -> None:
    """Write a temporary file beside ``path`` and rename it over: readers see old or new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _boto_errors() -> tuple[type[Exception], ...]:
    """What boto3 raises for a failed call: an error answer, or no answer at all."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def _describe(exc: BaseException) -> str:
    """A one-line reason a person can act on."""
    code = _error_code(exc)
    name = type(exc).__name__
    if name == "NoCredentialsError":
        return (
            "no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or use an instance role)"
        )
    if code == "NoSuchBucket":
        return "the bucket does not exist"
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
        return f"access denied ({code}): check the credentials and the bucket policy"
    return f"{name}: {exc}"
