"""DHT requests signed with Ed25519 session keys (peer/admission/sessionkeys.py, SwarmAuthorizer in
peer/admission/access.py) keep every check of the RSA-signed ones, each refusal with its reason.

Messages are hivemind's own PingRequest/PingResponse; two real DHT nodes on 127.0.0.1 at the end.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

hivemind = pytest.importorskip("hivemind")

from crowdtrain.peer.admission.access import SwarmAuthorizer  # noqa: E402
from crowdtrain.peer.admission.identity import PeerIdentity  # noqa: E402
from crowdtrain.peer.admission.sessionkeys import SessionKey, sign_delegation  # noqa: E402
from crowdtrain.peer.admission.tokens import SwarmToken, sign_token  # noqa: E402
from crowdtrain.peer.swarm.wiring import SwarmError, start_dht  # noqa: E402
from hivemind.proto import dht_pb2  # noqa: E402
from hivemind.proto.auth_pb2 import AccessToken  # noqa: E402
from hivemind.utils import get_dht_time  # noqa: E402

RUN = "fast-auth-run"


def _hex(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


@pytest.fixture(scope="module")
def run_key():
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fast-auth")
    return {name: PeerIdentity.fresh(tmp) for name in ("a", "b", "thief")}


def token_for(run_key, identity: PeerIdentity, ttl_s: float = 600.0) -> SwarmToken:
    return sign_token(
        run_key, SwarmToken(RUN, identity.peer_id, identity.rsa_public_openssh, time.time() + ttl_s)
    )


def authorizer(run_key, identity: PeerIdentity) -> SwarmAuthorizer:
    text = token_for(run_key, identity).to_json()
    return SwarmAuthorizer(RUN, _hex(run_key), identity.hivemind_private_key(), lambda: text)


def forged_request(access_token: AccessToken, sign, stamp_s: float = 0.0) -> dht_pb2.PingRequest:
    """A ping carrying `access_token`, stamped `stamp_s` from now, signed by `sign(bytes)`."""
    request = dht_pb2.PingRequest(validate=True)
    request.auth.client_access_token.CopyFrom(access_token)
    request.auth.time = get_dht_time() + stamp_s
    request.auth.nonce = b"12345678"
    request.auth.signature = sign(request.SerializeToString())
    return request


def verdict(server: SwarmAuthorizer, request) -> tuple[bool, str]:
    return asyncio.run(server.request_verdict(request))


def signed(client: SwarmAuthorizer) -> dht_pb2.PingRequest:
    request = dht_pb2.PingRequest(validate=True)
    asyncio.run(client.sign_request(request, None))
    return request


def test_a_valid_request_and_response_pass_and_cost_no_rsa_signature(run_key, ids):
    a, b = authorizer(run_key, ids["a"]), authorizer(run_key, ids["b"])
    request = signed(a)
    assert len(request.auth.client_access_token.public_key) == 32  # an Ed25519 key, not RSA's OpenSSH
    assert verdict(b, request) == (True, "signed by an admitted peer's session key, fresh")
    response = dht_pb2.PingResponse(dht_time=get_dht_time(), available=True)
    asyncio.run(b.sign_response(response, request))
    assert asyncio.run(a.response_verdict(response, request))[0]
    other = signed(a)  # a response to one request does not answer another
    ok, reason = asyncio.run(a.response_verdict(response, other))
    assert not ok and "another request" in reason
    response.available = False  # tampered on the way back
    ok, reason = asyncio.run(a.response_verdict(response, request))
    assert not ok and "response's signature does not verify" in reason


def test_tampered_replayed_and_stale_requests_are_refused(run_key, ids):
    a, b = authorizer(run_key, ids["a"]), authorizer(run_key, ids["b"])
    tampered = signed(a)
    tampered.validate = False
    ok, reason = verdict(b, tampered)
    assert not ok and "request's signature does not verify" in reason
    request = signed(a)
    assert verdict(b, request)[0]
    ok, reason = verdict(b, request)
    assert not ok and "nonce was seen before" in reason
    token = asyncio.run(a.get_token())
    stale = forged_request(token, a.session_key.sign, stamp_s=-120.0)
    ok, reason = verdict(b, stale)
    assert not ok and "stamped -120s" in reason
    assert verdict(b, forged_request(token, a.session_key.sign, stamp_s=-30.0))[0], "within a minute"


def test_bad_tokens_are_refused_with_their_reason(run_key, ids):
    """Another peer's token (tokens are public in the DHT), an expired one, one not signed by the
    run, and a request signed the old way (RSA key in the access token): each refused, and why."""
    b = authorizer(run_key, ids["b"])
    thief_rsa, session = ids["thief"].hivemind_private_key(), SessionKey()
    stolen = token_for(run_key, ids["a"])
    cases = {
        "not vouched for by the identity key": stolen,
        "token expired": token_for(run_key, ids["thief"], ttl_s=-5),
        "not signed by the run's key": token_for(ed25519.Ed25519PrivateKey.generate(), ids["thief"]),
    }
    for reason, token in cases.items():
        access = AccessToken(
            username=token.to_json(),
            public_key=session.public_bytes,
            expiration_time=str(token.expires_unix_s),
            signature=sign_delegation(thief_rsa, token, session.public_bytes),
        )
        ok, why = verdict(b, forged_request(access, session.sign))
        assert not ok and reason in why, (reason, why)
    own = token_for(run_key, ids["thief"])  # a valid token, presented as crowdtrain did before
    old = AccessToken(username=own.to_json(), public_key=ids["thief"].rsa_public_openssh)
    ok, why = verdict(b, forged_request(old, thief_rsa.sign))
    assert not ok and "signed the old way" in why and "update crowdtrain" in why


def test_a_node_never_presents_a_token_for_another_key(run_key, ids):
    text = token_for(run_key, ids["a"]).to_json()
    thief = SwarmAuthorizer(RUN, _hex(run_key), ids["thief"].hivemind_private_key(), lambda: text)
    with pytest.raises(PermissionError, match="names another identity key"):
        asyncio.run(thief.get_token())


def test_two_dht_nodes_with_session_keys_store_and_get_and_a_tokenless_node_cannot(run_key, ids, tmp_path):
    def node(initial_peers, identity):
        return start_dht(
            initial_peers,
            listen_host="127.0.0.1",
            identity_path=str(identity.path),
            authorizer=authorizer(run_key, identity),
            attempts=1,
        )

    a = node([], ids["a"])
    try:
        maddrs = [str(m) for m in a.get_visible_maddrs()]
        b = node(maddrs, ids["b"])
        try:
            assert b.store("fast", "hello", get_dht_time() + 60)
            assert a.get("fast", latest=True).value == "hello"
        finally:
            b.shutdown()
        tokenless = PeerIdentity.fresh(tmp_path)
        empty = SwarmAuthorizer(RUN, _hex(run_key), tokenless.hivemind_private_key(), lambda: "")
        with pytest.raises(SwarmError):
            start_dht(
                maddrs,
                listen_host="127.0.0.1",
                identity_path=str(tokenless.path),
                authorizer=empty,
                attempts=1,
            )
    finally:
        a.shutdown()
