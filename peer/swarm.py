"""hivemind wiring shared by volunteers and the coordinator's publisher.

Both must build the optimizer identically (same optimizer class, scheduler and offloading), or the
state one downloads from the other will not line up tensor for tensor. hivemind 1.1.12 pitfalls
handled here (see docs/hivemind.md): the fork start method, SIGINT being ignored after an averager
is created (callers install their handlers afterwards), and the optimizer needing the main thread.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.events import emit
from crowdtrain.peer.manifest import RunManifest

logger = logging.getLogger(__name__)


class SwarmError(CrowdtrainError):
    """The peer could not join the swarm's DHT; the message says what to check."""


_PR_SET_PDEATHSIG = 1
_tied = False


def _kill_own_children() -> None:
    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # ppid
            try:
                os.kill(int(stat.parent.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def tie_children_to_this_process() -> None:
    """Make every process forked from here die with us, even when we are killed with SIGKILL.

    hivemind's DHT and averagers are forked Python processes, and the DHT process starts the p2pd
    daemon; none of them notices when our process is killed with `kill -9` (or the OOM killer), so
    they would run on as orphans, p2pd still listening. After each fork the child asks the kernel
    for SIGTERM when its parent dies (Linux PR_SET_PDEATHSIG); its SIGTERM handler kills its own
    children (p2pd) and exits. Call once, early, in the process that owns the swarm. No-op off Linux.
    """
    global _tied
    if _tied or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def on_parent_death(signum, frame):
        _kill_own_children()
        os._exit(128 + signum)

    forking = [0]

    def before() -> None:
        forking[0] = os.getpid()

    def in_child() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        signal.signal(signal.SIGTERM, on_parent_death)
        if os.getppid() != forking[0]:  # the parent died before prctl took effect
            on_parent_death(signal.SIGTERM, None)

    # note: the kernel sends the signal when the forking *thread* exits; hivemind forks its DHT and
    # averagers from the main thread (it must: see make_optimizer), which lives as long as we do
    os.register_at_fork(before=before, after_in_child=in_child)
    _tied = True


def use_fork_start_method() -> None:
    """hivemind's averager is an mp.Process that cannot be pickled: only 'fork' works."""
    mp.set_start_method("fork", force=True)


class ClippedAdamW(torch.optim.AdamW):
    """AdamW that clips the (swarm-averaged) gradient norm right before each update."""

    def __init__(self, params, *, max_grad_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure=None):
        if self.max_grad_norm > 0:
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return super().step(closure)


def start_dht(
    initial_peers: Sequence[str],
    *,
    listen_host: str = "0.0.0.0",
    port: int = 0,
    announce_host: str = "",
    client_mode: bool = False,
    identity_path: str | None = None,
):
    """Start a hivemind DHT node; raises SwarmError naming the bootstrap peers when it cannot join."""
    import hivemind
    from hivemind.dht.crypto import RSASignatureValidator

    kwargs = dict(host_maddrs=[f"/ip4/{listen_host}/tcp/{port}"], client_mode=client_mode)
    if announce_host and port:
        kwargs["announce_maddrs"] = [f"/ip4/{announce_host}/tcp/{port}"]
    if identity_path:
        kwargs["identity_path"] = identity_path
    try:
        return hivemind.DHT(
            initial_peers=list(initial_peers),
            start=True,
            record_validators=[RSASignatureValidator()],
            **kwargs,
        )
    except Exception as e:  # hivemind raises P2PDaemonError, P2PHandlerError, asyncio errors, ...
        raise SwarmError(
            f"could not start the swarm's DHT node ({type(e).__name__}: {e}); bootstrap peers were "
            f"{list(initial_peers) or 'none'} - check that this machine can reach them (firewall, VPN), "
            "or pass --client-mode when behind NAT"
        ) from e


async def _ping_all(peer_ids, _dht, node) -> int:
    """Runs inside hivemind's DHT process (so it must be a picklable module-level function)."""
    import asyncio

    results = await asyncio.gather(*(node.protocol.call_ping(p) for p in peer_ids), return_exceptions=True)
    return sum(1 for r in results if r is not None and not isinstance(r, BaseException))


def rejoin_bootstrap_peers(dht, initial_peers: Sequence[str], timeout_s: float = 30.0) -> int:
    """Ping the coordinator's bootstrap node(s) again and put them back in our routing table.

    hivemind drops a peer from the routing table once it stops answering; after the coordinator
    restarts (same identity and address, empty memory) neither side would otherwise look for the
    other, and the swarm would split from the coordinator's publisher and monitor. Returns how
    many answered. Called when heartbeats reach the coordinator again.
    """
    if dht is None or not initial_peers:
        return 0
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    peer_ids = list({PeerID.from_base58(Multiaddr(m)["p2p"]) for m in initial_peers})
    answered = dht.run_coroutine(partial(_ping_all, peer_ids), return_future=True).result(timeout=timeout_s)
    emit(
        logger,
        "swarm_rejoined",
        "re-joined the swarm through %d of %d bootstrap peer(s)",
        answered,
        len(peer_ids),
        reached=answered,
        bootstrap_peers=len(peer_ids),
    )
    return answered


def make_optimizer(
    manifest: RunManifest, model: torch.nn.Module, dht, *, batch_size_per_step: int, verbose: bool
):
    """The run's hivemind.Optimizer: gradients averaged every `target_batch_size` samples, then AdamW.

    Must be called from the main thread (hivemind installs a signal handler), and afterwards the
    caller must re-install its own SIGINT/SIGTERM handlers.
    """
    import hivemind
    from hivemind.optim.grad_averager import GradientAverager

    # hivemind replays the LR schedule up to the loaded epoch before any optimizer step: expected
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")

    optim, swarm = manifest.optim, manifest.swarm
    request_timeout_s = max(0.5, min(3.0, swarm.matchmaking_time_s / 2))

    def optimizer_factory(params):
        return ClippedAdamW(
            params,
            lr=optim.learning_rate,
            betas=tuple(optim.betas),
            weight_decay=optim.weight_decay,
            max_grad_norm=optim.max_grad_norm,
        )

    def scheduler_factory(opt):
        warmup = max(1, optim.warmup_epochs)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: min(1.0, (epoch + 1) / warmup))

    return hivemind.Optimizer(
        dht=dht,
        run_id=manifest.run_id,
        target_batch_size=swarm.target_batch_size,
        batch_size_per_step=batch_size_per_step,
        optimizer=optimizer_factory,
        params=model.parameters(),
        scheduler=scheduler_factory,
        matchmaking_time=swarm.matchmaking_time_s,
        averaging_timeout=swarm.averaging_timeout_s,
        load_state_timeout=swarm.load_state_timeout_s,
        average_state_every=swarm.average_state_every,
        offload_optimizer=True,
        delay_optimizer_step=False,
        delay_grad_averaging=False,
        delay_state_averaging=True,
        # hivemind warns (and can deadlock) when a request may outlive the matchmaking window;
        # 1.1.12 forwards averager_opts to the state averager only, hence the factory for gradients
        averager_opts=dict(request_timeout=request_timeout_s),
        grad_averager_factory=partial(GradientAverager, request_timeout=request_timeout_s),
        verbose=verbose,
    )
