"""A malicious volunteer, for tests only: it joins the run like any peer, then serves a forged state.

It is admitted like an honest volunteer (Join, the proof of its DHT identity, a swarm token,
heartbeats saying "training", its own signed progress record), so once it is long-standing it is
one of the publisher's voters; it never trains. It claims the swarm's current epoch (in its state
and its progress record) and the highest donor priority, so hivemind's own `load_state_from_peers`
would pick it first, and answers `rpc_download_state` with the run's initial weights scaled by
--scale. Usage: python tests/forger.py HOST:PORT [--scale 3.0] [--cache-dir DIR]
Once it serves, prints one line in the shape of a `--log-format json` event (see
crowdtrain.peer.events; this event is the test's own, not in the schema):
{"ts": ..., "level": "INFO", "logger": "forger", "msg": "forger: serving as <id>", "event": "forger_serving", "peer_id": "<id>"}
then runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

# as `crowdtrain` does (coordinator/cli.py): hivemind forks its DHT while gRPC threads run; with
# gRPC's fork handlers on, the forked DHT process can crash in cygrpc (seen: segfault, no DHT)
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import torch  # noqa: E402


def make_forger(coordinator: str, scale: float, cache_dir: str):
    from crowdtrain.peer.settings.commands import PeerConfig
    from crowdtrain.peer.swarm.wiring import refresh_offloaded_parameters
    from crowdtrain.peer.volunteer.trainer import Volunteer

    class Forger(Volunteer):
        def recover(self, joined) -> None:  # nothing to load: it serves its own state
            pass

        def train(self, joined, model, batches) -> None:
            with torch.no_grad():
                for param in model.parameters():
                    param.mul_(scale)
            refresh_offloaded_parameters(self.opt, model)
            peer_id = self.dht.peer_id.to_base58()
            serving = {"ts": round(time.time(), 3), "level": "INFO", "logger": "forger"}
            serving |= {"msg": f"forger: serving as {peer_id}", "event": "forger_serving", "peer_id": peer_id}
            print(json.dumps(serving), flush=True)
            while not self.stop_event.wait(0.5):
                # claim whatever epoch the honest peers reached, and be everyone's first choice of donor
                epoch = max(self.opt.tracker.global_epoch, 1)
                self.opt.state_averager.local_epoch = epoch
                self.opt.state_averager.state_sharing_priority = 1e9
                if self.opt.tracker.local_progress.epoch != epoch:
                    # hivemind 1.1.12: a tracker publishes its record only while it reports samples
                    self.opt.tracker.report_local_progress(local_epoch=epoch, samples_accumulated=1)
                self.stats.update(phase="training", local_epoch=epoch, samples_per_s=1.0)

    config = PeerConfig(
        coordinator=coordinator, name="forger", device="cpu", listen_host="127.0.0.1", cache_dir=cache_dir
    )
    return Forger(config)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("coordinator")
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--cache-dir", default="")
    args = parser.parse_args()
    from crowdtrain.peer.cli import configure_logging

    configure_logging("INFO", "json")  # a volunteer's events and errors, as the test reads them
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="forger-")
    return make_forger(args.coordinator, args.scale, cache_dir).run()


if __name__ == "__main__":
    raise SystemExit(main())
