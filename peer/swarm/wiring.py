"""hivemind wiring shared by volunteers and the coordinator: DHT nodes and the optimizer.

Volunteers build the run's `hivemind.Optimizer` here (`make_optimizer`), all with the same optimizer
class, scheduler, offloading and parameter order: the state one peer downloads from another must
line up tensor for tensor, and the coordinator's publisher, which follows the swarm with hivemind's
`ProgressTracker` and downloads that state itself (coordinator/publishing/statefetch.py), reads its first
tensors as the model's parameters in `model.parameters()` order. hivemind 1.1.12 pitfalls handled
here (see docs/hivemind.md): the fork start method, SIGINT being ignored after an averager is created
(callers install their handlers afterwards), the optimizer needing the main thread, orphaned
children (leaving in order is peer/swarm/lifecycle.py). Every use of a hivemind internal is a
small function at the end of this file, named in docs/hivemind.md.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import hivemind
import torch
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.events import route_hivemind_logs
from crowdtrain.peer.run.manifest import RunManifest
from crowdtrain.peer.run.report import dht_claim_message
from hivemind.optim.progress_tracker import ProgressTracker

logger = logging.getLogger(__name__)


class SwarmError(CrowdtrainError):
    """The peer could not join the swarm's DHT; the message says what to check."""


class DhtIdentity:
    """This peer's hivemind (libp2p) identity and the proof that its DHT peer id is its own.

    The DHT starts from a private key file (hivemind's `identity_path`, written when the DHT
    starts), so this process holds the key behind its peer id. The coordinator gives each session a
    random challenge at Join; `prove` signs it (with the peer id: `report.dht_claim_message`), and
    the heartbeat carries the public key and the signature until the coordinator answers
    `dht_verified`. Only then do the swarm's progress records of this peer id count as this
    session's contribution.

    A new identity key path in a fresh private (0700) directory under `cache_dir`, removed when
    this object is collected or the process exits. One identity per process, so peers sharing a
    cache directory never collide (hivemind refuses an identity another peer uses)."""

    def __init__(self, cache_dir: Path):
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        self._dir = tempfile.TemporaryDirectory(
            prefix="dht-identity-", dir=cache_dir, ignore_cleanup_errors=True
        )
        self.path = Path(self._dir.name) / "identity.key"

    def prove(self, challenge: bytes, dht_peer_id: str) -> tuple[bytes, bytes]:
        """(libp2p PublicKey protobuf, signature of the claim) for the key hivemind wrote to `path`,
        as `crowdtrain.coordinator.admission.signatures.verify_dht_claim` checks them."""
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding
        from hivemind.proto import crypto_pb2

        stored = crypto_pb2.PrivateKey.FromString(self.path.read_bytes())
        private_key = serialization.load_der_private_key(stored.data, password=None)
        public_der = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        public_key = crypto_pb2.PublicKey(key_type=stored.key_type, data=public_der).SerializeToString()
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
        signature = private_key.sign(dht_claim_message(challenge, dht_peer_id), pss, hashes.SHA256())
        return public_key, signature


def start_dht(
    initial_peers: Sequence[str],
    *,
    listen_host: str = "0.0.0.0",
    port: int = 0,
    announce_host: str = "",
    client_mode: bool = False,
    identity_path: str | None = None,
    authorizer=None,
    extra_validators: Sequence = (),
    nat_port_map: bool = True,
    attempts: int = 4,
    retry_s: float = 5.0,
    stop: threading.Event | None = None,
):
    """Start a hivemind DHT node; raises SwarmError naming the bootstrap peers when it cannot join.

    The bootstrap peers are usually the coordinator's own node: a volunteer starting while the
    coordinator restarts would find nobody there, so a failure is retried (`attempts` in all,
    `retry_s`, then twice that, ... apart) before giving up; setting `stop` ends the waiting.
    A node with the swarm's `authorizer` also validates the run's records (peer/admission/dhtrecords.py),
    with `extra_validators` besides; `nat_port_map=False` keeps p2pd from asking the local router
    for a UPnP port mapping (servers, whose port the operator opens).
    hivemind's records, from this process and the ones it forks, go through our log handler at the
    level peer/events.py `configure_hivemind_logging` chose (WARNING unless --log-level debug).
    """
    # before the first of hivemind's processes forks: they all log through our handler, at our level
    route_hivemind_logs()
    # a client looks for libp2p relays (hivemind's use_auto_relay) to be reachable through them
    kwargs = dict(
        host_maddrs=[f"/ip4/{listen_host}/tcp/{port}"],
        client_mode=client_mode,
        use_auto_relay=client_mode,
        nat_port_map=nat_port_map,
    )
    if announce_host and port:
        kwargs["announce_maddrs"] = [f"/ip4/{announce_host}/tcp/{port}"]
    if identity_path:
        kwargs["identity_path"] = identity_path
        kwargs["check_if_identity_free"] = False  # our keys are fresh or persistent per volunteer
    if authorizer is not None:  # peer/admission/access.py: only swarm-token holders are answered
        kwargs["authorizer"] = authorizer
    kwargs["record_validators"] = [*_record_validators(authorizer), *extra_validators]
    for attempt in range(1, attempts if initial_peers else 1):
        try:
            return _start_dht_once(initial_peers, kwargs)
        except SwarmError as e:
            wait_s = retry_s * 2 ** (attempt - 1)
            logger.warning(
                "%s; the coordinator may be restarting: retrying in %.0fs (%d/%d)",
                e,
                wait_s,
                attempt,
                attempts,
            )
            if stop is not None and stop.wait(wait_s):
                raise SwarmError(f"stopped while waiting for the swarm's bootstrap peers: {e}") from e
            if stop is None:
                time.sleep(wait_s)
    return _start_dht_once(initial_peers, kwargs)


def _record_validators(authorizer) -> list:
    """hivemind's signed records; with the swarm's authorizer, the run's records too, each written
    only by its owner (peer/admission/dhtrecords.py)."""
    from crowdtrain.peer.admission.access import SwarmAuthorizer
    from hivemind.dht.crypto import RSASignatureValidator

    if isinstance(authorizer, SwarmAuthorizer):
        return authorizer.record_validators()
    return [RSASignatureValidator()]


def _start_dht_once(initial_peers: Sequence[str], kwargs: dict):
    try:
        return hivemind.DHT(initial_peers=list(initial_peers), start=True, **kwargs)
    except Exception as e:  # hivemind raises P2PDaemonError, P2PHandlerError, asyncio errors, ...
        raise SwarmError(
            f"could not start the swarm's DHT node ({type(e).__name__}: {e}); bootstrap peers were "
            f"{list(initial_peers) or 'none'} - check that this machine can reach them (firewall, VPN), "
            "or pass --client-mode when behind NAT"
        ) from e


def make_optimizer(
    manifest: RunManifest,
    model,
    dht,
    *,
    batch_size_per_step: int,
    verbose: bool,
    gate=None,
    evidence=None,
    extra_tensors=(),
):
    """The run's hivemind.Optimizer: sync mode averages gradients every `target_batch_size` samples,
    then AdamW; diloco mode (peer/swarm/diloco.py) pseudo-gradients, then an outer Nesterov step, while the
    caller steps `inner_optimizer(...)`, whose `state_tensors()` are our `extra_tensors`. Averagers
    are robust (peer/swarm/averaging.py); only peers `gate(peer_id) -> (admitted, reason)` admits average
    or swap state with us; refused contributions go to `evidence` (an EvidenceSink). Call from the
    main thread, then re-install SIGINT/SIGTERM handlers (hivemind's replace them); `leave_swarm` stops it."""
    from crowdtrain.peer.swarm.averaging import GRAD_PART_SIZE_BYTES, grad_compression

    # hivemind replays the LR schedule up to the loaded epoch before any optimizer step: expected
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")

    swarm = manifest.swarm
    request_timeout_s = max(0.5, min(3.0, swarm.matchmaking_time_s / 2))
    averager_class, state_averager_class, optimizer, scheduler = _mode(manifest)
    return _Optimizer(
        dht=dht,
        # hivemind 1.1.12 reads dht.client_mode only when given one: else a client crashes at epoch 1
        client_mode=dht.client_mode,
        run_id=manifest.run_id,
        target_batch_size=swarm.target_batch_size,
        batch_size_per_step=batch_size_per_step,
        optimizer=optimizer,
        params=model.parameters(),
        scheduler=scheduler,
        matchmaking_time=swarm.matchmaking_time_s,
        averaging_timeout=swarm.averaging_timeout_s,
        load_state_timeout=swarm.load_state_timeout_s,
        average_state_every=swarm.average_state_every,
        offload_optimizer=True,  # in diloco mode, the offloaded copy is the outer model
        # overlap: averaging (and the step) runs while the next epoch computes (see peer/swarm/diloco.py)
        delay_optimizer_step=swarm.overlap_communication,
        delay_grad_averaging=swarm.overlap_communication,
        delay_state_averaging=swarm.mode != "diloco" or swarm.overlap_communication,
        extra_tensors=extra_tensors,
        grad_compression=grad_compression(swarm.grad_compression, swarm),
        # a request must not outlive matchmaking (hivemind warns, can deadlock); 1.1.12 forwards
        # averager_opts to the state averager only, hence the factory for gradients
        averager_opts=dict(request_timeout=request_timeout_s),
        grad_averager_factory=partial(
            averager_class,
            request_timeout=request_timeout_s,
            part_size_bytes=GRAD_PART_SIZE_BYTES,
            gate=gate,
            evidence=evidence,
        ),
        guard=dict(gate=gate, evidence=evidence, averager_class=state_averager_class),
        verbose=verbose,
    )


def _mode(manifest: RunManifest):
    """(gradient and state averager classes, optimizer and scheduler factories) of the run's mode."""
    from crowdtrain.peer.swarm.averaging import GuardedGradientAverager, GuardedStateAverager
    from crowdtrain.peer.swarm.diloco import OuterStateAverager, PseudoGradientAverager
    from crowdtrain.peer.swarm.optimizers import adamw, outer_optimizer, warmup_schedule

    optim, swarm = manifest.optim, manifest.swarm
    if swarm.mode == "diloco":
        outer = partial(
            outer_optimizer, learning_rate=swarm.outer_learning_rate, momentum=swarm.outer_momentum
        )
        return PseudoGradientAverager, OuterStateAverager, outer, None
    schedule = partial(warmup_schedule, warmup_epochs=optim.warmup_epochs)
    return GuardedGradientAverager, GuardedStateAverager, partial(adamw, optim=optim), schedule


# ------------------------------------------------------------------ hivemind 1.1.12 internals
# Each relies on private hivemind API: docs/hivemind.md lists them and what breaks if they change.


def set_local_epoch(opt, epoch: int) -> None:
    """Make the optimizer continue from `epoch` (a checkpoint's step), as hivemind does itself after
    loading state from a peer: the LR schedule catches up to `epoch`, optimizer statistics start afresh.
    hivemind 1.1.12: `TrainingStateAverager._update_scheduler()` is that catch-up; there is no
    public way to move an optimizer to an epoch other than downloading a peer's state."""
    averager = opt.state_averager
    averager.local_epoch = epoch
    averager._update_scheduler()
    opt.tracker.report_local_progress(local_epoch=epoch, samples_accumulated=0)


def refresh_offloaded_parameters(opt, model: torch.nn.Module) -> None:
    """Copy `model`'s parameters (just loaded from a checkpoint) into the optimizer's own copy.
    hivemind 1.1.12, `offload_optimizer=True`: the optimizer steps a separate CPU copy of the
    parameters, `opt.state_averager.optimizer`'s, and writes it back into the model after each step."""
    from crowdtrain.peer.swarm.diloco import forget_local_progress  # nothing local is left to keep

    offloaded = [p for group in opt.state_averager.optimizer.param_groups for p in group["params"]]
    with torch.no_grad():
        for copy, param in zip(offloaded, model.parameters(), strict=True):
            copy.copy_(param)
    forget_local_progress(getattr(opt.state_averager, "progress", None), offloaded)


def finish_event_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is still pending on a stopped `loop`, let it unwind, and close the loop: tasks
    left pending are reported as "Task was destroyed but it is pending!" when they are collected.
    For the loops hivemind's classes run on threads of ours and leave open (ProgressTracker's, a
    `P2P.replicate` client's)."""
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()


# hivemind 1.1.12's tracker stores our progress in the DHT after every micro-batch: each store is
class _TidyProgressTracker(ProgressTracker):
    """hivemind 1.1.12's ProgressTracker, tidy when it stops: hivemind's returns from its thread with a
    DHT request and a shutdown watcher still pending and its event loop open ("Task was destroyed
    but it is pending!" at exit). Its `run()` leaves that loop as the thread's current one."""

    def run(self):
        try:
            super().run()
        finally:
            finish_event_loop(asyncio.get_event_loop())


def start_progress_tracker(dht, run_id: str, target_batch_size: int, **kwargs) -> ProgressTracker:
    """hivemind's ProgressTracker for `run_id` (reads and writes `<run_id>_progress`, as the peers'
    optimizers do), started, and quiet when it stops (`shutdown()` then `join()`)."""
    return _TidyProgressTracker(
        dht=dht, prefix=run_id, target_batch_size=target_batch_size, start=True, **kwargs
    )


class _Optimizer(hivemind.Optimizer):
    """hivemind.Optimizer with a progress tracker that finishes its asyncio tasks when it stops, and
    the guarded state averager (peer/swarm/averaging.py). hivemind 1.1.12: `_make_progress_tracker` and
    `_make_state_averager` are the (private) hooks its __init__ builds them with; these pass the
    same arguments as hivemind's own."""

    def __init__(self, *, guard: dict, **kwargs):
        from crowdtrain.peer.swarm.diloco import attach_outer_parameters

        self._guard = guard  # gate and evidence sink of the state averager
        self.last_group: tuple[str, ...] = ()  # peer ids of the last gradient round's group
        super().__init__(**kwargs)
        attach_outer_parameters(self, overlap=self.delay_grad_averaging)

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control):
        """hivemind's, then note who this round averaged with (the epoch log line reports it)."""
        from crowdtrain.peer.swarm.averaging import round_group

        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        self.last_group = round_group(maybe_step_control, self.dht.peer_id)

    def _make_state_averager(self, **kwargs):
        from crowdtrain.peer.swarm.averaging import make_state_averager

        return make_state_averager(self, **self._guard, **kwargs)

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> ProgressTracker:
        return start_progress_tracker(
            self.dht,
            self.run_id,
            target_batch_size,
            client_mode=self.client_mode,
            status_loglevel=self.status_loglevel,
            **kwargs,
        )
