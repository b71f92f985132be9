"""Can other peers reach this peer? The coordinator dials what the peer announces, and says what to fix.

A peer behind NAT announces addresses nobody outside can dial: it must then run in client mode (it
connects out; nobody connects in) or averaging rounds stall waiting for it. After its DHT starts,
the peer sends its announced multiaddrs (`CheckReachability`); the coordinator opens a TCP
connection to each announced address that it may dial, and answers reachable or not, with advice:

    targets, skipped = dial_targets("93.184.216.34", ["/ip4/192.168.1.5/tcp/4001/p2p/Qm..."])
    reachable, advice = verdict("93.184.216.34", announced, dialed_ok=[], forwarded_ok=[...])

Only globally routable addresses are dialed (`may_dial`), never a loopback, private, link-local,
multicast, reserved or unspecified one, nor an IPv6 spelling of one (IPv4-mapped or -compatible,
NAT64 `64:ff9b::/96`, 6to4 `2002::/16`, Teredo), not even when it is the address the caller's own
connection comes from: behind a reverse proxy or tunnel on the coordinator's machine every caller
is 127.0.0.1, and dialing it would let any session probe the coordinator's own ports. At most
`MAX_DIALS`, each once, with a short timeout; the servicer rate-limits the RPC per session. A
successful TCP connect is the test: it shows the port is open to the internet at that address,
which is what other peers need (the libp2p handshake that follows authenticates the peer to them).

Where the caller's own address cannot be dialed (a loopback proxy, a private network) and nothing
announced answered, the check cannot be done from here: `check` raises `NotServedError` saying so,
and the peer stays a full peer. The operator's two settings (`ReachSettings`): `--trusted-proxy`
names reverse proxies whose `x-forwarded-for` gives the caller's real address (`caller_host`; never
believed from anyone else), and `--allow-loopback-dial` lets a swarm on one machine (tests, the
demo) check loopback addresses of callers on loopback.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from crowdtrain.coordinator.errors import NotServedError
from crowdtrain.coordinator.flood.ratelimit import caller_key
from crowdtrain.peer.errors import CrowdtrainError

logger = logging.getLogger(__name__)

MAX_DIALS = 4
DIAL_TIMEOUT_S = 3.0
FORWARDED_FOR = "x-forwarded-for"  # the gRPC metadata key a trusted proxy names the caller in
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class ReachSettings:
    """The operator's say over the check (`--allow-loopback-dial`, `--trusted-proxy`)."""

    # dial 127.0.0.1/::1 for a caller on loopback: a swarm on one machine only (tests, demo), never
    # behind a reverse proxy or tunnel, where every caller is on loopback
    allow_loopback_dial: bool = False
    # comma-separated addresses or networks of reverse proxies in front of the gRPC API; a call from
    # one comes from the last address of the x-forwarded-for metadata the proxy appends
    trusted_proxy: str = ""

    def __post_init__(self) -> None:
        if self.proxy_networks() and self.allow_loopback_dial:  # and a typo fails at start-up
            raise CrowdtrainError(
                "--allow-loopback-dial is for a swarm on one machine, --trusted-proxy for a coordinator "
                "behind a reverse proxy (a misconfigured one would let callers name 127.0.0.1): give only one"
            )

    def proxy_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The trusted proxies' networks; CrowdtrainError naming the setting when one is malformed."""
        try:
            return [ipaddress.ip_network(p.strip()) for p in self.trusted_proxy.split(",") if p.strip()]
        except ValueError as e:
            raise CrowdtrainError(
                f"--trusted-proxy {self.trusted_proxy!r} is not a list of IP addresses or networks ({e}): "
                "give the address your reverse proxy connects from, e.g. --trusted-proxy 127.0.0.1"
            ) from None


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


def _plain(ip: Address) -> Address:
    """An IPv4-mapped IPv6 address (a dual-stack server sees ::ffff:1.2.3.4) as the IPv4 it is."""
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address spells: IPv4-compatible or -translated (::/96,
    ::ffff:0:0:0/96), NAT64, 6to4, Teredo (server and client)."""
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if int(ip) >> 32 in (0, 0xFFFF0000) or any(ip in net for net in _NAT64):
        return [low32]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    return list(ip.teredo or ())


def _refusal(ip: Address) -> str:
    """Why an address is never dialed ("" if it may be)."""
    if ip.is_loopback:
        return "a loopback address: the coordinator's own machine"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return "an unspecified, multicast or reserved address"
    if ip.is_link_local:
        return "a link-local address (a cloud metadata service lives there)"
    if ip.is_private or not ip.is_global or getattr(ip, "is_site_local", False):
        return "a private address other peers cannot dial"
    return ""


def may_dial(host: str, seen_host: str, settings: ReachSettings = ReachSettings()) -> tuple[bool, str]:
    """(whether the coordinator may dial `host` for a caller at `seen_host`, why not)."""
    try:
        ip = _plain(ipaddress.ip_address(host))
    except ValueError:
        return False, "not an IP address"
    if ip.is_loopback and settings.allow_loopback_dial and _is_loopback(seen_host):
        return True, ""  # a swarm on one machine (--allow-loopback-dial)
    why = _refusal(ip)
    if not why and isinstance(ip, ipaddress.IPv6Address):
        inner = [_refusal(v4) for v4 in _embedded_ipv4(ip)]
        why = next((f"an IPv6 spelling of {w}" for w in inner if w), "")
    return not why, why


def _is_loopback(host: str) -> bool:
    try:
        return _plain(ipaddress.ip_address(host)).is_loopback
    except ValueError:
        return False


def dial_targets(
    seen_host: str, maddrs: Sequence[str], settings: ReachSettings = ReachSettings()
) -> tuple[list[tuple[str, int]], list[str]]:
    """(addresses to dial, announced addresses it will not dial, each with why)."""
    targets: list[tuple[str, int]] = []
    skipped: list[str] = []
    for maddr in maddrs:
        parsed = parse_maddr(maddr)
        if parsed is None:
            skipped.append(f"{maddr[:80]} (not an IP and TCP port)")
            continue
        target = (str(_plain(ipaddress.ip_address(parsed[0]))), parsed[1])
        allowed, why = may_dial(target[0], seen_host, settings)
        if not allowed:
            skipped.append(f"{parsed[0]}:{parsed[1]} ({why})")
        elif target not in targets and len(targets) < MAX_DIALS:
            targets.append(target)
    return targets, skipped


def forwarded_targets(
    seen_host: str, maddrs: Sequence[str], settings: ReachSettings = ReachSettings()
) -> list[tuple[str, int]]:
    """The announced ports at the address the peer connects from, if it may be dialed: open there
    means the peer's port forwarding works and only its announced address is wrong."""
    if not may_dial(seen_host, seen_host, settings)[0]:
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
    seen_host: str,
    maddrs: Sequence[str],
    dial: Callable[[str, int], bool] = tcp_dial,
    who: str = "a peer",
    settings: ReachSettings = ReachSettings(),
) -> tuple[bool, list[str], str]:
    """(reachable, what was dialed, advice): the whole check, with an injectable `dial`. Raises
    NotServedError when the caller's own address may not be dialed and nothing announced answered."""
    targets, skipped = dial_targets(seen_host, maddrs, settings)
    ok = [f"{h}:{p}" for h, p in targets if dial(h, p)]
    dialed = [f"{h}:{p}" for h, p in targets]
    if skipped:
        logger.debug("reachability of %s: not dialed %s", seen_host, "; ".join(skipped))
    seen_ok, seen_why = may_dial(seen_host, seen_host, settings)
    if not ok and not seen_ok:
        logger.info("peer %r at %s: reachability not checked (%s)", who, seen_host, seen_why)
        raise NotServedError(
            f"the coordinator cannot check from here whether other peers can reach this peer: its "
            f"connection comes from {seen_host or 'an unknown address'} ({seen_why}), which is never "
            "dialed, and no public address it announces answered. Not a verdict: the peer stays a full "
            "peer. (Operator: behind a reverse proxy, pass --trusted-proxy with its address.)"
        )
    forwarded: list[int] = []
    if not ok:
        forwarded = [
            p
            for h, p in forwarded_targets(seen_host, maddrs, settings)
            if (h, p) not in targets and dial(h, p)
        ]
    reachable, advice = verdict(seen_host, list(maddrs), ok, forwarded)
    verdict_text = "reachable" if reachable else "unreachable"
    logger.info(
        "peer %r at %s is %s (dialed %s)", who, seen_host, verdict_text, ", ".join(dialed) or "nothing"
    )
    return reachable, dialed, advice


def host_of(grpc_peer: str) -> str:
    """The IP in a gRPC `context.peer()` string ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678"); "" if none.
    An IPv4-mapped IPv6 address is given as its IPv4."""
    kind, _, rest = grpc_peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return ""
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        return str(_plain(ipaddress.ip_address(host)))
    except ValueError:
        return host


def caller_host(
    grpc_peer: str, metadata: Iterable[tuple[str, str | bytes]], settings: ReachSettings = ReachSettings()
) -> str:
    """The caller's IP: its connection's (`host_of`), or, when that connection comes from a
    `--trusted-proxy`, the last address of the x-forwarded-for the proxy appended. A header from
    anyone else is ignored; a trusted proxy's missing or malformed one leaves the proxy's address."""
    host = host_of(grpc_peer)
    networks = settings.proxy_networks()
    try:
        from_proxy = any(ipaddress.ip_address(host) in net for net in networks)
    except ValueError:
        return host
    values = [v for k, v in metadata if k.lower() == FORWARDED_FOR and isinstance(v, str)]
    if not from_proxy or not values:
        return host
    try:
        return str(_plain(ipaddress.ip_address(values[-1].rsplit(",", 1)[-1].strip())))
    except ValueError:
        logger.info("trusted proxy %s sent a malformed %s: %r", host, FORWARDED_FOR, values[-1][:80])
        return host


def caller_address(context, settings: ReachSettings) -> str:
    """The rate-limit and admission-root key of a gRPC caller (`ratelimit.caller_key`): the address
    a `--trusted-proxy` names for it, else its connection's; "local" for an in-process call."""
    if context is None:
        return "local"
    host = caller_host(context.peer(), context.invocation_metadata() or (), settings)
    return caller_key(f"ipv6:[{host}]:0" if ":" in host else f"ipv4:{host}:0")
