"""How well `--max-upload-mbps` (peer/machine/bandwidth.py) holds: one hivemind P2P sends a stream of
1 MiB messages to another through hivemind's real stream path, capped, and the rate is measured.

    python -m scripts.bench_upload                               # as root: caps 5, 20, 50, none
    python -m scripts.bench_upload --caps 20 --link-mbit 100     #   over a 100 Mbit/s shaped link
    python -m scripts.bench_upload --loopback --caps 20          # any user: 127.0.0.1, no shaping

On a shaped link the sender and the receiver each run in their own network namespace (two
namespaces named after this process, joined by one veth pair whose ends are shaped by
scripts/wan.py's tbf shaping), so nothing in the root namespace, such as a running chaos lab's
bridge, is touched. Each cap sends `--seconds` worth of bytes at that cap; cap 0 (no cap) sends
`--seconds` worth at the link's rate and shows what the link itself carries.

Figures per cap: `mbps` is the payload over the time from the sender's call to the receiver's
reply (the bucket's 0.25 s burst included); `steady_mbps` is what the receiver measured after the
first message. Both should be within 10% of the cap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = "crowdtrain_upload_probe"
PART_BYTES = 1 << 20
MAX_PROBE_BYTES = 1 << 30  # the receiver refuses streams longer than this


@dataclass(frozen=True)
class UploadMeasurement:
    cap_mbps: float
    payload_bytes: int
    elapsed_s: float
    mbps: float  # payload over the sender's call, burst included
    steady_mbps: float  # receiver-side, after the first message
    waited_s: float  # the sender's bucket: seconds its writes waited


async def serve_probe(p2p) -> None:
    """Answer probe streams: count their bytes, reply with the steady rate seen after the first part."""
    from google.protobuf import struct_pb2, wrappers_pb2

    async def handler(requests, context) -> struct_pb2.Struct:
        received, first_bytes, t_first, t_last = 0, 0, None, None
        async for request in requests:
            t_last = time.monotonic()
            received += len(request.value)
            if t_first is None:
                t_first, first_bytes = t_last, received
            if received > MAX_PROBE_BYTES:
                raise ValueError(f"probe stream over {MAX_PROBE_BYTES} bytes refused")
        span_s = (t_last - t_first) if t_first is not None else 0.0
        steady = (received - first_bytes) / span_s if span_s > 0 else 0.0
        reply = struct_pb2.Struct()
        reply.update({"received_bytes": received, "steady_bytes_per_s": steady})
        return reply

    await p2p.add_protobuf_handler(PROBE, handler, wrappers_pb2.BytesValue, stream_input=True)


async def send_probe(p2p, peer_id, total_bytes: int, cap_mbps: float) -> UploadMeasurement:
    """Stream `total_bytes` in PART_BYTES messages to a peer serving the probe; measure the rate."""
    from crowdtrain.peer.machine.bandwidth import active_limit
    from google.protobuf import struct_pb2, wrappers_pb2

    parts, payload = max(1, total_bytes // PART_BYTES), os.urandom(PART_BYTES)

    async def requests():
        for _ in range(parts):
            yield wrappers_pb2.BytesValue(value=payload)

    limit = active_limit()
    waited_before = limit.counters().waited_s if limit is not None else 0.0
    t0 = time.monotonic()
    reply = await p2p.call_protobuf_handler(peer_id, PROBE, requests(), struct_pb2.Struct)
    elapsed_s = time.monotonic() - t0
    received = int(reply["received_bytes"])
    if received != parts * PART_BYTES:
        raise RuntimeError(f"the receiver got {received} bytes of {parts * PART_BYTES}")
    return UploadMeasurement(
        cap_mbps=cap_mbps,
        payload_bytes=received,
        elapsed_s=elapsed_s,
        mbps=received * 8 / elapsed_s / 1e6,
        steady_mbps=reply["steady_bytes_per_s"] * 8 / 1e6,
        waited_s=(limit.counters().waited_s if limit is not None else 0.0) - waited_before,
    )


def bytes_for(cap_mbps: float, seconds: float) -> int:
    """Whole PART_BYTES messages worth `seconds` at the cap (at least 2)."""
    return max(2, round(cap_mbps * 1e6 / 8 * seconds / PART_BYTES)) * PART_BYTES


async def loopback_measurement(cap_mbps: float, total_bytes: int) -> UploadMeasurement:
    """Two P2P instances in this process on 127.0.0.1, the sender's uploads capped at `cap_mbps`."""
    from crowdtrain.peer.machine.bandwidth import limit_upload
    from hivemind.p2p import P2P

    receiver = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    sender = None
    limit = limit_upload(cap_mbps)
    try:
        await serve_probe(receiver)
        sender = await P2P.create(
            initial_peers=await receiver.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"]
        )
        return await send_probe(sender, receiver.peer_id, total_bytes, cap_mbps)
    finally:
        if limit is not None:
            limit.shutdown()
        for p2p in (sender, receiver):
            if p2p is not None:
                await p2p.shutdown()


# ---------------------------------------------------------------- a shaped link between two namespaces


class UploadLab:
    """Two network namespaces joined by one veth pair, each end shaped by scripts/wan.py's tbf
    shaping to `link.rate_mbit`; `teardown()` (idempotent) removes them. Names carry this
    process's id, so concurrent labs (and scripts/wan.py's WanLab) never collide."""

    def __init__(self, link):
        self.link, self.tag, self._up = link, str(os.getpid()), False
        self.notes: list[str] = []

    def namespace(self, side: int) -> str:
        return f"ct-up{self.tag}-{'ab'[side]}"

    def ip(self, side: int) -> str:
        return f"10.78.0.{1 + side}"

    def command_prefix(self, side: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(side)]

    def setup(self) -> UploadLab:
        from scripts.wan import WanLab, WanUnavailable, _ip, probe

        ok, why = probe()
        if not ok:
            raise WanUnavailable(why)
        _remove_stale_labs()
        self._up = True
        devs = [f"ctu{self.tag}{'ab'[side]}" for side in (0, 1)]
        for side in (0, 1):
            _ip("netns", "add", self.namespace(side))
        _ip("link", "add", devs[0], "netns", self.namespace(0), "type", "veth",
            "peer", "name", devs[1], "netns", self.namespace(1))  # fmt: skip
        shaper = WanLab(0, self.link)  # only its tc shaping is used: it creates nothing else
        for side in (0, 1):
            ns = self.namespace(side)
            _ip("addr", "add", f"{self.ip(side)}/24", "dev", devs[side], netns=ns)
            _ip("link", "set", devs[side], "up", netns=ns)
            _ip("link", "set", "lo", "up", netns=ns)
            shaper._shape(devs[side], ns)
        self.notes.append(f"{self.link.rate_mbit:g} Mbit/s each way ({'netem' if shaper.netem else 'tbf'})")
        return self

    def teardown(self) -> None:
        from scripts.wan import _ip

        if not self._up:
            return
        for side in (0, 1):
            _ip("netns", "del", self.namespace(side), check=False)  # also removes the veth pair
        self._up = False

    def __enter__(self) -> UploadLab:
        return self.setup()

    def __exit__(self, *exc) -> None:
        self.teardown()


def _remove_stale_labs() -> None:
    """Namespaces of UploadLabs whose process is gone (a killed run)."""
    from scripts.wan import _ip

    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        pid = name.removeprefix("ct-up").rpartition("-")[0]
        if name.startswith("ct-up") and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _ip("netns", "del", name, check=False)


def _role_command(lab: UploadLab, side: int, *args: str) -> list[str]:
    return lab.command_prefix(side) + [sys.executable, "-m", "scripts.bench_upload", *args]


def shaped_measurements(caps_mbps: list[float], link_mbit: float, seconds: float) -> tuple[list, str]:
    """Per cap, a sender in one namespace streaming to a receiver in the other over the shaped link."""
    from scripts.wan import WanLink

    link = WanLink(rate_mbit=link_mbit, delay_ms=10.0, jitter_ms=0.0, loss_percent=0.0)
    results = []
    with UploadLab(link) as lab:
        receiver = subprocess.Popen(
            _role_command(lab, 1, "--role", "receive", "--listen", lab.ip(1)),
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            maddrs = json.loads(receiver.stdout.readline() or "{}").get("maddrs")
            if not maddrs:
                raise RuntimeError("the receiver did not start; its errors are above")
            for cap in caps_mbps:
                total = bytes_for(cap or link_mbit, seconds)  # cap 0: uncapped, the link's own rate
                args = ("--role", "send", "--listen", lab.ip(0), "--to", *maddrs, "--bytes", str(total))
                command = _role_command(lab, 0, *args, "--caps", str(cap))
                done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
                if done.returncode != 0:
                    raise RuntimeError(f"the sender failed at {cap:g} Mbit/s: {done.stderr[-2000:]}")
                results.append(UploadMeasurement(**json.loads(done.stdout.strip().splitlines()[-1])))
        finally:
            receiver.stdin.close()
            try:
                receiver.wait(timeout=30)
            except subprocess.TimeoutExpired:
                receiver.kill()
                receiver.wait()
        return results, "; ".join(lab.notes)


async def _receive(listen: str) -> None:
    """Role `receive`: serve the probe until stdin closes (at most an hour)."""
    from hivemind.p2p import P2P

    p2p = await P2P.create(host_maddrs=[f"/ip4/{listen}/tcp/0"])
    try:
        await serve_probe(p2p)
        print(json.dumps({"maddrs": [str(m) for m in await p2p.get_visible_maddrs()]}), flush=True)
        await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, sys.stdin.read), 3600)
    finally:
        await p2p.shutdown()


async def _send(listen: str, to: list[str], cap_mbps: float, total_bytes: int) -> None:
    """Role `send`: one capped probe to the receiver at `to`; prints its UploadMeasurement as JSON."""
    from crowdtrain.peer.machine.bandwidth import limit_upload
    from hivemind.p2p import P2P, PeerID

    limit = limit_upload(cap_mbps)
    p2p = await P2P.create(initial_peers=to, host_maddrs=[f"/ip4/{listen}/tcp/0"])
    try:
        peer_id = PeerID.from_base58(to[0].rpartition("/p2p/")[2])
        measured = await send_probe(p2p, peer_id, min(total_bytes, MAX_PROBE_BYTES), cap_mbps)
        print(json.dumps(asdict(measured)), flush=True)
    finally:
        await p2p.shutdown()
        if limit is not None:
            limit.shutdown()


def table(results: list[UploadMeasurement], where: str) -> str:
    lines = [
        f"upload cap vs measured ({where})",
        "| cap, Mbit/s | sent | measured, Mbit/s | steady, Mbit/s | measured / cap |",
        "|---|---|---|---|---|",
    ]
    for m in results:
        ratio = f"{m.mbps / m.cap_mbps:.3f}" if m.cap_mbps else "-"
        lines.append(
            f"| {m.cap_mbps:g}{' (none)' if not m.cap_mbps else ''} | {m.payload_bytes / 1e6:.1f} MB in "
            f"{m.elapsed_s:.1f} s | {m.mbps:.2f} | {m.steady_mbps:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--caps", type=float, nargs="+", default=[5.0, 20.0, 50.0, 0.0], help="Mbit/s (0: no cap)"
    )
    parser.add_argument("--link-mbit", type=float, default=100.0, help="the shaped link's rate")
    parser.add_argument("--seconds", type=float, default=5.0, help="bytes worth this long per cap")
    parser.add_argument("--loopback", action="store_true", help="127.0.0.1 in this process, no shaping")
    parser.add_argument("--role", choices=("receive", "send"), help=argparse.SUPPRESS)
    parser.add_argument("--listen", help=argparse.SUPPRESS)
    parser.add_argument("--to", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, default=PART_BYTES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "receive":
        asyncio.run(_receive(args.listen))
        return 0
    if args.role == "send":
        asyncio.run(_send(args.listen, args.to, args.caps[0], args.bytes))
        return 0
    if args.loopback:
        sizes = [bytes_for(c or args.link_mbit, args.seconds) for c in args.caps]
        results = [asyncio.run(loopback_measurement(c, n)) for c, n in zip(args.caps, sizes, strict=True)]
        print(table(results, "127.0.0.1, one process"))
        return 0
    from scripts.wan import WanUnavailable

    try:
        results, link = shaped_measurements(args.caps, args.link_mbit, args.seconds)
    except WanUnavailable as e:
        print(f"cannot build the shaped link: {e}; try --loopback", file=sys.stderr)
        return 1
    print(table(results, f"two namespaces, {link}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
