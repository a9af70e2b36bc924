"""A real S3 API on loopback (moto's server) and helpers to fill and damage buckets.

The server runs in a thread of the test process, so a test can also reach into its storage
to damage an object's bytes behind the API's back (what a failing disk would do): the
object keeps its listed size, ETag and stored checksum.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer

ACCOUNT = "123456789012"  # moto's default account
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_MAX_ATTEMPTS": "1",  # an unreachable endpoint fails at once
}


class S3:
    """The moto server at ``endpoint`` and a client for the test's own calls."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            # Plain uploads carry no checksum (as from older tools); sha256=True adds one.
            config=Config(
                s3={"addressing_style": "path"}, request_checksum_calculation="when_required"
            ),
        )

    def bucket(self) -> str:
        """A new empty bucket with a unique name."""
        name = f"models-{secrets.token_hex(4)}"
        self.client.create_bucket(Bucket=name)
        return name

    def put(self, bucket: str, key: str, body: bytes, *, sha256: bool = False) -> None:
        """Upload one object; ``sha256`` asks the store to keep its SHA-256 checksum."""
        extra = {"ChecksumAlgorithm": "SHA256"} if sha256 else {}
        self.client.put_object(Bucket=bucket, Key=key, Body=body, **extra)

    def upload(
        self, folder: Path, bucket: str, prefix: str, *, sha256: bool = False, sums: bool = False
    ) -> list[str]:
        """Upload every file under ``folder`` to ``prefix/``; ``sums`` writes a SHA256SUMS in
        each version folder (``<model>/<version>/``). Returns the keys written."""
        keys = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            key = f"{prefix}/{rel}" if prefix else rel
            self.put(bucket, key, path.read_bytes(), sha256=sha256)
            keys.append(key)
        if sums:
            for version in sorted(p for p in folder.glob("*/*") if p.is_dir()):
                rel = version.relative_to(folder).as_posix()
                key = f"{prefix}/{rel}/SHA256SUMS" if prefix else f"{rel}/SHA256SUMS"
                self.put(bucket, key, sha256sums(version))
                keys.append(key)
        return keys

    def keys(self, bucket: str) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=bucket).get("Contents", [])
        return [item["Key"] for item in listed]

    def damage(self, bucket: str, key: str) -> None:
        """Flip the first byte of an object's stored bytes, keeping its size, ETag and
        checksum as listed: the API still says it is the object uploaded."""
        from moto.s3.models import s3_backends

        stored = s3_backends[ACCOUNT]["aws"].get_object(bucket, key)
        assert stored is not None
        stored.etag  # computed from the good bytes before they change  # noqa: B018
        data = bytearray(stored.value)
        data[0] ^= 0xFF
        stored.value = bytes(data)


def sha256sums(version: Path) -> bytes:
    """``sha256sum``'s output for the files of a version folder."""
    lines = [
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(version).as_posix()}"
        for p in sorted(version.rglob("*"))
        if p.is_file() and p.name != "SHA256SUMS"
    ]
    return ("\n".join(lines) + "\n").encode()


def b64_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def start_moto() -> tuple[ThreadedMotoServer, str]:
    """Start moto's S3 server on a free loopback port."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    server, endpoint = start_moto()
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3:
    """The server, with boto3's credential chain pointed at test credentials only."""
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return S3(s3_endpoint)
