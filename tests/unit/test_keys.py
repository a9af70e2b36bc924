"""API key format, route scopes and the auth setting."""

from __future__ import annotations

import pytest

from inferd.errors import ConfigError
from inferd.settings import Settings
from inferd.tenancy.auth import required_scope
from inferd.tenancy.keys import generate_key, hash_key, parse_key


def test_generated_keys_parse_and_are_unique() -> None:
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200
    for key, key_id in keys:
        assert key.startswith(f"inferd_{key_id}_")
        assert len(key) == len("inferd_") + 12 + 1 + 32 + 6
        assert parse_key(key) == key_id


def test_mangled_keys_do_not_parse() -> None:
    key, _ = generate_key()
    flipped = key[:-7] + ("a" if key[-7] != "a" else "b") + key[-6:]
    assert parse_key(flipped) is None  # checksum catches a typo
    assert parse_key(key[:-1]) is None
    assert parse_key("Bearer " + key) is None
    assert parse_key("") is None
    assert parse_key(key.upper()) is None


def test_hash_is_sha256_hex() -> None:
    assert len(hash_key("x")) == 64
    assert hash_key("x") != hash_key("y")


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("GET", "/health/ready", None),
        ("GET", "/metrics", None),
        ("GET", "/docs", None),
        ("POST", "/predict", "predict"),
        ("POST", "/v1/models/iris/predict", "predict"),
        ("GET", "/v1/models", "predict"),
        ("POST", "/v1/requests", "requests"),
        ("GET", "/v1/requests/req_1/events", "requests"),
        ("GET", "/v1/usage", ""),
        ("POST", "/openai/v1/chat/completions", "predict"),
        ("GET", "/openai/v1/models", "predict"),
        ("POST", "/v1/models/iris/load", "admin"),
    ],
)
def test_route_scopes(method: str, path: str, scope: str | None) -> None:
    assert required_scope(method, path) == scope


def test_auth_defaults_follow_the_bind_address() -> None:
    assert Settings(_env_file=None).auth_required is False  # type: ignore[call-arg]
    assert Settings(_env_file=None, host="0.0.0.0").auth_required is True  # type: ignore[call-arg]
    assert Settings(_env_file=None, host="::1").auth_required is False  # type: ignore[call-arg]
    assert Settings(_env_file=None, auth="required").auth_required is True  # type: ignore[call-arg]


def test_auth_off_is_refused_off_loopback() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        Settings.load(host="0.0.0.0", auth="off")
