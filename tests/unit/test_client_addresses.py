"""The client address behind per-address limits: the peer, or X-Forwarded-For from a proxy."""

from __future__ import annotations

from typing import Any

import pytest

from inferd.errors import ConfigError
from inferd.settings import Settings
from inferd.tenancy.clients import ClientAddresses


def scope(peer: str | None, *forwarded: str) -> dict[str, Any]:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    return {"client": (peer, 5000) if peer else None, "headers": headers}


def test_the_peer_is_the_client_without_trusted_proxies() -> None:
    read = ClientAddresses()
    assert read(scope("192.0.2.7", "198.51.100.1")) == "192.0.2.7"
    assert read(scope(None)) == "unknown"


def test_a_trusted_proxy_forwards_the_rightmost_untrusted_hop() -> None:
    read = ClientAddresses(["10.0.0.0/8", "127.0.0.1"])
    # The client claims 1.1.1.1; the proxy appended the address it saw (203.0.113.5).
    assert read(scope("127.0.0.1", "1.1.1.1, 203.0.113.5, 10.1.2.3")) == "203.0.113.5"
    assert read(scope("10.0.0.9", "203.0.113.5")) == "203.0.113.5"
    # Several header lines are one list, in order.
    assert read(scope("10.0.0.9", "1.1.1.1", "203.0.113.6")) == "203.0.113.6"
    # An untrusted peer's header means nothing.
    assert read(scope("192.0.2.7", "203.0.113.5")) == "192.0.2.7"
    # Every hop trusted: the leftmost is the client; none forwarded: the proxy itself.
    assert read(scope("10.0.0.9", "10.0.0.1")) == "10.0.0.1"
    assert read(scope("10.0.0.9")) == "10.0.0.9"


def test_a_forged_hop_stops_the_walk_at_the_proxy_that_passed_it() -> None:
    read = ClientAddresses(["10.0.0.0/8"])
    assert read(scope("10.0.0.9", "not-an-address")) == "10.0.0.9"
    assert read(scope("10.0.0.9", "203.0.113.5, junk, 10.0.0.2")) == "10.0.0.2"
    # Ports and IPv6 brackets are read; an IPv4-mapped IPv6 address is the IPv4 one.
    assert read(scope("10.0.0.9", "203.0.113.5:4711")) == "203.0.113.5"
    assert read(scope("10.0.0.9", "[2001:db8::1]:443")) == "2001:db8::1"
    assert read(scope("::ffff:10.0.0.9", "::ffff:203.0.113.5")) == "203.0.113.5"


def test_settings_refuse_bad_proxies_and_origins() -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        trusted_proxies="10.0.0.0/8, ::1",
        cors_origins="https://app.example.com/, http://localhost:3000",
    )
    assert settings.trusted_proxies == ["10.0.0.0/8", "::1"]
    assert settings.cors_origins == ["https://app.example.com", "http://localhost:3000"]
    with pytest.raises(ValueError, match=r"invalid trusted proxy 'proxy\.local'"):
        Settings(_env_file=None, trusted_proxies="proxy.local")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match=r"invalid CORS origin 'app\.example\.com'"):
        Settings(_env_file=None, cors_origins="app.example.com")  # type: ignore[call-arg]
    from inferd.app import create_app

    with pytest.raises(ConfigError, match="anonymous_rate"):
        create_app(Settings(_env_file=None, anonymous_rate="lots"))  # type: ignore[call-arg]
