"""A volunteer: join the run, build the model, load the swarm's state, train, heartbeat, leave.

    crowdtrain peer --coordinator 127.0.0.1:50051
    crowdtrain peer --coordinator 127.0.0.1:50051 --device cpu --threads 1 --batch-size 8   # tiny CPU

One log line per swarm epoch:

    epoch=12 loss=5.231 samples_per_s=88.1 swarm_peers=2 lr=3.0e-03 samples_total=3456 compute_share=0.78
    averaged_with=2 group=3f9a0c1e

`Volunteer._run` reads top to bottom as the steps a peer takes; each step is a method below it.
Catching up to the swarm lives in peer/volunteer/recovery.py, hivemind wiring in peer/swarm/wiring.py.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from crowdtrain.peer import __version__
from crowdtrain.peer.admission.access import SwarmAccess
from crowdtrain.peer.admission.identity import PeerIdentity
from crowdtrain.peer.checkpoints.trust import trust_joined_run
from crowdtrain.peer.data.feed import DataFeed
from crowdtrain.peer.data.shards import run_cache_dir
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.events import emit
from crowdtrain.peer.link.client import (
    CoordinatorClient,
    CoordinatorRejected,
    CoordinatorUnavailable,
    retry_until,
)
from crowdtrain.peer.link.heartbeat import HeartbeatReporter, StatsBox
from crowdtrain.peer.link.tls import ClientTls
from crowdtrain.peer.machine.device import describe_device, pick_device
from crowdtrain.peer.machine.pause import PauseMonitor, PauseSettings, SystemSampler, install_pause_signals
from crowdtrain.peer.robust.evidence import heartbeat_messages
from crowdtrain.peer.run.runproof import check_joined_run
from crowdtrain.peer.settings.commands import PeerConfig
from crowdtrain.peer.swarm.lifecycle import leave_swarm, rejoin_in_background, stop_on_signals
from crowdtrain.peer.volunteer.meter import (
    ContributionSummary,
    EpochMeter,
    StatusLine,
    log_epoch,
    standing_text,
)
from crowdtrain.peer.volunteer.pause_gate import PauseGate
from crowdtrain.peer.volunteer.recovery import Recovery
from crowdtrain.protos import coordinator_pb2 as pb

logger = logging.getLogger(__name__)


class PeerError(CrowdtrainError):
    """The volunteer cannot take part; the message says what to do."""


class Volunteer:
    """One training peer. `run()` blocks until stopped (SIGINT/SIGTERM, --max-epochs or an error)."""

    def __init__(self, config: PeerConfig):
        self.config = config
        self.name = config.name or socket.gethostname()
        self.stop_event = threading.Event()
        self.stats = StatsBox()
        self.client = CoordinatorClient(
            config.coordinator, tls=ClientTls.from_flags(config.tls, config.tls_ca)
        )
        self.dht = self.opt = self.heartbeat = self.inner = None  # inner: DiLoCo's local optimizer
        self.feed = self.upload_limit = None
        self.session_id = ""
        # SIGUSR1/SIGUSR2, --schedule, --pause-when-busy, --pause-on-battery (a bad value fails here)
        self.pauser = PauseMonitor(PauseSettings.from_peer_config(config), sampler=SystemSampler())
        self.pause_gate = PauseGate(self.pauser, self.stats, self.stop_event)

    def run(self) -> int:
        self._install_signal_handlers()
        install_pause_signals(self.pauser.start())  # before hivemind forks: its children inherit them
        try:
            return self._run()
        finally:
            self.shutdown()

    def _run(self) -> int:
        self.join()  # the run's manifest, our data shard, the swarm's bootstrap peers
        self.start_heartbeat()
        batches = self.load_data()  # the first shard now: a data problem fails before the swarm
        model = self.build_model()  # the run's initial weights, or the checkpoint Join names
        self.fit(model)  # the micro-batch this machine holds; refused here when none fits
        self.join_swarm(model)  # admitted to the swarm, then DHT node and hivemind optimizer
        if self.stop_event.is_set():
            return 0
        self.recover()  # catch up to the swarm's state (or the latest checkpoint)
        if self.stop_event.is_set():
            return 0
        self.train(model, batches)
        self.save(model)
        return 0

    # ------------------------------------------------------------------ the steps, in order

    def join(self) -> None:
        import torch

        if self.config.threads > 0:
            torch.set_num_threads(self.config.threads)
        self.device = pick_device(self.config.device, self.config.gpu)
        self.device_label = describe_device(self.device)
        self.identity = self._identity()  # before Join: an allowlist admits identities
        request = pb.JoinRequest(
            name=self.name,
            version=__version__,
            device=self.device_label,
            invite_code=self.config.invite,
            **DataFeed.resume_fields(self.config),  # where this peer stopped reading last time
        )
        self.joined = retry_until(  # signed anew at each try: the coordinator refuses an old signature
            lambda: self.client.join(self.identity.signed_join(request)),
            deadline_s=self.config.join_timeout_s,
            what=f"joining the run at {self.config.coordinator}",
            stop=self.stop_event,
        )
        self.session_id, self.settings = self.joined.session_id, self.joined.settings
        joined = self.joined
        self.manifest = check_joined_run(
            joined.manifest_json, joined.manifest_sha256, joined.manifest_signature, joined.tokenizer_json
        )
        # its key: trusted here before, or first contact; another run under a new key needs --trust-new-run
        self.run_key = trust_joined_run(
            self.config.coordinator,
            self.manifest.run_id,
            self.manifest.signing_public_key,
            trust_new_run=self.config.trust_new_run,
        )
        self.cache_dir = run_cache_dir(self.config.cache_dir, self.manifest.run_id)
        self.batch_size = self.config.batch_size or self.manifest.swarm.batch_size_per_step
        emit(
            logger,
            "joined",
            "joined run %s as %r (peer id %s): %s model, first shard %d, device %s",
            self.manifest.run_id,
            self.name,
            self.joined.peer_id,
            self.manifest.preset,
            self.settings.shard_index,
            self.device_label,
            run_id=self.manifest.run_id,
            name=self.name,
            peer_id=self.joined.peer_id,
            preset=self.manifest.preset,
            shard_index=self.settings.shard_index,
            device=self.device_label,
        )

    def _identity(self) -> PeerIdentity:
        if self.config.identity:
            return PeerIdentity(Path(self.config.identity).expanduser())
        return PeerIdentity.fresh(Path(self.config.cache_dir).expanduser())

    def start_heartbeat(self) -> None:
        initial_peers = list(self.joined.initial_peers)
        self.access = SwarmAccess(self.identity, self.manifest.run_id, self.run_key, self.cache_dir)
        self.stats.update(dht_peer_id=self.identity.peer_id)  # proven by the first heartbeats
        self.heartbeat = HeartbeatReporter(
            self.client,
            self.session_id,
            self.joined.session_token,
            self.stats,
            name=self.name,
            version=__version__,
            device=self.device_label,
            interval_s=self.settings.heartbeat_interval_s,
            on_reconnect=lambda: rejoin_in_background(self.dht, initial_peers),
            on_token=self.access.on_token,
            evidence=self._evidence,
        )
        self.heartbeat.set_dht_proof(*self.identity.prove(self.joined.dht_challenge))
        self.heartbeat.start()

    def _evidence(self) -> list:
        """Rejected contributions and averaging groups our averagers recorded since the last heartbeat."""
        return heartbeat_messages(getattr(self, "evidence_sink", None), self.stats.get().local_epoch)

    def load_data(self) -> Iterator:
        """Endless (batch, place in the data) pairs, from where Join placed us (peer/data/feed.py)."""
        from tokenizers import Tokenizer

        self.feed = DataFeed(
            self.config, self.manifest, self.joined, self.cache_dir, self.stats, self._answer
        )
        return self.feed.batches(Tokenizer.from_str(self.joined.tokenizer_json), self.batch_size)

    def _answer(self):
        return self.heartbeat.answer if self.heartbeat is not None else None

    def build_model(self):
        from crowdtrain.peer.run.model import build_model, num_parameters

        model = build_model(self.manifest, self.device)
        logger.info(
            "model: %s with %.2fM parameters", self.manifest.model.model_type, num_parameters(model) / 1e6
        )
        self.recovery = Recovery(self.config.coordinator, model, self.device, self.cache_dir, self.stop_event)
        self.recovery.use_key(self.run_key, ClientTls.from_flags(self.config.tls, self.config.tls_ca))
        if self.settings.resume_from_step > 0:  # nobody is training: start from the latest checkpoint
            self.recovery.load_checkpoint(self.settings.resume_from_step)
        return model

    def fit(self, model) -> None:
        """Precision and the largest micro-batch this machine holds (peer/machine/fit.py); refused here,
        before the swarm, when not even one sequence fits. Steps still count the whole batch."""
        from crowdtrain.peer.machine.accumulate import fit_to_machine

        self.stepper, why = fit_to_machine(model, self.manifest, self.device, self.batch_size, self.config)
        micro = self.stepper.micro_batch
        emit(
            logger,
            "memory_plan",
            "memory: %s",
            why,
            micro_batch=micro,
            batch_size=self.batch_size,
            reason=why,
        )

    def join_swarm(self, model) -> None:
        from crowdtrain.peer.swarm.lifecycle import tie_children_to_this_process, use_fork_start_method
        from crowdtrain.peer.swarm.optimizers import inner_optimizer

        use_fork_start_method()
        tie_children_to_this_process()  # no orphans, even after kill -9
        self.access.wait_for_token(self.config.token_wait_s, self.stop_event)  # admitted first
        if self.stop_event.is_set():
            return
        if self.config.max_upload_mbps > 0:  # before the DHT and averagers fork: they share the cap
            from crowdtrain.peer.machine.bandwidth import limit_upload

            self.upload_limit = limit_upload(self.config.max_upload_mbps)
        self.dht = self._start_dht(self.config.client_mode)
        if not self.config.client_mode:  # can others reach us? If not: client mode, and why
            from crowdtrain.peer.link.reach import ensure_reachable

            ask = (self.client, self.session_id, self.joined.session_token, partial(self._start_dht, True))
            self.dht, reachable = ensure_reachable(self.dht, *ask)
            self.stats.update(client_mode=not reachable)
        self.access.attach(self.dht)
        if self.manifest.swarm.mode == "diloco":
            self.inner = inner_optimizer(self.manifest, model)
        self.opt = self._make_optimizer(model)
        self._install_signal_handlers()  # hivemind's averager just set SIGINT to "ignored"

    def _start_dht(self, client_mode: bool):
        from crowdtrain.peer.swarm.wiring import start_dht

        return start_dht(
            list(self.joined.initial_peers),
            listen_host=self.config.listen_host,
            port=0 if client_mode else self.config.listen_port,  # a client listens for nobody
            announce_host=self.config.announce_host,
            client_mode=client_mode,
            stop=self.stop_event,
            identity_path=str(self.identity.path),
            authorizer=self.access.authorizer(),
        )

    def _make_optimizer(self, model):
        """The run's hivemind optimizer, averaging only with token holders and robustly."""
        from crowdtrain.peer.robust.evidence import EvidenceSink
        from crowdtrain.peer.swarm.wiring import make_optimizer

        self.evidence_sink = EvidenceSink()
        return make_optimizer(
            self.manifest,
            model,
            self.dht,
            batch_size_per_step=self.batch_size,
            verbose=False,
            gate=self.access.gate(self.dht),
            evidence=self.evidence_sink,
            extra_tensors=self.inner.state_tensors() if self.inner is not None else (),
        )

    def recover(self) -> None:
        if self.settings.resume_from_step > 0:
            self.recovery.continue_epoch_count(self.opt, self.settings.resume_from_step)
        self.stats.update(phase="loading_state")
        self.recovery.catch_up(self.opt, self.manifest.swarm)

    def train(self, model, batches: Iterator[list[list[int]]]) -> None:
        """Step until stopped, banned, or --max-epochs; one log line per swarm epoch."""
        from crowdtrain.peer.data.feed import as_tagged_batch
        from crowdtrain.peer.data.prefetch import Prefetcher

        # batches (and the next shard's download and tokenization) are made ahead on a thread,
        # started here, after hivemind's last fork
        tensors = partial(as_tagged_batch, device=self.device)
        with Prefetcher(batches, tensors, depth=8, name="batches") as ahead:
            self._train(model, ahead)

    def _train(self, model, batches) -> None:
        self.stats.update(phase="training", local_epoch=self.opt.local_epoch)
        meter, status, summary = EpochMeter(self.opt.local_epoch), StatusLine(), ContributionSummary()
        model.train()
        while not self.stop_event.is_set():
            if self.heartbeat.refused is not None:
                raise PeerError(
                    f"stopped training: {self.heartbeat.refused}. The run's operator no longer accepts "
                    "this peer; ask them, or run it under another --name only if they agree"
                )
            if (
                self.pause_gate.paused()
            ):  # hands in its samples, idles, re-syncs (peer/volunteer/pause_gate.py)
                status.clear()
                self.pause_gate.wait(
                    self.opt, resync=partial(self.recovery.catch_up, self.opt, self.manifest.swarm)
                )
                continue
            t0 = time.monotonic()
            batch, place = next(batches)
            loss, compute_s = self._step(model, batch)
            self.feed.trained(place)  # only batches stepped on move this peer's place in the data
            meter.add(batch.shape[0], loss, time.monotonic() - t0, compute_s)
            swarm_peers = self.opt.tracker.global_progress.num_peers
            self.stats.update(
                local_epoch=self.opt.local_epoch,
                loss=loss,
                samples_per_s=meter.ema_rate,
                samples_total=meter.samples_total,
                swarm_size=swarm_peers,
            )
            status.draw(self.opt, loss, meter.ema_rate, swarm_peers, standing_text(self._answer()))
            if self.opt.local_epoch != meter.epoch:
                status.clear()
                log_epoch(self.opt, self.inner, self.dht, meter, swarm_peers)
                summary.maybe_log(self._answer())
                meter.start_epoch(self.opt.local_epoch)
                if self.config.max_epochs and meter.epoch >= self.config.max_epochs:
                    logger.info("reached --max-epochs %d, leaving", self.config.max_epochs)
                    break
        summary.maybe_log(self._answer(), force=True)  # leaving: what the swarm accepted of its work

    def _step(self, model, batch) -> tuple[float, float]:
        """Forward and backward in micro-batches (backing off on out-of-memory), then hivemind's
        step for the whole batch (which averages with the swarm when it is time):
        (loss, seconds of computing: forward, backward and a DiLoCo local step)."""
        from crowdtrain.peer.robust.reduce import nonfinite_loss_message

        t0 = time.monotonic()
        loss = self.stepper(batch)
        if not math.isfinite(loss):
            raise PeerError(nonfinite_loss_message(loss, self.opt.local_epoch, model))
        if self.inner is not None:  # DiLoCo: a local step; hivemind's counts samples, steps the outer model
            self.inner.step()
        compute_s = time.monotonic() - t0
        self.opt.step()
        if self.inner is None:
            self.opt.zero_grad()
        return loss, compute_s

    def save(self, model) -> None:
        """With --save-dir: write this peer's model there atomically (staging directory, then rename)."""
        from crowdtrain.peer.run.model import save_hf_atomically

        if self.config.save_dir:
            out = Path(self.config.save_dir).expanduser()
            extra = {"epoch.txt": f"{self.opt.local_epoch}\n"}
            save_hf_atomically(model, self.joined.tokenizer_json, self.manifest, out, extra)
            logger.info("saved this peer's model at epoch %d to %s", self.opt.local_epoch, out)

    # ------------------------------------------------------------------ signals and teardown

    def _install_signal_handlers(self) -> None:
        stop_on_signals(self.stop_event, "leaving the swarm after this step")

    def shutdown(self) -> None:
        """Leave the run and stop hivemind's processes; idempotent, safe from any exit path."""
        self.stop_event.set()
        self.pauser.shutdown()
        if self.feed is not None:
            self.feed.save()  # where this peer stopped reading, for its next start
        if self.heartbeat is not None:
            self.heartbeat.shutdown()
            self.heartbeat = None
        if self.session_id:
            try:
                self.client.leave(self.session_id, self.joined.session_token, reason="shutdown")
            except (CoordinatorUnavailable, CoordinatorRejected) as e:
                logger.info("could not tell the coordinator we leave: %s", e)
            self.session_id = ""
        opt, dht, self.opt, self.dht = self.opt, self.dht, None, None
        try:
            leave_swarm(opt, dht)
        except Exception:  # hivemind internals changed (docs/hivemind.md): report, keep the real exit
            logger.exception("leaving the swarm failed; its processes are stopped with this one")
        finally:
            self.client.close()
            if self.upload_limit is not None:
                self.upload_limit.shutdown()
