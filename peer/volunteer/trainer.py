"""A volunteer: join the run, build the model, load the swarm's state, train, heartbeat, leave.

    crowdtrain peer --coordinator 127.0.0.1:50051
    crowdtrain peer --coordinator 127.0.0.1:50051 --device cpu --threads 1 --batch-size 8   # tiny CPU

One log line per swarm epoch (in the text log format at most every 30 s, the others at DEBUG;
`--log-format json` has every `epoch` event):

    epoch=12 loss=5.231 samples_per_s=88.1 swarm_peers=2 lr=3.0e-03 samples_total=3456 compute_share=0.78
    averaged_with=2 group=3f9a0c1e

`Volunteer._run` reads top to bottom as the steps a peer takes; each step is a method below it.
`join()` returns a `Joined` record (what joining settled: the checked manifest, the run's key,
where to resume from, the swarm access, ...) and every later step takes it as its argument; what
the steps build for the steps after them (the heartbeat, the feed, the DHT node, the optimizer)
is declared in `Volunteer.__init__`, so the whole state of a volunteer reads in one place.
Catching up to the swarm lives in peer/volunteer/recovery.py, hivemind wiring in peer/swarm/wiring.py.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from crowdtrain.peer import __version__
from crowdtrain.peer.admission.access import SwarmAccess
from crowdtrain.peer.admission.identity import PeerIdentity
from crowdtrain.peer.checkpoints.trust import trust_joined_run
from crowdtrain.peer.data.cache import claim_run_cache
from crowdtrain.peer.data.feed import DataFeed
from crowdtrain.peer.errors import CrowdtrainError, RefusedByRun
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
from crowdtrain.peer.settings.layered import default_config_dir
from crowdtrain.peer.swarm.lifecycle import leave_swarm, rejoin_in_background, stop_on_signals
from crowdtrain.peer.volunteer.control import ControlServer, PeerControl, install_reload_signal
from crowdtrain.peer.volunteer.meter import (
    ContributionSummary,
    EpochLines,
    EpochMeter,
    StatusLine,
    log_epoch,
    standing_text,
)
from crowdtrain.peer.volunteer.pause_gate import PauseGate
from crowdtrain.peer.volunteer.recovery import Recovery
from crowdtrain.protos import coordinator_pb2 as pb

if TYPE_CHECKING:
    import torch
    from crowdtrain.peer.run.manifest import RunManifest

logger = logging.getLogger(__name__)


class PeerError(CrowdtrainError):
    """The volunteer cannot take part; the message says what to do."""


class PeerRefused(RefusedByRun, PeerError):
    """The run refused this peer (banned, not admitted, out of date): exit status 3, not restarted."""


REFUSAL_CODES = frozenset({"PERMISSION_DENIED", "FAILED_PRECONDITION"})  # a ban, admission, a version


@dataclass(frozen=True)
class Joined:
    """What joining settled, checked: `Volunteer.join()` returns it and every later step takes it as
    its argument. Its fields never change after Join (the swarm access they hold takes in renewed
    tokens on the heartbeat thread); what the steps build as the peer runs lives on the `Volunteer`."""

    reply: pb.JoinResponse  # Join's answer: session, peer id, bootstrap peers, tokenizer, this peer's lease
    manifest: RunManifest  # the run, its signature checked (peer/run/runproof.py)
    run_key: str  # the run's signing key (hex), trusted before or now (peer/checkpoints/trust.py)
    cache_dir: Path  # this run's shards, swarm token and checkpoints on this machine
    batch_size: int  # samples per optimizer step: --batch-size, else the manifest's
    device: torch.device  # where the model trains (--device, --gpu)
    device_label: str  # the device as heartbeats and the dashboard show it
    identity: PeerIdentity  # this peer's key: signs Join and proves its DHT peer id
    access: SwarmAccess  # the swarm token (delivered on the heartbeat thread); who may average with us

    @property
    def settings(self) -> pb.PeerSettings:
        """This peer's lease: its first shard and place, the heartbeat interval, the resume step."""
        return self.reply.settings

    @property
    def resume_from_step(self) -> int:
        """Where to resume from: 0 for the swarm's state; > 0 when nobody is training, the step of
        the latest checkpoint, which this peer loads first."""
        return self.reply.settings.resume_from_step


def own_page_url(http_base_url: str, dht_peer_id: str) -> str:
    """This peer's page on the coordinator's dashboard, by its hivemind id (kept across restarts
    with its identity key, so the bookmark lasts); "" when the coordinator named no HTTP address."""
    base = http_base_url.strip().rstrip("/")
    if not base.startswith(("http://", "https://")) or not dht_peer_id:
        return ""
    return f"{base}/peer/{dht_peer_id}"


def display_handle(config_dir: Path) -> str:
    """The display name of a peer not given --name: a random `volunteer-XXXX`, never the host name,
    kept in `config_dir`'s `display-name` so it lasts across restarts (one per start if that fails)."""
    path = config_dir / "display-name"
    try:
        saved = path.read_text(encoding="utf-8").strip()
        if re.fullmatch(r"volunteer-[0-9a-f]{4}", saved):
            return saved
    except OSError:  # none yet (or unreadable): make one
        pass
    handle = f"volunteer-{secrets.token_hex(2)}"
    try:
        config_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(handle + "\n", encoding="utf-8")
    except OSError as e:
        logger.info("display name %s is for this start only: cannot keep it in %s (%s)", handle, path, e)
    return handle


class Volunteer:
    """One training peer. `run()` blocks until stopped (SIGINT/SIGTERM, --max-epochs or an error)."""

    def __init__(self, config: PeerConfig, source=None):
        self.config = config  # live settings change it (peer/volunteer/control.py); source: its peer.toml
        # as Join, heartbeats and the public views show it: the volunteer's choice, else a random handle
        self.name = config.name or display_handle(default_config_dir())
        self.stop_event = threading.Event()  # SIGINT/SIGTERM or shutdown(); steps and threads watch it
        self.stats = StatsBox()  # what the heartbeats report; the steps and the feed update it
        self.client = CoordinatorClient(  # Join, Heartbeat, Leave and the reachability check
            config.coordinator, tls=ClientTls.from_flags(config.tls, config.tls_ca)
        )
        # SIGUSR1/SIGUSR2, --schedule, --pause-when-busy, --pause-on-battery (a bad value fails here)
        self.pauser = PauseMonitor(PauseSettings.from_peer_config(config), sampler=SystemSampler())
        self.pause_gate = PauseGate(self.pauser, self.stats, self.stop_event)
        self.control = PeerControl(self, source)  # crowdtrain ctl, and SIGHUP's reload of peer.toml
        self.control_server = ControlServer(self.control.handle, on_tick=self.control.tick)
        # Set by the steps of `_run` (empty until then); shutdown() releases whatever was set.
        # join(): this peer's identity key, held (locked) until shutdown() so no other peer here uses it
        self.identity: PeerIdentity | None = None
        # join(): this peer's session, kept as soon as Join answers so that shutdown() leaves it
        # even when a check after Join fails
        self.session_id = ""
        self.session_token = ""
        # start_heartbeat(): its thread reports `stats` and brings the swarm token and data hints
        self.heartbeat: HeartbeatReporter | None = None
        self.feed: DataFeed | None = None  # load_data(): this peer's place in the data
        self.recovery: Recovery | None = None  # build_model(): loads a checkpoint or the swarm's state
        self.stepper = None  # fit(): forward and backward in micro-batches this machine holds
        self.upload_limit = None  # join_swarm(): the --max-upload-mbps cap, when set
        self.dht = None  # join_swarm(): our DHT node (the heartbeat thread rejoins it on reconnect)
        self.inner = None  # join_swarm(): DiLoCo's local optimizer (mode=diloco only)
        # join_swarm(): what our averagers refused and with whom they averaged (heartbeat thread drains it)
        self.evidence_sink = None
        self.opt = None  # join_swarm(): the run's hivemind optimizer

    def run(self) -> int:
        self._install_signal_handlers()
        install_pause_signals(self.pauser.start())  # before hivemind forks: its children inherit them
        install_reload_signal(self.control)
        self.control_server.start()
        try:
            return self._run()
        finally:
            self.shutdown()

    def _run(self) -> int:
        joined = self.join()  # the run's manifest, our data shard, the swarm's bootstrap peers
        self.start_heartbeat(joined)
        batches = self.load_data(joined)  # the first shard now: a data problem fails before the swarm
        model = self.build_model(joined)  # the run's initial weights, or the checkpoint Join names
        self.fit(joined, model)  # the micro-batch this machine holds; refused here when none fits
        self.join_swarm(joined, model)  # admitted to the swarm, then DHT node and hivemind optimizer
        if self.stop_event.is_set():
            return 0
        self.recover(joined)  # catch up to the swarm's state (or the latest checkpoint)
        if self.stop_event.is_set():
            return 0
        self.train(joined, model, batches)
        self.save(joined, model)
        return 0

    # ------------------------------------------------------------------ the steps, in order

    def join(self) -> Joined:
        import torch

        if self.config.threads > 0:
            torch.set_num_threads(self.config.threads)
        device = pick_device(self.config.device, self.config.gpu)
        device_label = describe_device(device)
        identity = self.identity = self._identity()  # before Join: an allowlist admits identities
        reply = self._ask_to_join(identity, device_label)
        self.session_id = reply.session_id
        self.session_token = reply.session_token
        manifest = check_joined_run(
            reply.manifest_json, reply.manifest_sha256, reply.manifest_signature, reply.tokenizer_json
        )
        # its key: trusted here before, or first contact; another run under a new key needs --trust-new-run
        run_key = trust_joined_run(
            self.config.coordinator,
            manifest.run_id,
            manifest.signing_public_key,
            trust_new_run=self.config.trust_new_run,
        )
        cache_dir = claim_run_cache(self.config.cache_dir, manifest.run_id, self.config.max_cache_gb)
        emit(
            logger,
            "joined",
            "joined run %s as %r (peer id %s): %s model, first shard %d, device %s",
            manifest.run_id,
            self.name,
            reply.peer_id,
            manifest.preset,
            reply.settings.shard_index,
            device_label,
            run_id=manifest.run_id,
            name=self.name,
            peer_id=reply.peer_id,
            preset=manifest.preset,
            shard_index=reply.settings.shard_index,
            device=device_label,
        )
        page = own_page_url(reply.settings.http_base_url, identity.peer_id)
        if page:
            logger.info("your page: %s", page)
            self.control.page_url = page
        return Joined(
            reply=reply,
            manifest=manifest,
            run_key=run_key,
            cache_dir=cache_dir,
            batch_size=self.config.batch_size or manifest.swarm.batch_size_per_step,
            device=device,
            device_label=device_label,
            identity=identity,
            access=SwarmAccess(identity, manifest.run_id, run_key, cache_dir),
        )

    def _identity(self) -> PeerIdentity:
        """The key of --identity, else identity.key in the config directory (the one `crowdtrain
        identity` prints), created once; held by this process (a second peer on it is refused)."""
        path = Path(self.config.identity).expanduser() if self.config.identity else None
        return PeerIdentity.held(path or default_config_dir() / "identity.key")

    def _ask_to_join(self, identity: PeerIdentity, device_label: str) -> pb.JoinResponse:
        """The coordinator's answer to Join, retried until --join-timeout-s."""
        request = pb.JoinRequest(
            name=self.name,
            version=__version__,
            device=device_label,
            invite_code=self.config.invite,
            **DataFeed.resume_fields(self.config),  # where this peer stopped reading last time
        )
        try:
            return retry_until(  # signed anew at each try: the coordinator refuses an old signature
                lambda: self.client.join(identity.signed_join(request)),
                deadline_s=self.config.join_timeout_s,
                what=f"joining the run at {self.config.coordinator}",
                stop=self.stop_event,
            )
        except CoordinatorRejected as e:
            if e.code is not None and e.code.name in REFUSAL_CODES:
                raise PeerRefused(str(e)) from None  # a service must not ask again every minute
            raise

    def start_heartbeat(self, joined: Joined) -> None:
        initial_peers = list(joined.reply.initial_peers)
        self.stats.update(dht_peer_id=joined.identity.peer_id)  # proven by the first heartbeats
        self.heartbeat = HeartbeatReporter(
            self.client,
            joined.reply.session_id,
            joined.reply.session_token,
            self.stats,
            name=self.name,
            version=__version__,
            device=joined.device_label,
            interval_s=joined.settings.heartbeat_interval_s,
            on_reconnect=lambda: rejoin_in_background(self.dht, initial_peers),
            on_token=joined.access.on_token,
            evidence=self._evidence,
        )
        self.heartbeat.set_dht_proof(*joined.identity.prove(joined.reply.dht_challenge))
        self.heartbeat.start()

    def _evidence(self) -> list:
        """Rejected contributions and averaging groups our averagers recorded since the last heartbeat."""
        return heartbeat_messages(self.evidence_sink, self.stats.get().local_epoch)

    def load_data(self, joined: Joined) -> Iterator:
        """Endless (batch, place in the data) pairs, from where Join placed us (peer/data/feed.py)."""
        from tokenizers import Tokenizer

        self.feed = DataFeed(
            self.config, joined.manifest, joined.reply, joined.cache_dir, self.stats, self._answer
        )
        return self.feed.batches(Tokenizer.from_str(joined.reply.tokenizer_json), joined.batch_size)

    def _answer(self):
        return self.heartbeat.answer if self.heartbeat is not None else None

    def build_model(self, joined: Joined):
        from crowdtrain.peer.run.model import build_model, num_parameters

        model = build_model(joined.manifest, joined.device)
        logger.info(
            "model: %s with %.2fM parameters", joined.manifest.model.model_type, num_parameters(model) / 1e6
        )
        self.recovery = Recovery(
            self.config.coordinator, model, joined.device, joined.cache_dir, self.stop_event
        )
        self.recovery.use_key(joined.run_key, ClientTls.from_flags(self.config.tls, self.config.tls_ca))
        if joined.resume_from_step > 0:  # nobody is training: start from the latest checkpoint
            self.recovery.load_checkpoint(joined.resume_from_step)
        return model

    def fit(self, joined: Joined, model) -> None:
        """Precision and the largest micro-batch this machine holds (peer/machine/fit.py); refused here,
        before the swarm, when not even one sequence fits. Steps still count the whole batch."""
        from crowdtrain.peer.machine.accumulate import fit_to_machine

        self.stepper, why = fit_to_machine(
            model, joined.manifest, joined.device, joined.batch_size, self.config
        )
        micro = self.stepper.micro_batch
        emit(
            logger,
            "memory_plan",
            "memory: %s",
            why,
            micro_batch=micro,
            batch_size=joined.batch_size,
            reason=why,
        )

    def join_swarm(self, joined: Joined, model) -> None:
        from crowdtrain.peer.swarm.lifecycle import tie_children_to_this_process, use_fork_start_method
        from crowdtrain.peer.swarm.optimizers import inner_optimizer

        use_fork_start_method()
        tie_children_to_this_process()  # no orphans, even after kill -9
        joined.access.wait_for_token(self.config.token_wait_s, self.stop_event)  # admitted first
        if self.stop_event.is_set():
            return
        if self.config.max_upload_mbps > 0:  # before the DHT and averagers fork: they share the cap
            from crowdtrain.peer.machine.bandwidth import limit_upload

            self.upload_limit = limit_upload(self.config.max_upload_mbps)
        self.dht = self._start_dht(joined, self.config.client_mode)
        if not self.config.client_mode:  # can others reach us? If not: client mode, and why
            from crowdtrain.peer.link.reach import ensure_reachable

            as_client = partial(self._start_dht, joined, True)
            self.dht, reachable = ensure_reachable(
                self.dht, self.client, joined.reply.session_id, joined.reply.session_token, as_client
            )
            self.stats.update(client_mode=not reachable)
        joined.access.attach(self.dht)
        if joined.manifest.swarm.mode == "diloco":
            self.inner = inner_optimizer(joined.manifest, model)
        self.opt = self._make_optimizer(joined, model)
        self._install_signal_handlers()  # hivemind's averager just set SIGINT to "ignored"

    def _start_dht(self, joined: Joined, client_mode: bool):
        from crowdtrain.peer.swarm.wiring import start_dht

        return start_dht(
            list(joined.reply.initial_peers),
            listen_host=self.config.listen_host,
            port=0 if client_mode else self.config.listen_port,  # a client listens for nobody
            announce_host=self.config.announce_host,
            client_mode=client_mode,
            stop=self.stop_event,
            identity_path=str(joined.identity.path),
            authorizer=joined.access.authorizer(),
        )

    def _make_optimizer(self, joined: Joined, model):
        """The run's hivemind optimizer, averaging only with token holders and robustly."""
        from crowdtrain.peer.robust.evidence import EvidenceSink
        from crowdtrain.peer.swarm.wiring import make_optimizer

        self.evidence_sink = EvidenceSink()
        return make_optimizer(
            joined.manifest,
            model,
            self.dht,
            batch_size_per_step=joined.batch_size,
            verbose=False,
            gate=joined.access.gate(self.dht),
            evidence=self.evidence_sink,
            extra_tensors=self.inner.state_tensors() if self.inner is not None else (),
        )

    def recover(self, joined: Joined) -> None:
        if joined.resume_from_step > 0:
            self.recovery.continue_epoch_count(self.opt, joined.resume_from_step)
        self.stats.update(phase="loading_state")
        self.recovery.catch_up(self.opt, joined.manifest.swarm)

    def train(self, joined: Joined, model, batches: Iterator[list[list[int]]]) -> None:
        """Step until stopped, banned, or --max-epochs; one log line per swarm epoch (meter.EpochLines)."""
        from crowdtrain.peer.data.feed import as_tagged_batch
        from crowdtrain.peer.data.prefetch import Prefetcher

        # batches (and the next shard's download and tokenization) are made ahead on a thread,
        # started here, after hivemind's last fork
        tensors = partial(as_tagged_batch, device=joined.device)
        with Prefetcher(batches, tensors, depth=8, name="batches") as ahead:
            self._train(joined, model, ahead)

    def _train(self, joined: Joined, model, batches) -> None:
        """The training loop, under the live line (drawn on a terminal only)."""
        self.stats.update(phase="training", local_epoch=self.opt.local_epoch)
        with StatusLine() as status:
            self._train_steps(joined, model, batches, status)

    def _train_steps(self, joined: Joined, model, batches, status: StatusLine) -> None:
        meter = EpochMeter(self.opt.local_epoch)
        epoch_lines = EpochLines()  # text logs: an epoch line every 30 s at most (json: each one)
        summary = ContributionSummary()
        model.train()
        while not self.stop_event.is_set():
            self.control.apply_in_loop()  # a thread count `crowdtrain ctl set` or SIGHUP changed
            if self.heartbeat.refused is not None:
                raise PeerRefused(
                    f"stopped training: {self.heartbeat.refused}. The run's operator no longer accepts "
                    "this peer; ask them, or run it under another --name only if they agree"
                )
            # paused: hands in its samples, idles, re-syncs (peer/volunteer/pause_gate.py)
            if self.pause_gate.paused(self.opt.local_epoch):  # finish-and-pause: once the epoch turned
                status.clear()
                self.pause_gate.wait(
                    self.opt,
                    resync=partial(self.recovery.catch_up, self.opt, joined.manifest.swarm),
                    show=partial(self._show_paused, status),
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
            status.draw(
                self.opt, loss, meter.ema_rate, swarm_peers, standing_text(self._answer(), short=True)
            )
            if self.opt.local_epoch != meter.epoch:
                status.clear()
                log_epoch(self.opt, self.inner, self.dht, meter, swarm_peers, epoch_lines.level())
                summary.maybe_log(self._answer())
                meter.start_epoch(self.opt.local_epoch)
                if self.config.max_epochs and meter.epoch >= self.config.max_epochs:
                    logger.info("reached --max-epochs %d, leaving", self.config.max_epochs)
                    break
        summary.maybe_log(self._answer(), force=True)  # leaving: what the swarm accepted of its work

    def _show_paused(self, status: StatusLine, reason: str) -> None:
        """While paused, the live line says `PAUSED (reason)` (a terminal only)."""
        swarm_peers = self.opt.tracker.global_progress.num_peers
        status.draw_paused(
            reason, self.opt.local_epoch, swarm_peers, standing_text(self._answer(), short=True)
        )

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

    def save(self, joined: Joined, model) -> None:
        """With --save-dir: write this peer's model there atomically (staging directory, then rename)."""
        from crowdtrain.peer.run.model import save_hf_atomically

        if self.config.save_dir:
            out = Path(self.config.save_dir).expanduser()
            extra = {"epoch.txt": f"{self.opt.local_epoch}\n"}
            save_hf_atomically(model, joined.reply.tokenizer_json, joined.manifest, out, extra)
            logger.info("saved this peer's model at epoch %d to %s", self.opt.local_epoch, out)

    # ------------------------------------------------------------------ signals and teardown

    def _install_signal_handlers(self) -> None:
        stop_on_signals(self.stop_event, "leaving the swarm after this step")

    def shutdown(self) -> None:
        """Leave the run and stop hivemind's processes; idempotent, safe from any exit path."""
        self.stop_event.set()
        self.control_server.shutdown()
        self.pauser.shutdown()
        if self.feed is not None:
            self.feed.save()  # where this peer stopped reading, for its next start
        if self.heartbeat is not None:
            self.heartbeat.shutdown()
            self.heartbeat = None
        if self.session_id:
            try:
                self.client.leave(self.session_id, self.session_token, reason="shutdown")
            except (CoordinatorUnavailable, CoordinatorRejected) as e:
                logger.info("could not tell the coordinator we leave: %s", e)
            self.session_id = ""
            self.session_token = ""
        opt, dht = self.opt, self.dht
        self.opt = None
        self.dht = None
        try:
            leave_swarm(opt, dht)
        except Exception:  # hivemind internals changed (docs/hivemind.md): report, keep the real exit
            logger.exception("leaving the swarm failed; its processes are stopped with this one")
        finally:
            self.client.close()
            if self.upload_limit is not None:
                self.upload_limit.shutdown()
            if self.identity is not None:  # another peer may use this key from now on
                self.identity.release()
