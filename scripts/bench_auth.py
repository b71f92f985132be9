"""Figure 6's authentication part: what authenticating DHT requests costs, RSA-2048 (hivemind's
`TokenAuthorizerBase`, crowdtrain's scheme until 2026-12-08) against the Ed25519 session keys of
peer/admission/sessionkeys.py.

    python -m scripts.bench_auth                  # both parts (~1 minute on 2 cores)
    python -m scripts.bench_auth --ops 0          # the per-message part only (seconds)
    python -m scripts.bench_auth --swarm-seconds 40   # and part 3 (~2 minutes of 2 cores)

1. Per message, in this process: a DHT ping signed by the client, validated by the server, the
   response signed by the server and validated by the client (the four calls hivemind makes per
   RPC), in microseconds per request; and the bare sign and verify primitives.
2. Two real DHT nodes on 127.0.0.1: node B stores and reads back `--ops` small records at node A,
   once with each scheme; the CPU seconds of each node's DHT process (and its p2pd) per operation.
3. A `tiny` swarm (a coordinator and 2 peers, as `scripts/bench.py --figures swarm` starts them),
   profiled with py-spy for `--swarm-seconds` once every peer trained an epoch: the cores of peer-0's
   processes, and the share of its DHT process's on-CPU samples in each kind of signature.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from crowdtrain.peer.admission.access import SwarmAuthorizer
from crowdtrain.peer.admission.identity import PeerIdentity
from crowdtrain.peer.admission.tokens import SwarmToken, parse_and_check, sign_token
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hivemind.proto import dht_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils import get_dht_time
from hivemind.utils.auth import TokenAuthorizerBase

from scripts.bench import cpu_between, process_tree_cpu_s

RUN = "bench-auth"


class RsaSwarmAuthorizer(SwarmAuthorizer):
    """The scheme before 2026-12-08, for comparison: the token's RSA key itself in the access token,
    every request and response signed with RSA-2048 by hivemind's own `TokenAuthorizerBase`."""

    async def get_token(self) -> AccessToken:
        text = self.token_source()
        token, _ = parse_and_check(text, self.run_id, self.run_public_key_hex, get_dht_time())
        return AccessToken(
            username=text,
            public_key=self.local_public_key.to_bytes(),
            expiration_time=str(token.expires_unix_s),
        )

    def is_token_valid(self, access_token: AccessToken) -> bool:
        now = get_dht_time()
        expires = self._verified.get(access_token.username)
        if expires is None:
            token, _ = parse_and_check(access_token.username, self.run_id, self.run_public_key_hex, now)
            if token is None or token.public_key != access_token.public_key:
                return False
            self._verified[access_token.username] = expires = token.expires_unix_s
        return now < expires

    sign_request = TokenAuthorizerBase.sign_request
    validate_request = TokenAuthorizerBase.validate_request
    sign_response = TokenAuthorizerBase.sign_response
    validate_response = TokenAuthorizerBase.validate_response


SCHEMES = {"rsa2048": RsaSwarmAuthorizer, "ed25519": SwarmAuthorizer}


def _authorizer(scheme: str, run_key, identity: PeerIdentity):
    token = SwarmToken(RUN, identity.peer_id, identity.rsa_public_openssh, time.time() + 3600)
    text = sign_token(run_key, token).to_json()
    run_hex = run_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return SCHEMES[scheme](RUN, run_hex.hex(), identity.hivemind_private_key(), lambda: text)


def per_request_us(scheme: str, run_key, client_id, server_id, rounds: int) -> float:
    """Microseconds of the four authorizer calls of one DHT RPC (ping), both sides in this process."""
    client, server = _authorizer(scheme, run_key, client_id), _authorizer(scheme, run_key, server_id)

    async def rpcs() -> float:
        started = time.perf_counter()
        for _ in range(rounds):
            request = dht_pb2.PingRequest(validate=True)
            await client.sign_request(request, None)
            assert await server.validate_request(request)
            response = dht_pb2.PingResponse(dht_time=get_dht_time(), available=True)
            await server.sign_response(response, request)
            assert await client.validate_response(response, request)
        return time.perf_counter() - started

    asyncio.run(rpcs())  # warm: the tokens checked once, cached
    return asyncio.run(rpcs()) / rounds * 1e6


def primitives_us(identity: PeerIdentity, rounds: int) -> dict[str, float]:
    """Bare sign and verify of a 1 KB message (a DHT request's size), microseconds each."""
    message = bytes(1024)
    rsa = identity.hivemind_private_key()
    rsa_public, rsa_signature = rsa.get_public_key(), rsa.sign(message)
    ed = ed25519.Ed25519PrivateKey.generate()
    ed_public, ed_signature = ed.public_key(), ed.sign(message)
    calls = {
        "rsa2048 sign": lambda: rsa.sign(message),
        "rsa2048 verify": lambda: rsa_public.verify(message, rsa_signature),
        "ed25519 sign": lambda: ed.sign(message),
        "ed25519 verify": lambda: ed_public.verify(ed_signature, message),
    }
    out = {}
    for name, call in calls.items():
        started = time.perf_counter()
        for _ in range(rounds):
            call()
        out[name] = (time.perf_counter() - started) / rounds * 1e6
    return out


def dht_cpu_ms_per_op(scheme: str, run_key, ids: list[PeerIdentity], ops: int) -> dict[str, float]:
    """CPU milliseconds per store-and-get of node B at node A: each DHT process, each p2pd, wall."""
    from crowdtrain.peer.swarm.wiring import start_dht

    def node(peers, identity):
        authorizer = _authorizer(scheme, run_key, identity)
        return start_dht(
            peers,
            listen_host="127.0.0.1",
            identity_path=str(identity.path),
            authorizer=authorizer,
            attempts=1,
        )

    a = node([], ids[0])
    b = node([str(m) for m in a.get_visible_maddrs()], ids[1])
    try:
        for i in range(20):  # warm: routing tables, tokens checked and cached
            b.store(f"warm{i}", i, get_dht_time() + 60)
        before = [process_tree_cpu_s(n.pid) for n in (a, b)]
        started = time.perf_counter()
        for i in range(ops):
            assert b.store(f"key{i % 64}", i, get_dht_time() + 60)
            assert b.get(f"key{i % 64}", latest=True) is not None
        wall_s = time.perf_counter() - started
        after = [process_tree_cpu_s(n.pid) for n in (a, b)]
    finally:
        b.shutdown()
        a.shutdown()
    used = [{role: (y[role] - x[role]) * 1e3 / ops for role in y} for x, y in zip(before, after, strict=True)]
    return {
        "server dht": used[0]["main"],
        "server p2pd": used[0]["p2pd"],
        "client dht": used[1]["main"],
        "client p2pd": used[1]["p2pd"],
        "wall": wall_s * 1e3 / ops,
    }


SIGNATURE_FRAMES = (  # (category, a frame that marks it), first match wins
    ("Ed25519 request/response signing", "SessionKey.sign ("),
    ("Ed25519 request/response verification", "verify_session_signature ("),
    ("RSA signing (records; delegations; before 2026-12-08 every message)", "RSAPrivateKey.sign ("),
    ("RSA verification (records; delegations; before: every message)", "RSAPublicKey.verify ("),
    ("RSA verification (records; delegations; before: every message)", "check_delegation ("),
)


def dht_signature_shares(raw: str) -> tuple[int, dict[str, float]]:
    """From `py-spy record --subprocesses --format raw`: the DHT process's on-CPU samples (the
    process whose stacks run hivemind's `DHT.run`) and the share of them in each SIGNATURE_FRAMES
    category."""
    by_process: dict[str, list[tuple[list[str], int]]] = {}
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        process = [f for f in frames if f.startswith("process ")][-1:] or ["?"]
        by_process.setdefault(process[0], []).append((frames, int(n)))
    dht = [
        s for s in by_process.values() if any("DHT.run (hivemind/dht/dht.py" in f for fs, _ in s for f in fs)
    ]
    samples = [item for stacks in dht for item in stacks]
    total = sum(n for _, n in samples)
    shares: dict[str, float] = {}
    for frames, n in samples:
        category = next((c for c, mark in SIGNATURE_FRAMES if any(mark in f for f in frames)), None)
        if category is not None:
            shares[category] = shares.get(category, 0.0) + n / max(total, 1)
    return total, shares


def swarm_profile(seconds: float, work: Path) -> tuple[dict[str, float], int, dict[str, float]]:
    """(cores of peer-0's processes by role, DHT samples, signature shares) in a `tiny` swarm."""
    from crowdtrain.coordinator.demo import coordinator_command, local_peer_command, spawn, stop_children

    from scripts.attacks import prepare_run
    from scripts.harness import wait_for_event

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    data_dir = prepare_run(work / "coordinator", "--preset", "tiny")
    children = []
    try:
        coordinator = spawn(
            "coordinator", coordinator_command(data_dir, "--checkpoint-interval-s", "0"), work, echo=False
        )
        children.append(coordinator)
        grpc = wait_for_event(coordinator, "coordinator_ready", timeout_s=600)["grpc"]
        for i in range(2):
            args = ("--name", f"peer-{i}", "--threads", "1", "--device", "cpu")
            children.append(
                spawn(f"peer-{i}", local_peer_command(grpc, work / f"cache-{i}", *args), work, echo=False)
            )
        for child in children[1:]:
            wait_for_event(child, "epoch", timeout_s=600)
        pid, out = children[1].proc.pid, work / "spy.txt"
        before, t0 = process_tree_cpu_s(pid), time.time()
        command = [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "--subprocesses"]
        subprocess.run(
            command + ["--format", "raw", "--rate", "100", "--nonblocking", "-o", str(out)],
            check=True,
            capture_output=True,
            timeout=seconds + 120,
        )
        cores = cpu_between(before, process_tree_cpu_s(pid), time.time() - t0)
    finally:
        stop_children(children)
    return (cores, *dht_signature_shares(out.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=300, help="RPCs of the per-message part")
    parser.add_argument(
        "--ops", type=int, default=300, help="store+get pairs per scheme between two DHT nodes"
    )
    parser.add_argument(
        "--swarm-seconds", type=float, default=0.0, help="profile a tiny swarm this long (0: no)"
    )
    args = parser.parse_args(argv)
    run_key = ed25519.Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory(prefix="bench-auth-") as tmp:
        ids = [PeerIdentity.fresh(Path(tmp)) for _ in range(2)]
        print("| primitive (1 KB message) | us |\n|---|---|")
        for name, us in primitives_us(ids[0], args.rounds).items():
            print(f"| {name} | {us:.1f} |")
        print(
            "\n| scheme | us per DHT RPC (client sign + server check + server sign + client check) |\n|---|---|"
        )
        per_rpc = {scheme: per_request_us(scheme, run_key, ids[0], ids[1], args.rounds) for scheme in SCHEMES}
        for scheme, us in per_rpc.items():
            print(f"| {scheme} | {us:.0f} |")
        print(f"\nEd25519 session keys: {per_rpc['rsa2048'] / per_rpc['ed25519']:.1f}x cheaper per RPC")
        if args.ops > 0:
            print(
                f"\n| scheme | CPU ms per store+get ({args.ops} pairs): server DHT / p2pd, client DHT / p2pd | wall ms |"
            )
            print("|---|---|---|")
            for scheme in SCHEMES:
                ms = dht_cpu_ms_per_op(scheme, run_key, ids, args.ops)
                print(
                    f"| {scheme} | {ms['server dht']:.2f} / {ms['server p2pd']:.2f}, "
                    f"{ms['client dht']:.2f} / {ms['client p2pd']:.2f} | {ms['wall']:.1f} |"
                )
        if args.swarm_seconds > 0:
            cores, samples, shares = swarm_profile(args.swarm_seconds, Path(tmp))
            print(
                f"\ntiny swarm, peer-0 over {args.swarm_seconds:.0f} s: training process {cores['main']:.2f} "
                f"cores, its DHT and averager processes {cores['python']:.2f}, p2pd {cores['p2pd']:.2f}"
            )
            print(f"its DHT process: {samples} on-CPU samples at 100 Hz, of which")
            for category, share in shares.items():
                print(f"  {share:6.1%}  {category}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
