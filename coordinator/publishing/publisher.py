"""The checkpoint publisher: fetches the swarm's state as a client peer, evaluates it, publishes it.

It joins the swarm through its own client-mode DHT node, so it never serves state and never takes
part in an averaging round. It follows the swarm's global epoch with hivemind's `ProgressTracker`;
every `interval_s`, when the epoch advanced past the last published checkpoint, it downloads the
state from several voters itself (`statefetch.StateFetcher`: the `rpc_download_state` a late joiner
uses) and keeps one only if a majority of them agree on it (`choice.choose_state`: voters are
proven, long-standing identities named by the swarm's signed progress records, one vote each, so
neither one forged donor nor a crowd of fresh DHT identities can publish a state). Every tensor is
checked against the model once, where its stream is read (peer/swarm/statewire.py), before it is
copied in. It evaluates that state on the held-out split (`vetting.check_candidate`), writes an
HF-format directory atomically and signs it (`archive.finalize`), then applies retention
(`archive.retention_victims`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from crowdtrain.coordinator.publishing import archive
from crowdtrain.coordinator.publishing.agreement import FetchedState
from crowdtrain.coordinator.publishing.card import (
    NO_DATA_TERMS,
    CardFacts,
    DataTerms,
    model_card,
    project_url,
)
from crowdtrain.coordinator.publishing.choice import choose_state
from crowdtrain.coordinator.publishing.statefetch import StateFetcher, publisher_limits
from crowdtrain.coordinator.publishing.vetting import check_candidate
from crowdtrain.peer.checkpoints import format as checkpoint
from crowdtrain.peer.events import emit
from crowdtrain.peer.run.manifest import RunManifest
from crowdtrain.peer.run.tensors import expected_tensors
from crowdtrain.peer.swarm.statewire import PUBLISHER_BYTE_SLACK

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublisherSettings:
    interval_s: float = 60.0  # how often to look at the swarm's epoch and maybe publish
    listen_host: str = "127.0.0.1"  # interface of the publisher's own client-mode DHT node
    device: str = "cpu"  # where the candidate state is evaluated: cpu, cuda or cuda:N
    max_eval_regression_nats: float = 0.5  # refuse a state this much worse than the last checkpoint
    keep_last: int = 5  # retention: this many newest checkpoints (at least the latest)
    keep_every_steps: int = 0  # retention: and every step that is a multiple of this (0: none)
    agreement_peers: int = (
        2  # 1: trust one voter's state; more: a strict majority of the voters asked must agree
    )
    agreement_rel_tol: float = 0.01  # states agree within this relative L2 distance
    agreement_retry_s: float = 1.0  # wait before asking again when donors do not agree yet
    agreement_attempts: int = 3  # rounds of asking before a disagreement is recorded
    max_donors_asked: int = 4  # voters asked at once (at least agreement_peers), a strict majority must agree
    min_voter_age_s: float = 120.0  # a DHT identity's state counts once its first proven session is this old
    max_state_bytes_margin: float = PUBLISHER_BYTE_SLACK  # a donor may send this times the parameters' bytes


class Publisher:
    """Publishes the run's checkpoints into `checkpoint_root`; `voters()` gives the DHT identities
    whose state counts and why others do not (`voters.eligible_voters` over the coordinator's
    sessions), `on_reject(step, reason)` records each refused or contested state, `in_use()` names
    the steps being downloaded (kept). Each checkpoint's model card (`card.model_card`) states
    `data_terms` and credits `contributors()`, the leaderboard (`peers.status.contributors`)."""

    def __init__(
        self,
        settings: PublisherSettings,
        manifest: RunManifest,
        tokenizer_json: str,
        eval_shard: Path,
        checkpoint_root: Path,
        initial_peers: list[str],
        *,
        voters: Callable[[], tuple[frozenset[str], str]],
        signing_key=None,
        on_reject: Callable[[int, str], None] = lambda step, reason: None,
        in_use: Callable[[], set[int]] = set,
        data_read: Callable[[], str] = str,
        data_terms: DataTerms = NO_DATA_TERMS,
        contributors: Callable[[], list[dict]] = list,
    ):
        self.settings = settings
        self.manifest = manifest
        self.tokenizer_json = tokenizer_json
        self.eval_shard = eval_shard
        self.root = checkpoint_root
        self.initial_peers = initial_peers
        self.signing_key = signing_key
        self.on_reject = on_reject
        self.in_use = in_use
        self.voters, self.data_read = voters, data_read  # data_read: the model card's coverage line
        self.data_terms, self.contributors = data_terms, contributors
        self.project_url = project_url()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dht = self._tracker = self._fetcher = self._access = None

    def start(self) -> Publisher:
        """Build the model, join the swarm's DHT (client mode) and follow its progress records."""
        from crowdtrain.peer.data.shards import read_shard, tokenize_blocks
        from crowdtrain.peer.run.model import build_model, evaluate
        from crowdtrain.peer.swarm.wiring import start_progress_tracker
        from tokenizers import Tokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no tqdm bars in an operator's log
        self.model = build_model(self.manifest, self.settings.device)
        self.expected = expected_tensors(self.model)
        tokenizer = Tokenizer.from_str(self.tokenizer_json)
        blocks = tokenize_blocks(tokenizer, read_shard(self.eval_shard), self.manifest.data.seq_len)
        self.eval_blocks = blocks[: self.manifest.data.eval_max_sequences]
        self.initial_eval_loss = evaluate(self.model, self.eval_blocks)
        logger.info(
            "publisher: initial model eval loss %.4f on %d held-out sequences",
            self.initial_eval_loss,
            len(self.eval_blocks),
        )
        self._dht = self._start_dht()
        # only the swarm's epoch and size are needed: hivemind's progress tracker, not a whole
        # optimizer (no averager processes, no optimizer state for a model we never train).
        # hivemind 1.1.12 internals: the peers' Optimizer gives its tracker prefix=run_id, so ours
        # must too to read the same `<run_id>_progress` records (Optimizer._make_progress_tracker)
        self._tracker = start_progress_tracker(
            self._dht, self.manifest.run_id, self.manifest.swarm.target_batch_size
        )
        self._fetcher = StateFetcher(
            self._dht,
            self.manifest.run_id,
            publisher_limits(self.expected, self.settings.max_state_bytes_margin),
            timeout_s=self.manifest.swarm.load_state_timeout_s,
        )
        self._thread = threading.Thread(target=self._loop, name="publisher", daemon=True)
        self._thread.start()
        return self

    def _start_dht(self):
        """Our client-mode node; in a swarm that answers token holders only, with a swarm token of
        its own (coordinator/admission/swarmnodes.py), published so that peers serve it their state."""
        from crowdtrain.peer.swarm.wiring import start_dht

        if self.signing_key is None:
            return start_dht(self.initial_peers, listen_host=self.settings.listen_host, client_mode=True)
        from crowdtrain.coordinator.admission.swarmnodes import CoordinatorNodeAccess

        self._access = CoordinatorNodeAccess(
            self.manifest.run_id, self.signing_key, self.root.parent / "publisher-dht.key"
        )
        dht = start_dht(
            self.initial_peers,
            listen_host=self.settings.listen_host,
            client_mode=True,
            identity_path=str(self._access.identity.path),
            authorizer=self._access.authorizer(),
        )
        self._access.publish(dht)
        return dht

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.manifest.swarm.load_state_timeout_s + 10)
            self._thread = None
        if self._fetcher is not None:
            self._fetcher.shutdown()
            self._fetcher = None
        if self._tracker is not None:
            self._tracker.shutdown(timeout=10)
            self._tracker.join(timeout=10)  # its thread finishes its asyncio tasks (quiet exit)
            self._tracker = None
        if self._dht is not None:
            self._dht.shutdown()
            self._dht = None

    def __enter__(self) -> Publisher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def global_epoch(self) -> int:
        return self._tracker.global_epoch if self._tracker is not None else 0

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.interval_s):
            try:
                if self._access is not None:
                    self._access.publish(self._dht)  # renewed at half-life (MintedTokens)
                self.publish_once()
            except Exception as e:  # never let one bad round kill the publisher
                emit(
                    logger,
                    "publish_failed",
                    "publisher: round failed (%s: %s), will retry in %.0fs",
                    type(e).__name__,
                    e,
                    self.settings.interval_s,
                    level=logging.ERROR,
                    exc_info=True,
                    error=f"{type(e).__name__}: {e}",
                )

    def latest_step(self) -> int:
        metas = checkpoint.list_checkpoints(self.root)
        return metas[-1].step if metas else 0

    def publish_once(self) -> checkpoint.CheckpointMeta | None:
        """One round: the agreed state newer than the latest checkpoint, vetted, written, pruned."""
        import torch
        from crowdtrain.peer.run.model import evaluate

        last = self.latest_step()
        global_epoch = self.global_epoch
        if global_epoch <= last:
            logger.debug(
                "publisher: swarm at epoch %d, latest checkpoint %d: nothing new", global_epoch, last
            )
            return None
        t0 = time.monotonic()
        state = self.fetch_agreed_state(last)
        if state is None:
            return None
        epoch = state.epoch
        # its tensors fit the model, shape for shape (checked where its stream was read, statefetch):
        # Tensor.copy_ would broadcast a smaller one
        with torch.no_grad():
            for param, loaded in zip(self.model.parameters(), state.tensors, strict=True):
                param.copy_(loaded)
        eval_loss = evaluate(self.model, self.eval_blocks)
        if not self._passes_vetting(epoch, eval_loss):
            return None
        meta = self._write_checkpoint(epoch, eval_loss, last)
        seconds = time.monotonic() - t0
        emit(
            logger,
            "checkpoint_published",
            "published checkpoint step=%d eval_loss=%.4f (initial %.4f) in %.1fs",
            epoch,
            eval_loss,
            self.initial_eval_loss,
            seconds,
            step=epoch,
            eval_loss=eval_loss,
            seconds=round(seconds, 3),
        )
        self.prune()
        return meta

    def _passes_vetting(self, epoch: int, eval_loss: float) -> bool:
        """Whether the loaded state may be published (`vetting.check_candidate`); a refusal is
        logged and recorded."""
        metas = checkpoint.list_checkpoints(self.root)
        problem = check_candidate(
            eval_loss, metas[-1].eval_loss if metas else None, self.settings.max_eval_regression_nats
        )
        if problem is None:
            return True
        emit(
            logger,
            "checkpoint_refused",
            "publisher: not publishing the state of epoch %d: %s",
            epoch,
            problem,
            level=logging.WARNING,
            epoch=epoch,
            reason=problem,
        )
        self.on_reject(epoch, problem)
        return False

    def _write_checkpoint(self, epoch: int, eval_loss: float, last: int) -> checkpoint.CheckpointMeta:
        """The model as it stands, with tokenizer and model card, written atomically and signed."""
        from crowdtrain.peer.run.model import save_hf

        staging = archive.new_staging_dir(self.root, epoch)
        save_hf(self.model, self.tokenizer_json, self.manifest, staging)
        facts = CardFacts(
            step=epoch,
            eval_loss=eval_loss,
            # hivemind 1.1.12: ProgressTracker.global_progress, an attribute hivemind's own
            # Optimizer reads (not documented API): peers in the swarm's progress records
            contributing_peers=self._tracker.global_progress.num_peers,
            created=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            data_read=self.data_read(),
            contributors=tuple(self.contributors()),
        )
        card = model_card(self.manifest, facts, self.data_terms, self.project_url)
        (staging / "README.md").write_text(card, encoding="utf-8")
        return archive.finalize(
            staging,
            self.root,
            checkpoint.CheckpointMeta(
                run_id=self.manifest.run_id,
                step=epoch,
                samples_seen=epoch * self.manifest.swarm.target_batch_size,
                eval_loss=eval_loss,
                created_unix_s=time.time(),
                manifest_sha256=self.manifest.sha256(),
                previous_step=last or None,
                files=(),
            ),
            signing_key=self.signing_key,
        )

    def fetch_agreed_state(self, last: int) -> FetchedState | None:
        """A state newer than `last` that a majority of the voters asked agree on, else None
        (`choice.choose_state`: who is asked, what is refused, how often to ask again)."""
        voters, why = self.voters()
        return choose_state(self._fetcher, voters, why, last, self.settings, self._stop, self.on_reject)

    def prune(self) -> list[int]:
        """Apply retention: delete old checkpoints, never the latest nor one being downloaded."""
        steps = [m.step for m in checkpoint.list_checkpoints(self.root)]
        victims = archive.retention_victims(
            steps, self.settings.keep_last, self.settings.keep_every_steps, self.in_use()
        )
        for step in victims:
            archive.remove_checkpoint(self.root, step)
        if victims:
            logger.info("retention: removed checkpoints %s", victims)
        return victims
