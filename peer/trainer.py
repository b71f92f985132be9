"""A volunteer: join the run, build the model, load the swarm's state, train, heartbeat, leave.

    crowdtrain peer --coordinator 127.0.0.1:50051
    crowdtrain peer --coordinator 127.0.0.1:50051 --device cpu --threads 1 --batch-size 8   # tiny CPU

One log line per swarm epoch:

    epoch=12 loss=5.231 samples_per_s=88.1 swarm_peers=2 lr=3.0e-03 samples_total=3456 compute_share=0.78
    averaged_with=2 group=3f9a0c1e

`Volunteer._run` reads top to bottom as the steps a peer takes; each step is a method below it.
Catching up to the swarm lives in peer/recovery.py, hivemind wiring in peer/swarm.py.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from crowdtrain.peer import __version__
from crowdtrain.peer.access import SwarmAccess
from crowdtrain.peer.client import CoordinatorClient, CoordinatorRejected, CoordinatorUnavailable, retry_until
from crowdtrain.peer.config import PeerConfig
from crowdtrain.peer.device import describe_device, pick_device
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.events import emit
from crowdtrain.peer.heartbeat import HeartbeatReporter, StatsBox
from crowdtrain.peer.identity import PeerIdentity
from crowdtrain.peer.meter import EpochMeter, StatusLine, group_fingerprint
from crowdtrain.peer.processes import stop_on_signals
from crowdtrain.peer.recovery import Recovery
from crowdtrain.peer.rejoin import rejoin_in_background
from crowdtrain.peer.runproof import check_joined_run
from crowdtrain.peer.shards import load_shard_blocks, run_cache_dir
from crowdtrain.peer.swarm import leave_swarm
from crowdtrain.peer.tls import ClientTls
from crowdtrain.peer.trust import trust_joined_run
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
        self.session_id = ""

    def run(self) -> int:
        self._install_signal_handlers()
        try:
            return self._run()
        finally:
            self.shutdown()

    def _run(self) -> int:
        self.join()  # the run's manifest, our data shard, the swarm's bootstrap peers
        self.start_heartbeat()
        batches = self.load_data()  # the first shard now: a data problem fails before the swarm
        model = self.build_model()  # the run's initial weights, or the checkpoint Join names
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
            dht_public_key=self.identity.public_key_protobuf,
        )
        self.joined = retry_until(
            lambda: self.client.join(request),
            deadline_s=self.config.join_timeout_s,
            what=f"joining the run at {self.config.coordinator}",
            stop=self.stop_event,
        )
        self.session_id, self.settings = self.joined.session_id, self.joined.settings
        joined = self.joined
        self.manifest = check_joined_run(
            joined.manifest_json, joined.manifest_sha256, joined.manifest_signature, joined.tokenizer_json
        )
        # the key that signed it: trusted for this run at this address on first use, refused if changed
        self.run_key = trust_joined_run(
            self.config.coordinator, self.manifest.run_id, self.manifest.signing_public_key
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
        """Rejected contributions our averagers recorded since the last heartbeat (see peer/robust.py)."""
        sink = getattr(self, "evidence_sink", None)
        if sink is None:
            return []
        epoch = self.stats.get().local_epoch
        return [
            pb.Rejection(offender=r.offender, kind=r.kind, detail=r.detail, epoch=epoch)
            for r in sink.drain(max_records=32)
        ]

    def load_data(self) -> Iterator[list[list[int]]]:
        """Endless shuffled batches, from the shard Join assigned us on through the whole dataset."""
        from crowdtrain.peer.data import rotating_batches
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(self.joined.tokenizer_json)
        num_shards = len(self.manifest.data.shards)
        first_shard = self.settings.shard_index % num_shards
        load = partial(self._load_shard, tokenizer, first_shard)
        seed = self.config.seed or zlib.crc32(self.session_id.encode())
        batches = rotating_batches(num_shards, first_shard, load, self.batch_size, seed)
        return itertools.chain([next(batches)], batches)

    def _load_shard(self, tokenizer, first_shard: int, index: int) -> list[list[int]] | None:
        """Shard `index` as token blocks; None when it cannot be fetched now (see peer/shards.py)."""
        data = self.manifest.data
        ssl_context = ClientTls.from_flags(self.config.tls, self.config.tls_ca).ssl_context()
        return load_shard_blocks(
            self.settings.http_base_url,
            self.cache_dir,
            data.shards[index],
            tokenizer,
            data.seq_len,
            required=index == first_shard,
            ssl_context=ssl_context,
        )

    def build_model(self):
        import torch
        from crowdtrain.peer.model import build_model, num_parameters

        model = build_model(self.manifest, self.device)
        logger.info(
            "model: %s with %.2fM parameters", self.manifest.model.model_type, num_parameters(model) / 1e6
        )
        self.use_amp = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.recovery = Recovery(self.config.coordinator, model, self.device, self.cache_dir, self.stop_event)
        self.recovery.use_key(self.run_key, ClientTls.from_flags(self.config.tls, self.config.tls_ca))
        if self.settings.resume_from_step > 0:  # nobody is training: start from the latest checkpoint
            self.recovery.load_checkpoint(self.settings.resume_from_step)
        return model

    def join_swarm(self, model) -> None:
        from crowdtrain.peer.optimizers import inner_optimizer
        from crowdtrain.peer.processes import tie_children_to_this_process, use_fork_start_method
        from crowdtrain.peer.swarm import start_dht

        use_fork_start_method()
        tie_children_to_this_process()  # no orphans, even after kill -9
        self.access.wait_for_token(self.config.token_wait_s, self.stop_event)  # admitted first
        if self.stop_event.is_set():
            return
        self.dht = start_dht(
            list(self.joined.initial_peers),
            listen_host=self.config.listen_host,
            announce_host=self.config.announce_host,
            client_mode=self.config.client_mode,
            stop=self.stop_event,
            identity_path=str(self.identity.path),
            authorizer=self.access.authorizer(),
        )
        self.access.attach(self.dht)
        if self.manifest.swarm.mode == "diloco":
            self.inner = inner_optimizer(self.manifest, model)
        self.opt = self._make_optimizer(model)
        self._install_signal_handlers()  # hivemind's averager just set SIGINT to "ignored"

    def _make_optimizer(self, model):
        """The run's hivemind optimizer, averaging only with token holders and robustly."""
        from crowdtrain.peer.evidence import EvidenceSink
        from crowdtrain.peer.swarm import make_optimizer

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
        from crowdtrain.peer.model import as_batch
        from crowdtrain.peer.prefetch import Prefetcher

        # batches (and the next shard's download and tokenization) are made ahead on a thread,
        # started here, after hivemind's last fork
        with Prefetcher(batches, partial(as_batch, device=self.device), depth=8, name="batches") as ahead:
            self._train(model, ahead)

    def _train(self, model, batches) -> None:
        self.stats.update(phase="training", local_epoch=self.opt.local_epoch)
        meter, status = EpochMeter(self.opt.local_epoch), StatusLine()
        model.train()
        while not self.stop_event.is_set():
            if self.heartbeat.refused is not None:
                raise PeerError(
                    f"stopped training: {self.heartbeat.refused}. The run's operator no longer accepts "
                    "this peer; ask them, or run it under another --name only if they agree"
                )
            t0 = time.monotonic()
            batch = next(batches)
            loss, compute_s = self._step(model, batch)
            meter.add(batch.shape[0], loss, time.monotonic() - t0, compute_s)
            swarm_peers = self.opt.tracker.global_progress.num_peers
            self.stats.update(
                local_epoch=self.opt.local_epoch,
                loss=loss,
                samples_per_s=meter.ema_rate,
                samples_total=meter.samples_total,
                swarm_size=swarm_peers,
            )
            status.draw(self.opt, loss, meter.ema_rate, swarm_peers)
            if self.opt.local_epoch != meter.epoch:
                status.clear()
                self._log_epoch(meter, swarm_peers)
                meter.start_epoch(self.opt.local_epoch)
                if self.config.max_epochs and meter.epoch >= self.config.max_epochs:
                    logger.info("reached --max-epochs %d, leaving", self.config.max_epochs)
                    return

    def _step(self, model, batch) -> tuple[float, float]:
        """Forward, backward and hivemind's step (which averages with the swarm when it is time):
        (loss, seconds of computing: forward, backward and a DiLoCo local step)."""
        import torch
        from crowdtrain.peer.robust import nonfinite_loss_message

        t0 = time.monotonic()
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
                loss = model(input_ids=batch, labels=batch).loss
            if not torch.isfinite(loss):
                raise PeerError(nonfinite_loss_message(loss.item(), self.opt.local_epoch, model))
            loss.backward()
        except torch.cuda.OutOfMemoryError as e:
            raise PeerError(
                f"{self.device_label} ran out of memory at --batch-size {self.batch_size} "
                f"({str(e).splitlines()[0][:120]}); restart with --batch-size {max(1, self.batch_size // 2)}, "
                "or free the GPU"
            ) from None
        if self.inner is not None:  # DiLoCo: a local step; hivemind's counts samples, steps the outer model
            self.inner.step()
        compute_s = time.monotonic() - t0
        self.opt.step()
        if self.inner is None:
            self.opt.zero_grad()
        return loss.item(), compute_s

    def _log_epoch(self, meter: EpochMeter, swarm_peers: int) -> None:
        mean_loss, rate = sum(meter.losses) / len(meter.losses), meter.epoch_rate()
        lr = (self.inner.optimizer if self.inner is not None else self.opt.opt).param_groups[0]["lr"]
        # the round that ended this epoch; none (it caught up by loading the state): alone
        group, self.opt.last_group = self.opt.last_group or (str(self.dht.peer_id),), ()
        emit(
            logger,
            "epoch",
            "epoch=%d loss=%.3f samples_per_s=%.1f swarm_peers=%d lr=%.1e samples_total=%d compute_share=%.2f "
            "averaged_with=%d group=%s",
            self.opt.local_epoch,
            mean_loss,
            rate,
            swarm_peers,
            lr,
            meter.samples_total,
            meter.compute_share(),
            len(group),
            group_fingerprint(group),
            epoch=self.opt.local_epoch,
            loss=round(mean_loss, 5),
            samples_per_s=round(rate, 3),
            swarm_peers=swarm_peers,
            lr=lr,
            samples_total=meter.samples_total,
            compute_share=round(meter.compute_share(), 4),
            averaged_with=len(group),  # the last gradient round's group, this peer included
            group=group_fingerprint(group),  # peers that averaged together log the same fingerprint
        )

    def save(self, model) -> None:
        """With --save-dir: write this peer's model there atomically (staging directory, then rename)."""
        from crowdtrain.peer.model import save_hf_atomically

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
