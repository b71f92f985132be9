"""The committed generated code matches protos/*.proto, and the package is namespaced."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_generated_code_is_not_stale():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_service_lives_in_the_crowdtrain_v1_package():
    from crowdtrain.protos import coordinator_pb2

    assert coordinator_pb2.DESCRIPTOR.package == "crowdtrain.v1"
    assert coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name == "crowdtrain.v1.Coordinator"
    # hivemind's own protos are unpackaged; importing both must not collide in the descriptor pool
    import hivemind.proto.dht_pb2  # noqa: F401
