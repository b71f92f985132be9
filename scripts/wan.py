"""A simulated WAN for the chaos harness: each peer in its own network namespace.

    root namespace:  bridge ct-br0 10.77.0.1/24  (the coordinator binds here)
    namespace ct-pN: eth0 10.77.0.(10+N)/24, default route via 10.77.0.1, behind veth ct-vN

Every veth end gets a token-bucket limit (`tc qdisc ... tbf`, both directions) and, where the
kernel has `sch_netem`, added latency with jitter and packet loss. A partition takes a peer's
link down (`ip link set ct-vN down`); healing brings it back. Needs root and iproute2; `probe()`
says why not otherwise, and the harness skips with that reason. Only these private addresses and
the harness's own processes are ever involved.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

from crowdtrain.peer.errors import CrowdtrainError

logger = logging.getLogger(__name__)

BRIDGE, SUBNET, HUB_IP = "ct-br0", "10.77.0", "10.77.0.1"


class WanUnavailable(CrowdtrainError):
    """Network namespaces cannot be used here; the message says why."""


@dataclass(frozen=True)
class WanLink:
    rate_mbit: float = 20.0
    delay_ms: float = 40.0
    jitter_ms: float = 10.0
    loss_percent: float = 0.5


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    cmd = prefix + (["ip", *args] if args[0] != "tc" else list(args))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise WanUnavailable(f"`{' '.join(cmd)}` failed: {result.stderr.strip()}")
    return result


def probe() -> tuple[bool, str]:
    """(True, what will be simulated) or (False, why namespaces cannot be used here)."""
    if os.geteuid() != 0:
        return False, "needs root (ip netns, veth, tc)"
    if not shutil.which("ip") or not shutil.which("tc"):
        return False, "needs iproute2 (ip, tc)"
    try:
        _ip("netns", "add", "ct-probe")
        _ip("netns", "del", "ct-probe")
    except WanUnavailable as e:
        return False, f"network namespaces are not available: {e}"
    return True, "namespaces available"


class WanLab:
    """Creates the bridge and one namespace per peer; `teardown()` (idempotent) removes them."""

    def __init__(self, peers: int, link: WanLink = WanLink()):
        self.peers, self.link = peers, link
        self.netem = False
        self.notes: list[str] = []
        self._up = False

    def namespace(self, slot: int) -> str:
        return f"ct-p{slot}"

    def peer_ip(self, slot: int) -> str:
        return f"{SUBNET}.{10 + slot}"

    def command_prefix(self, slot: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(slot)]

    def setup(self) -> WanLab:
        ok, why = probe()
        if not ok:
            raise WanUnavailable(why)
        self.teardown(quiet=True)  # leftovers of an earlier, killed run
        self._up = True
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{HUB_IP}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for slot in range(self.peers):
            ns, veth = self.namespace(slot), f"ct-v{slot}"
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", BRIDGE)
            _ip("link", "set", veth, "up")
            _ip("addr", "add", f"{self.peer_ip(slot)}/24", "dev", "eth0", netns=ns)
            _ip("link", "set", "eth0", "up", netns=ns)
            _ip("link", "set", "lo", "up", netns=ns)
            _ip("route", "add", "default", "via", HUB_IP, netns=ns)
            self._shape(veth, None)
            self._shape("eth0", ns)
        if not self.netem:
            self.notes.append(
                "this kernel has no sch_netem: latency and loss are not simulated, bandwidth is"
            )
        return self

    def _shape(self, dev: str, netns: str | None) -> None:
        link = self.link
        netem = [
            "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem",
            "delay", f"{link.delay_ms}ms", f"{link.jitter_ms}ms", "loss", f"{link.loss_percent}%",
            "rate", f"{link.rate_mbit}mbit",
        ]  # fmt: skip
        if _ip(*netem, netns=netns, check=False).returncode == 0:
            self.netem = True
            return
        burst = max(32, int(link.rate_mbit * 1000 * 0.01))  # kbit: 10 ms of traffic at the rate
        _ip(
            "tc", "qdisc", "add", "dev", dev, "root", "tbf",
            "rate", f"{link.rate_mbit}mbit", "burst", f"{burst}kbit", "latency", "200ms",
            netns=netns,
        )  # fmt: skip

    def describe(self) -> str:
        link = self.link
        if self.netem:
            return (
                f"{self.peers} namespaces, {link.rate_mbit:g} Mbit/s each way, "
                f"{link.delay_ms:g}+-{link.jitter_ms:g} ms, {link.loss_percent:g}% loss"
            )
        return f"{self.peers} namespaces, {link.rate_mbit:g} Mbit/s each way (tbf); " + "; ".join(self.notes)

    def partition(self, slot: int) -> None:
        _ip("link", "set", f"ct-v{slot}", "down")

    def heal(self, slot: int) -> None:
        _ip("link", "set", f"ct-v{slot}", "up")

    def teardown(self, quiet: bool = False) -> None:
        if not self._up and not quiet:
            return
        for slot in range(max(self.peers, 16)):
            _ip("netns", "del", self.namespace(slot), check=False)  # also removes its veth pair
        _ip("link", "del", BRIDGE, check=False)
        self._up = False

    def __enter__(self) -> WanLab:
        return self.setup()

    def __exit__(self, *exc) -> None:
        self.teardown()
