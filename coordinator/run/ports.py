"""Which address and ports the coordinator listens on: checked before a run is built, and remembered.

A port given as 0 is chosen once and stored in the run's state, so later starts of the same data
dir reuse it (peers and bookmarks keep working across restarts) while it is free.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import TypeVar

from crowdtrain.coordinator.errors import PortInUseError
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.peer.errors import CrowdtrainError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class PublicHostError(CrowdtrainError):
    """--public-host cannot be announced; the message says what to give instead."""


def guess_public_host(host: str) -> str:
    """`host` itself, or for 0.0.0.0 the address of the interface that routes to the internet."""
    if host not in ("0.0.0.0", ""):
        return host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET address: no packet is sent, only a route is chosen
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def dht_announce_host(public_host: str) -> str:
    """The IPv4 address the bootstrap DHT node announces (its multiaddr is /ip4/ADDRESS/tcp/PORT):
    `public_host` itself, or the address its name resolves to now (a name such as the one a TLS
    certificate holds made an unparseable multiaddr, and the node hung at start)."""
    try:
        return str(ipaddress.IPv4Address(public_host))
    except ValueError:
        pass
    try:
        return socket.getaddrinfo(public_host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except OSError as e:
        raise PublicHostError(
            f"--public-host {public_host!r} has no IPv4 address ({e}); the DHT node announces "
            "/ip4/ADDRESS/tcp/PORT: give an IPv4 address, or a name that resolves to one"
        ) from None


def check_port_free(host: str, port: int, flag: str) -> None:
    """Raise PortInUseError naming `flag` when `port` (not 0) cannot be bound on `host`."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PortInUseError(
                f"cannot listen on {host}:{port} ({e.strerror}); another process uses it - stop it or pass {flag} 0"
            ) from None


def bind_remembered(
    store: Store, key: str, requested: int, bind: Callable[[int], T], port_of: Callable[[T], int]
) -> T:
    """Bind `requested`; with 0, reuse the port stored under `key` last time and fall back to a free
    one if it is taken. The bound port (`port_of` the result) is stored for the next start."""
    stored = int(store.get_meta(key) or 0)
    if requested or not stored:
        result = bind(requested)
    else:
        try:
            result = bind(stored)
        except (OSError, PortInUseError):
            logger.warning("port %d used by this run before is taken; picking a free one", stored)
            result = bind(0)
    store.set_meta({key: str(port_of(result))})
    return result


def tcp_port(maddr: str) -> int:
    """The TCP port of a multiaddr such as /ip4/1.2.3.4/tcp/4321/p2p/Qm..."""
    return int(maddr.split("/tcp/")[1].split("/")[0])
