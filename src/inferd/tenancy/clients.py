"""Who is calling when no API key says so: the client's address, for per-address limits.

The address is the TCP peer of the connection, unless that peer is a trusted proxy
(``trusted_proxies``): then ``X-Forwarded-For`` is read from the right (the hop nearest this
server), skipping trusted proxies, and the first address that is not one is the client. A
forwarded value that is not an IP address ends the walk at the hop that wrote it, so a client
cannot choose its own address by sending a made-up header through an honest proxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from inferd.tenancy.enforce import Enforcer
from inferd.tenancy.limits import RateDecision, parse_rate

__all__ = ["AddressLimit", "ClientAddresses", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """``"10.0.0.0/8"``, ``"192.0.2.7"``, ``"::1"`` as networks; :class:`ValueError` saying
    which entry is not one."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"invalid trusted proxy {entry!r}: expected an IP address or a CIDR network "
                "such as 10.0.0.0/8"
            ) from None
    return tuple(networks)


def _address(text: str) -> Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "192.0.2.1:8080"
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ClientAddresses:
    """Reads the client address of an ASGI request (see the module's docstring)."""

    def __init__(self, trusted: Iterable[str] = ()) -> None:
        self.trusted = parse_networks(trusted)

    def is_trusted(self, address: Address) -> bool:
        return any(address in network for network in self.trusted)

    def __call__(self, scope: dict[str, Any]) -> str:
        """The client's address as text; ``"unknown"`` when the server was not told the peer
        (every such request then shares one limit)."""
        client = scope.get("client")
        peer = _address(client[0]) if client else None
        if peer is None:
            return client[0] if client else "unknown"
        if not self.trusted or not self.is_trusted(peer):
            return str(peer)
        forwarded: list[str] = []
        for name, value in scope["headers"]:
            if name == b"x-forwarded-for":
                forwarded.extend(value.decode("latin-1").split(","))
        current = peer
        for hop in reversed(forwarded):
            address = _address(hop)
            if address is None:
                break  # written by the client: the hop that passed it on is the client
            current = address
            if not self.is_trusted(address):
                break
        return str(current)


class AddressLimit:
    """The rate of requests without an API key, per client address (``anonymous_rate``)."""

    def __init__(self, enforcer: Enforcer, rate: str, trusted: Iterable[str] = ()) -> None:
        self.enforcer = enforcer
        self.rate = parse_rate(rate)
        self.addresses = ClientAddresses(trusted)

    async def admit(self, scope: dict[str, Any]) -> RateDecision:
        """Count the request against its address; :class:`RateLimited` when over."""
        return await self.enforcer.admit_address(self.addresses(scope), self.rate)
