"""How many HTTP connections one client address, and everyone together, may hold open.

The HTTP server (`webserver`) is open to the internet: without a cap per address, one address
holding a few hundred kept-alive connections (one tiny request each every few seconds) takes every
connection the server allows, and everyone else gets 503. So:

    allowed, why = admit(held=16, host="203.0.113.7", max_per_address=16, uncapped=("127.0.0.1",))

A connection over `max_per_address` of its address (an IPv6 client by its /64, `address_key`) is
answered 503 and closed as soon as it is made; over `max_connections` in all, likewise. This
machine's own addresses (`uncapped`, 127.0.0.1 and ::1 by default) have no cap of their own: a
reverse proxy or tunnel on it connects from there on behalf of many callers, so only the global cap
bounds it (the proxy must cap its clients itself). No torch, no hivemind.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Collection

from aiohttp import web

logger = logging.getLogger(__name__)

WARN_EVERY_S = 10.0


def _busy(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
        b"Retry-After: 5\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )


SERVER_BUSY = _busy(b"too many connections; retry in a moment\n")
ADDRESS_BUSY = _busy(b"too many connections from your address; close some and retry\n")


def plain_host(remote: str) -> str:
    """A client's address as text, an IPv4-mapped IPv6 one (::ffff:1.2.3.4) as its IPv4."""
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped if mapped is not None else address)


def address_key(remote: str) -> str:
    """The key a client address is counted by (connections, rate limits): itself, or for IPv6 its
    /64 network (one host commonly holds a whole /64)."""
    host = plain_host(remote)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return host


def admit(held: int, host: str, max_per_address: int, uncapped: Collection[str]) -> tuple[bool, str]:
    """(whether a new connection from `host` is kept, why not), given the `held` connections of its
    address key."""
    if plain_host(host) in uncapped:
        return True, ""
    if held >= max_per_address:
        return False, f"{address_key(host)} holds {held} connections, the most one address may"
    return True, ""


class _Busy(asyncio.Protocol):
    """The protocol of a connection over `max_connections`: answer 503 and close."""

    def connection_made(self, transport) -> None:
        transport.write(SERVER_BUSY)
        transport.close()


class BoundedServer(web.Server):
    """aiohttp's low-level server, refusing connections beyond `max_connections` in all (before
    they are handled) and beyond `max_per_address` per address key (as soon as the address is
    known, when the connection is made)."""

    def __init__(
        self, handler, max_connections: int, max_per_address: int, uncapped: Collection[str], **kwargs
    ):
        super().__init__(handler, **kwargs)
        self.max_connections, self.max_per_address = max_connections, max_per_address
        self.uncapped = frozenset(plain_host(h) for h in uncapped)
        self.refused = 0
        self._held: dict[str, int] = {}  # address key -> connections counted against it
        self._key_of: dict[object, str] = {}  # handler -> its address key
        self._warned_at = -float("inf")

    def __call__(self):
        if len(self.connections) < self.max_connections:
            return super().__call__()
        self._refuse(f"{self.max_connections} connections open")
        return _Busy()

    def connection_made(self, handler, transport) -> None:
        super().connection_made(handler, transport)  # counted until connection_lost either way
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if peer else ""
        key = address_key(host)
        allowed, why = admit(self._held.get(key, 0), host, self.max_per_address, self.uncapped)
        if not allowed:
            self._refuse(why)
            transport.write(ADDRESS_BUSY)
            transport.close()  # the handler's connection_lost follows
            return
        self._held[key] = self._held.get(key, 0) + 1
        self._key_of[handler] = key

    def connection_lost(self, handler, exc: BaseException | None = None) -> None:
        key = self._key_of.pop(handler, None)
        if key is not None:
            self._held[key] -= 1
            if not self._held[key]:
                del self._held[key]
        super().connection_lost(handler, exc)

    def _refuse(self, why: str) -> None:
        self.refused += 1
        if time.monotonic() - self._warned_at > WARN_EVERY_S:
            self._warned_at = time.monotonic()
            logger.warning("HTTP: %s, refusing more with 503 (%d refused so far)", why, self.refused)
