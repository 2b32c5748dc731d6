"""Where a password attempt comes from, decided at the edge (contract v2, "Throttling by
source").

The source is the client address a gateway reports, when the caller is a broker user listed
in IDENTITY_GATEWAYS (RabbitMQ has validated the `user_id`, so the worker knows which caller
it is); otherwise the caller itself. Another caller's `client_ip` is kept for audit and never
trusted: a service that is not a gateway could otherwise invent a fresh address for every
guess, and be a new source each time.

Addresses are normalised so that one client is one source: an IPv4-mapped IPv6 address is its
IPv4 address, and an IPv6 address counts as its /64 (the block one subscriber line gets: an
attacker holding one has 2^64 addresses, each of which would otherwise be a new source). A
reported address that is not an IP address counts as the gateway itself.
"""

from __future__ import annotations

import ipaddress

from messages import Metadata

NO_CALLER = "caller:-"
IPV6_SOURCE_PREFIX = 64


def client_address(reported: str) -> str | None:
    """The normalised source name of a reported client address; None if it is none."""
    try:
        address = ipaddress.ip_address(reported.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_SOURCE_PREFIX), strict=False))
    return str(address)


def throttle_source(caller: str | None, metadata: Metadata | None, gateways: frozenset[str]) -> str:
    """`ip:<address>` for a gateway's reported client, else `caller:<user_id>`, else (no
    `user_id`, which only dev mode's open policy lets through) `caller:-`."""
    if caller is not None and caller in gateways and metadata is not None:
        reported = metadata.client_ip
        address = client_address(reported) if reported else None
        if address is not None:
            return f"ip:{address}"
    return NO_CALLER if caller is None else f"caller:{caller}"
