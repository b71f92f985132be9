"""Joins as a real peer sends them: every Join names an identity key and signs it with that key
(`crowdtrain.coordinator.admission.signatures.verify_join`), in every admission mode.

    client.join(signed_join(name="alice"))                 # a new identity per call
    client.join(signed_join(name="bob", who=3))            # identity 3 of this test process, again
    servicer.Join(signed_join(name="c", now=clock()), ctx)  # signed at an injected clock's time
"""

from __future__ import annotations

import functools
import itertools
import tempfile
import time
from pathlib import Path

from crowdtrain.peer.admission.identity import PeerIdentity
from crowdtrain.protos import coordinator_pb2 as pb

_KEYS = tempfile.TemporaryDirectory(prefix="crowdtrain-test-identities-")
_fresh = itertools.count(1_000_000)


@functools.cache
def identity(who: int) -> PeerIdentity:
    """Test identity number `who` (an RSA-2048 key made once per process)."""
    return PeerIdentity(Path(_KEYS.name) / f"{who}.key")


def signed_join(*, who: int | None = None, now: float | None = None, **fields) -> pb.JoinRequest:
    """A JoinRequest with `fields`, naming identity `who` (a new one when None) and signed by it at
    `now` (the wall clock when None)."""
    me = identity(next(_fresh) if who is None else who)
    request = pb.JoinRequest(**fields)
    for name, value in me.join_fields(time.time() if now is None else now).items():
        setattr(request, name, value)
    return request
