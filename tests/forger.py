"""A malicious volunteer, for tests only: it joins the run like any peer, then serves a forged state.

It never trains. It claims the swarm's current epoch and the highest donor priority, so hivemind's
own `load_state_from_peers` would pick it first, and answers `rpc_download_state` with the run's
initial weights scaled by --scale. Usage: python tests/forger.py HOST:PORT [--scale 3.0]
Once it serves, prints one line in the shape of a `--log-format json` event (see
crowdtrain.peer.events; this event is the test's own, not in the schema):
{"ts": ..., "level": "INFO", "logger": "forger", "msg": "forger: serving as <id>", "event": "forger_serving", "peer_id": "<id>"}
then runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("coordinator")
    parser.add_argument("--scale", type=float, default=3.0)
    args = parser.parse_args()

    from crowdtrain.peer.client import CoordinatorClient
    from crowdtrain.peer.manifest import RunManifest
    from crowdtrain.peer.model import build_model
    from crowdtrain.peer.processes import use_fork_start_method
    from crowdtrain.peer.swarm import make_optimizer, start_dht
    from crowdtrain.protos import coordinator_pb2 as pb

    use_fork_start_method()
    with CoordinatorClient(args.coordinator) as client:
        joined = client.join(pb.JoinRequest(name="forger", version="0", device="cpu"))
    manifest = RunManifest.from_json(joined.manifest_json)
    model = build_model(manifest)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(args.scale)
    dht = start_dht(list(joined.initial_peers), listen_host="127.0.0.1")
    opt = make_optimizer(
        manifest, model, dht, batch_size_per_step=manifest.swarm.batch_size_per_step, verbose=False
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    peer_id = dht.peer_id.to_base58()
    serving = {"ts": round(time.time(), 3), "level": "INFO", "logger": "forger"}
    serving |= {"msg": f"forger: serving as {peer_id}", "event": "forger_serving", "peer_id": peer_id}
    print(json.dumps(serving), flush=True)
    try:
        while not stop.wait(0.5):
            # claim whatever epoch the honest peers reached, and be everyone's first choice of donor
            opt.state_averager.local_epoch = max(opt.tracker.global_epoch, 1)
            opt.state_averager.state_sharing_priority = 1e9
    finally:
        opt.shutdown()
        dht.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
