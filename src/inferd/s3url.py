"""``s3://bucket/prefix`` URLs of model repositories: parsed and checked in one place.

Settings check a configured repository with it; :mod:`inferd.models.storage` reads the bucket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from inferd.errors import ConfigError

__all__ = ["S3Location", "parse_s3_url"]

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,254}$")


@dataclass(frozen=True, slots=True)
class S3Location:
    """A bucket and a key prefix (empty, or ending with ``/``)."""

    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, rel: str) -> str:
        return self.prefix + rel

    def uri(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{rel}"


def parse_s3_url(url: str) -> S3Location:
    """``s3://bucket[/prefix]`` → :class:`S3Location`; anything else is a ConfigError."""
    if not url.startswith("s3://"):
        raise ConfigError(f"{url!r} is not an s3:// URL (expected s3://bucket/prefix)")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not _BUCKET.match(bucket):
        raise ConfigError(f"{url!r}: {bucket!r} is not a valid bucket name")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise ConfigError(f"{url!r}: the prefix may not contain empty, '.' or '..' parts")
    return S3Location(bucket, prefix + "/" if prefix else "")
