"""Can other peers reach this peer? The coordinator dials what the peer announces, and says what to fix.

A peer behind NAT announces addresses nobody outside can dial: it must then run in client mode (it
connects out; nobody connects in) or averaging rounds stall waiting for it. After its DHT starts,
the peer sends its announced multiaddrs (`CheckReachability`); the coordinator opens a TCP
connection to each announced address that it may dial, and answers reachable or not, with advice:

    targets, skipped = dial_targets("203.0.113.7", ["/ip4/192.168.1.5/tcp/4001/p2p/Qm..."])
    reachable, advice = verdict("203.0.113.7", announced, dialed_ok=[], forwarded_ok=[...])

Only addresses that cannot turn the coordinator into a scanner of someone else's network are dialed:
the address the peer's own connection comes from, or a globally routable one (never another
private, loopback or link-local host), at most `MAX_DIALS`, each once, with a short timeout; and the
servicer rate-limits the RPC per session. A successful TCP connect is the test: it shows the port is
open to the internet at that address, which is what other peers need (the libp2p handshake that
follows authenticates the peer to them).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)

MAX_DIALS = 4
DIAL_TIMEOUT_S = 3.0


def parse_maddr(maddr: str) -> tuple[str, int] | None:
    """(ip, tcp port) of "/ip4/1.2.3.4/tcp/4001[/p2p/...]" (or ip6); None for anything else."""
    parts = maddr.split("/")
    if len(parts) < 5 or parts[0] != "" or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        return None
    try:
        ip, port = ipaddress.ip_address(parts[2]), int(parts[4])
    except ValueError:
        return None
    if (ip.version == 4) != (parts[1] == "ip4") or not 0 < port < 65536:
        return None
    return str(ip), port


def _same_host(a: str, b: str) -> bool:
    try:
        ip_a, ip_b = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return False
    mapped = getattr(ip_b, "ipv4_mapped", None)  # a dual-stack server may see ::ffff:1.2.3.4
    return ip_a == ip_b or (mapped is not None and ip_a == mapped)


def dial_targets(seen_host: str, maddrs: Sequence[str]) -> tuple[list[tuple[str, int]], list[str]]:
    """(addresses to dial, announced addresses it will not dial, each with why)."""
    targets: list[tuple[str, int]] = []
    skipped: list[str] = []
    for maddr in maddrs:
        parsed = parse_maddr(maddr)
        if parsed is None:
            skipped.append(f"{maddr[:80]} (not an IP and TCP port)")
            continue
        ip = ipaddress.ip_address(parsed[0])
        if not (_same_host(parsed[0], seen_host) or ip.is_global):
            skipped.append(f"{parsed[0]}:{parsed[1]} (a private address other peers cannot dial)")
        elif parsed not in targets and len(targets) < MAX_DIALS:
            targets.append(parsed)
    return targets, skipped


def forwarded_targets(seen_host: str, maddrs: Sequence[str]) -> list[tuple[str, int]]:
    """The announced ports at the address the peer connects from: open there means the peer's
    port forwarding works and only its announced address is wrong."""
    try:
        ipaddress.ip_address(seen_host)
    except ValueError:
        return []
    ports = sorted({p[1] for p in map(parse_maddr, maddrs) if p is not None})
    return [(seen_host, port) for port in ports[:MAX_DIALS]]


def tcp_dial(host: str, port: int, timeout_s: float = DIAL_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def verdict(
    seen_host: str, announced: Sequence[str], dialed_ok: Sequence[str], forwarded_ok: Sequence[int]
) -> tuple[bool, str]:
    """(reachable, what would make it reachable: "" when it is)."""
    if dialed_ok:
        return True, ""
    ports = sorted({p[1] for p in map(parse_maddr, announced) if p is not None})
    port = str(ports[0]) if ports else "N"
    if forwarded_ok:
        return False, (
            f"port {forwarded_ok[0]} is open at {seen_host}, but this peer announces "
            f"{', '.join(announced[:3]) or 'nothing'}: restart it with --announce-host {seen_host} "
            f"--listen-port {forwarded_ok[0]}"
        )
    return False, (
        f"nobody can connect to this peer (the coordinator sees it at {seen_host}). To make it a full "
        f"peer: give it a public IP, or forward TCP port {port} on your router to this machine and "
        f"restart with --listen-port {port} --announce-host <your public IP>; open that port in the "
        "firewall. Until then it trains in client mode (it connects out; its rounds go through full peers)"
    )


def check(
    seen_host: str, maddrs: Sequence[str], dial: Callable[[str, int], bool] = tcp_dial, who: str = "a peer"
) -> tuple[bool, list[str], str]:
    """(reachable, what was dialed, advice): the whole check, with an injectable `dial`."""
    targets, skipped = dial_targets(seen_host, maddrs)
    ok = [f"{h}:{p}" for h, p in targets if dial(h, p)]
    dialed = [f"{h}:{p}" for h, p in targets]
    forwarded: list[int] = []
    if not ok:
        forwarded = [
            p for h, p in forwarded_targets(seen_host, maddrs) if (h, p) not in targets and dial(h, p)
        ]
    reachable, advice = verdict(seen_host, list(maddrs), ok, forwarded)
    if skipped:
        logger.debug("reachability of %s: not dialed %s", seen_host, "; ".join(skipped))
    verdict_text = "reachable" if reachable else "unreachable"
    logger.info(
        "peer %r at %s is %s (dialed %s)", who, seen_host, verdict_text, ", ".join(dialed) or "nothing"
    )
    return reachable, dialed, advice


def host_of(grpc_peer: str) -> str:
    """The IP in a gRPC `context.peer()` string ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678"); "" if none."""
    kind, _, rest = grpc_peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return ""
