"""The run's admission records stay their writers' (peer/admission/dhtrecords.py), and the coordinator's DHT
node keeps only the run's records, within limits, without UPnP (coordinator/admission/dhtstorage.py).

The attack: one admitted peer stored a plain value under `<run_id>_swarm_tokens` and
`<run_id>_swarm_revocations`, expiring in a year; hivemind 1.1.12 let it replace the dictionaries
and refuse every later subkey store, so a fresh reader admitted nobody and no ban reached the
swarm. Here the same attacker (an admitted node running hivemind without our validators) tries it
against real nodes on 127.0.0.1: the coordinator's bootstrap node A, an honest peer H and, started
after the attack, a fresh reader R.
"""

from __future__ import annotations

import time
from functools import partial

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

hivemind = pytest.importorskip("hivemind")

from crowdtrain.coordinator.admission.dhtstorage import DhtStorageLimits  # noqa: E402
from crowdtrain.coordinator.admission.swarmnodes import CoordinatorNodeAccess, RevocationPublisher  # noqa: E402
from crowdtrain.peer.admission.access import AdmittedPeers, SwarmAuthorizer, publish_token  # noqa: E402
from crowdtrain.peer.admission.dhtrecords import (  # noqa: E402
    RECORD_SLACK_S,
    IdentitySignatureValidator,
    admission_record_decision,
    owner_subkey,
    revocations_key,
    tokens_key,
)
from crowdtrain.peer.admission.identity import PeerIdentity  # noqa: E402
from crowdtrain.peer.admission.tokens import (  # noqa: E402
    Revocation,
    SwarmToken,
    gate_decision,
    sign_revocation,
    sign_token,
)
from crowdtrain.peer.swarm.wiring import start_dht  # noqa: E402
from hivemind.utils import get_dht_time  # noqa: E402

RUN = "records-run"
YEAR_S = 365 * 86400.0
LIMITS = DhtStorageLimits(max_record_bytes=4096, max_subkeys_per_key=4, max_records=12)


def _hex(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def token_for(run_key, identity: PeerIdentity, ttl_s: float = 600.0) -> str:
    expires = time.time() + ttl_s
    return sign_token(
        run_key, SwarmToken(RUN, identity.peer_id, identity.rsa_public_openssh, expires)
    ).to_json()


def authorizer(run_key, identity: PeerIdentity) -> SwarmAuthorizer:
    token = token_for(run_key, identity)
    return SwarmAuthorizer(RUN, _hex(run_key), identity.hivemind_private_key(), lambda: token)


async def _local_entry(_dht, node, key: str):
    """In a DHT's process: what its own storage holds under `key`: ("dict", {repr(subkey): expiry})
    or ("plain", expiry)."""
    from hivemind.dht.routing import DHTID
    from hivemind.dht.storage import DictionaryDHTValue

    item = node.protocol.storage.get(DHTID.generate(source=key))
    if item is None:
        return None
    if isinstance(item.value, DictionaryDHTValue):
        return "dict", {repr(subkey): entry.expiration_time for subkey, entry in item.value.items()}
    return "plain", item.expiration_time


def local_entry(dht, key: str):
    return dht.run_coroutine(partial(_local_entry, key=key))


@pytest.fixture(scope="module")
def run_key():
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, run_key):
    """A: the coordinator's bootstrap node (as coordinator/app.py starts it, small limits);
    H: an honest peer; M: an admitted attacker, hivemind without our record validators (it signs
    its own records, and nothing else)."""
    tmp = tmp_path_factory.mktemp("records")
    access = CoordinatorNodeAccess(RUN, run_key, tmp / "dht.key")
    a = access.start_bootstrap_node(listen_host="127.0.0.1", port=0, announce_host="", limits=LIMITS)
    maddrs = [str(m) for m in a.get_visible_maddrs()]
    ih, im = PeerIdentity.fresh(tmp), PeerIdentity.fresh(tmp)
    h = start_dht(
        maddrs,
        listen_host="127.0.0.1",
        identity_path=str(ih.path),
        authorizer=authorizer(run_key, ih),
        attempts=1,
    )
    m = hivemind.DHT(
        initial_peers=maddrs,
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        identity_path=str(im.path),
        check_if_identity_free=False,
        authorizer=authorizer(run_key, im),
        record_validators=[IdentitySignatureValidator(im.hivemind_private_key())],
    )
    yield dict(a=a, h=h, m=m, ih=ih, im=im, maddrs=maddrs, tmp=tmp)
    for dht in (m, h, a):
        dht.shutdown()


def test_one_admitted_peer_can_no_longer_wipe_the_tokens_or_the_revocations(nodes, run_key):
    a, h, m, ih, im = nodes["a"], nodes["h"], nodes["m"], nodes["ih"], nodes["im"]
    assert publish_token(h, RUN, token_for(run_key, ih))
    assert publish_token(m, RUN, token_for(run_key, im))  # the attacker is admitted, as in the review
    year = get_dht_time() + YEAR_S
    for key in (tokens_key(RUN), revocations_key(RUN)):
        m.store(key, "x", expiration_time=year)  # the review's attack: a plain value for a year
    victim = owner_subkey(ih.rsa_public_openssh)  # targeted: junk under the victim's own record
    m.store(tokens_key(RUN), subkey=victim, value="junk", expiration_time=year)
    m.store(tokens_key(RUN), subkey=ih.peer_id, value="junk", expiration_time=year)  # the old subkey
    own = owner_subkey(im.rsa_public_openssh)  # its own record, signed, kept for a year
    m.store(tokens_key(RUN), subkey=own, value=token_for(run_key, im), expiration_time=year)
    assert local_entry(m, tokens_key(RUN))[0] == "plain", "the attacker's own node keeps its plain value"
    for honest in (a, h):
        kind, subkeys = local_entry(honest, tokens_key(RUN))
        assert kind == "dict" and set(subkeys) == {repr(victim), repr(own)}
        assert max(subkeys.values()) < get_dht_time() + 3600, "no record kept for a year"
        assert local_entry(honest, revocations_key(RUN)) is None
    # H renews its token (as every renewal does): stored by every honest node
    renewed = token_for(run_key, ih, ttl_s=900.0)
    publish_token(h, RUN, renewed)
    ir = PeerIdentity.fresh(nodes["tmp"])
    reader = start_dht(
        nodes["maddrs"],
        listen_host="127.0.0.1",
        identity_path=str(ir.path),
        authorizer=authorizer(run_key, ir),
    )
    try:
        gate = AdmittedPeers(reader, RUN, _hex(run_key))
        assert gate.refresh() == 2, "a fresh reader sees both tokens, despite the attacker's answers"
        assert gate._expiry[ih.peer_id] == SwarmToken.from_json(renewed).expires_unix_s
        assert gate(ih.peer_id) == (True, "holds a valid swarm token")
        # the coordinator bans the attacker: the revocation is stored, and the fresh reader refuses it
        publisher = RevocationPublisher(a, RUN, run_key, lambda: frozenset({im.peer_id}), ttl_s=600.0)
        publisher.publish_once()  # (its count is the last replica's answer: maybe the attacker's)
        gate.refresh()
        assert gate(im.peer_id) == (False, "revoked by the run's coordinator (banned)")
        assert gate(ih.peer_id)[0]
    finally:
        reader.shutdown()


def test_a_revocation_not_signed_by_the_run_key_is_refused_and_ignored(nodes, run_key):
    """Honest nodes refuse to store it (so no reader meets it), and the gate stays open to the peer."""
    a, h, m, ih = nodes["a"], nodes["h"], nodes["m"], nodes["ih"]
    publish_token(h, RUN, token_for(run_key, ih))  # (its result is the last replica's: the attacker's)
    forged = sign_revocation(
        ed25519.Ed25519PrivateKey.generate(), Revocation(RUN, ih.peer_id, time.time() + 60)
    )
    assert not h.store(
        revocations_key(RUN), subkey=ih.peer_id, value=forged.to_json(), expiration_time=time.time() + 60
    )
    m.store(revocations_key(RUN), subkey=ih.peer_id, value=forged.to_json(), expiration_time=time.time() + 60)
    for honest in (a, h):
        entry = local_entry(honest, revocations_key(RUN))
        assert entry is None or repr(ih.peer_id) not in entry[1]
    gate = AdmittedPeers(h, RUN, _hex(run_key))
    gate.refresh()
    assert gate(ih.peer_id)[0]


def test_the_coordinators_node_keeps_only_the_runs_keys_within_its_limits(nodes):
    a, h = nodes["a"], nodes["h"]
    expires = get_dht_time() + 60
    h.store("someone_elses_key", "data", expiration_time=expires)
    h.store(f"{RUN}_progress", subkey=b"big", value="x" * 5000, expiration_time=expires)  # > 4096 bytes
    group = f"{RUN}_grad_averager.0b"
    for i in range(LIMITS.max_subkeys_per_key + 2):
        h.store(group, subkey=f"peer{i}".encode(), value=True, expiration_time=expires)
    assert local_entry(h, "someone_elses_key") == ("plain", expires)  # a peer stores what it likes
    assert local_entry(a, "someone_elses_key") is None
    assert local_entry(a, f"{RUN}_progress") is None
    assert len(local_entry(h, group)[1]) == LIMITS.max_subkeys_per_key + 2
    assert len(local_entry(a, group)[1]) == LIMITS.max_subkeys_per_key
    # an existing record is still refreshed when its key is full
    h.store(group, subkey=b"peer0", value=False, expiration_time=expires + 1)
    assert local_entry(a, group)[1][repr(b"peer0")] == expires + 1


def test_the_coordinators_p2pd_asks_no_router_for_a_port_mapping(nodes):
    import psutil

    daemons = [p for p in psutil.Process(nodes["a"].pid).children() if "p2pd" in p.name()]
    assert daemons, "no p2pd under the coordinator's DHT process"
    assert "-natPortMap=0" in daemons[0].cmdline()
    peer_daemons = [p for p in psutil.Process(nodes["h"].pid).children() if "p2pd" in p.name()]
    assert "-natPortMap=1" in peer_daemons[0].cmdline()  # volunteers behind home routers keep UPnP


@pytest.mark.parametrize(
    "problem", ["plain value", "other owner", "unprotected subkey", "year expiry", "unsigned", "other run"]
)
def test_admission_records_are_decided_strictly(run_key, nodes, problem):
    identity, other = nodes["ih"], nodes["im"]
    text = token_for(run_key, identity)
    token = SwarmToken.from_json(text)
    subkey, expiration = owner_subkey(identity.rsa_public_openssh), token.expires_unix_s
    assert admission_record_decision("tokens", subkey, text, expiration, RUN, _hex(run_key))[0]
    assert admission_record_decision("tokens", subkey, text, expiration + RECORD_SLACK_S, RUN, _hex(run_key))[
        0
    ]
    if problem == "plain value":
        subkey = None
    elif problem == "other owner":
        subkey = owner_subkey(other.rsa_public_openssh)
    elif problem == "unprotected subkey":
        subkey = identity.peer_id
    elif problem == "year expiry":
        expiration += YEAR_S
    elif problem == "unsigned":
        text = sign_token(ed25519.Ed25519PrivateKey.generate(), token).to_json()
    elif problem == "other run":
        text = token_for(run_key, identity).replace(RUN, "other-run")
    ok, reason = admission_record_decision("tokens", subkey, text, expiration, RUN, _hex(run_key))
    assert not ok, reason
    assert not admission_record_decision("other", None, None, expiration, RUN, _hex(run_key))[0]


def test_a_token_issued_after_a_revocation_admits_the_peer_again():
    """Revoked at T (until T + ttl): the tokens issued before T are void; the operator's unban
    gives the peer a token at T' > T, which expires after T + ttl and admits it at once."""
    ttl, t_revoked = 600.0, 1000.0
    until = t_revoked + ttl
    old_token_expires = t_revoked - 10 + ttl  # issued 10 s before the ban
    assert gate_decision(old_token_expires, until, t_revoked + 5) == (
        False,
        "revoked by the run's coordinator (banned)",
    )
    assert not gate_decision(None, until, t_revoked + 5)[0]
    new_token_expires = t_revoked + 30 + ttl  # unbanned, admitted again 30 s after the ban
    assert gate_decision(new_token_expires, until, t_revoked + 31) == (True, "holds a valid swarm token")
    assert gate_decision(old_token_expires, until, until + 1)[0] is False  # expired by then anyway
    assert gate_decision(old_token_expires, 0.0, t_revoked)[0]  # never revoked


def test_unban_readmits_through_the_dht(nodes, run_key):
    """The same through real nodes: P is banned (revocation published), its old token no longer
    admits it; unbanned, it publishes the token the coordinator issues next, and is admitted."""
    a, maddrs = nodes["a"], nodes["maddrs"]
    identity = PeerIdentity.fresh(nodes["tmp"])
    p = start_dht(
        maddrs,
        listen_host="127.0.0.1",
        identity_path=str(identity.path),
        authorizer=authorizer(run_key, identity),
    )
    try:
        publish_token(p, RUN, token_for(run_key, identity))  # (results: see the test above)
        gate = AdmittedPeers(a, RUN, _hex(run_key))
        gate.refresh()
        assert gate(identity.peer_id)[0]
        banned = {identity.peer_id}
        publisher = RevocationPublisher(a, RUN, run_key, lambda: frozenset(banned), ttl_s=600.0)
        publisher.publish_once()
        gate.refresh()
        assert gate(identity.peer_id) == (False, "revoked by the run's coordinator (banned)")
        banned.clear()  # `crowdtrain unban`: no more revocations; the next heartbeat brings a token
        publish_token(p, RUN, token_for(run_key, identity))
        gate.refresh()
        assert gate(identity.peer_id) == (True, "holds a valid swarm token")
    finally:
        p.shutdown()
