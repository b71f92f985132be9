"""A volunteer: join the run, build the model, load the swarm's state, train, heartbeat, leave.

    crowdtrain peer --coordinator 127.0.0.1:50051
    crowdtrain peer --coordinator 127.0.0.1:50051 --device cpu --threads 1 --batch-size 8   # tiny CPU

One log line per swarm epoch:

    epoch=12 loss=5.231 samples_per_s=88.1 swarm_peers=2 lr=3.0e-03 samples_total=3456
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from crowdtrain.peer import __version__
from crowdtrain.peer.client import CoordinatorClient, CoordinatorRejected, CoordinatorUnavailable, retry_until
from crowdtrain.peer.config import PeerConfig
from crowdtrain.peer.data import sha256_file
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.events import emit
from crowdtrain.peer.heartbeat import HeartbeatReporter, StatsBox
from crowdtrain.peer.manifest import RunManifest, ShardSpec
from crowdtrain.peer.swarm import rejoin_bootstrap_peers
from crowdtrain.protos import coordinator_pb2 as pb

logger = logging.getLogger(__name__)

STATE_LOAD_ATTEMPTS = 5  # then fall back to the latest published checkpoint


class PeerError(CrowdtrainError):
    """The volunteer cannot take part; the message says what to do."""


def download_shard(base_url: str, shard: ShardSpec, cache_dir: Path, timeout_s: float = 120.0) -> Path:
    """Fetch one data shard into the cache (atomically) unless a verified copy is there already."""
    path = cache_dir / shard.name
    if path.exists() and path.stat().st_size == shard.size_bytes and sha256_file(path) == shard.sha256:
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    url = f"{base_url}/data/{shard.name}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise PeerError(
            f"could not download data shard {url}: {e}; is the coordinator's HTTP port reachable?"
        ) from e
    if sha256_file(tmp) != shard.sha256:
        tmp.unlink(missing_ok=True)
        raise PeerError(
            f"data shard {url} does not match the manifest's sha256; the download was corrupted, retry"
        )
    os.replace(tmp, path)
    return path


def pick_device(requested: str):
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PeerError(
            "--device cuda was requested but torch sees no CUDA GPU; use --device cpu or install a CUDA build"
        )
    return device


def describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


class Volunteer:
    """One training peer. `run()` blocks until stopped (SIGINT/SIGTERM, --max-epochs or an error)."""

    def __init__(self, config: PeerConfig):
        self.config = config
        self.name = config.name or socket.gethostname()
        self.stop_event = threading.Event()
        self.stats = StatsBox()
        self.client = CoordinatorClient(config.coordinator)
        self.dht = self.opt = self.heartbeat = None
        self.session_id = ""

    # ------------------------------------------------------------------ setup

    def join(self) -> pb.JoinResponse:
        import torch

        if self.config.threads > 0:
            torch.set_num_threads(self.config.threads)
        self.device = pick_device(self.config.device)
        self.device_label = describe_device(self.device)
        request = pb.JoinRequest(name=self.name, version=__version__, device=self.device_label)
        response = retry_until(
            lambda: self.client.join(request),
            deadline_s=self.config.join_timeout_s,
            what=f"joining the run at {self.config.coordinator}",
            stop=self.stop_event,
        )
        self.session_id = response.session_id
        return response

    def _install_signal_handlers(self) -> None:
        main_pid = os.getpid()

        def handler(signum, frame):
            if os.getpid() != main_pid:
                # a hivemind child forked from us. Ctrl+C in a terminal sends SIGINT to the whole
                # process group: ignore it, the parent shuts its children down in order. SIGTERM is
                # what hivemind itself sends a child that did not stop in time: obey it.
                if signum == signal.SIGTERM:
                    signal.signal(signum, signal.SIG_DFL)
                    os.kill(os.getpid(), signum)
                return
            if self.stop_event.is_set():
                raise KeyboardInterrupt  # a second signal: stop waiting for a clean exit
            logger.info("received %s, leaving the swarm after this step", signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    # ------------------------------------------------------------------ main

    def run(self) -> int:
        self._install_signal_handlers()
        try:
            return self._run()
        finally:
            self.shutdown()

    def _run(self) -> int:
        import torch
        from crowdtrain.peer.data import read_shard, rotating_batches, tokenize_blocks
        from crowdtrain.peer.model import as_batch, build_model, num_parameters
        from crowdtrain.peer.swarm import (
            make_optimizer,
            start_dht,
            tie_children_to_this_process,
            use_fork_start_method,
        )
        from hivemind.utils import get_dht_time
        from tokenizers import Tokenizer

        joined = self.join()
        manifest = RunManifest.from_json(joined.manifest_json)
        if manifest.sha256() != joined.manifest_sha256:
            raise PeerError("the run manifest arrived corrupted (sha256 mismatch); restart the peer")
        settings = joined.settings
        emit(
            logger,
            "joined",
            "joined run %s as %r (session %s): %s model, first shard %d, device %s",
            manifest.run_id,
            self.name,
            self.session_id[:8],
            manifest.preset,
            settings.shard_index,
            self.device_label,
            run_id=manifest.run_id,
            name=self.name,
            preset=manifest.preset,
            shard_index=settings.shard_index,
            device=self.device_label,
        )
        self.heartbeat = HeartbeatReporter(
            self.client,
            self.session_id,
            self.stats,
            name=self.name,
            version=__version__,
            device=self.device_label,
            interval_s=settings.heartbeat_interval_s,
            on_reconnect=lambda: rejoin_bootstrap_peers(self.dht, list(joined.initial_peers)),
        ).start()

        cache_dir = Path(self.config.cache_dir).expanduser() / manifest.run_id
        tokenizer = Tokenizer.from_str(joined.tokenizer_json)
        batch_size = self.config.batch_size or manifest.swarm.batch_size_per_step
        first_shard = settings.shard_index % len(manifest.data.shards)

        def load_blocks(index: int) -> list[list[int]] | None:
            shard = manifest.data.shards[index]
            try:
                path = download_shard(settings.http_base_url, shard, cache_dir)
            except PeerError as e:
                if index == first_shard:
                    raise
                logger.warning("%s; training on the previous shard again", e)
                return None
            blocks = tokenize_blocks(tokenizer, read_shard(path), manifest.data.seq_len)
            logger.info("data: %s, %d sequences of %d tokens", shard.name, len(blocks), manifest.data.seq_len)
            return blocks

        seed = self.config.seed or zlib.crc32(self.session_id.encode())
        batches = rotating_batches(len(manifest.data.shards), first_shard, load_blocks, batch_size, seed)
        next_batch = next(batches)  # fetch the first shard now: a data problem fails before joining the swarm

        use_fork_start_method()
        tie_children_to_this_process()  # no orphans, even after kill -9
        model = build_model(manifest, self.device)
        logger.info("model: %s with %.2fM parameters", manifest.model.model_type, num_parameters(model) / 1e6)
        resume_step = settings.resume_from_step
        if resume_step > 0:  # nobody is training: start from the community's latest checkpoint
            self._load_checkpoint(model, resume_step, cache_dir)
        self.dht = start_dht(
            list(joined.initial_peers),
            listen_host=self.config.listen_host,
            announce_host=self.config.announce_host,
            client_mode=self.config.client_mode,
        )
        self.stats.update(dht_peer_id=self.dht.peer_id.to_base58())
        self.opt = make_optimizer(manifest, model, self.dht, batch_size_per_step=batch_size, verbose=False)
        self._install_signal_handlers()  # hivemind's averager just set SIGINT to "ignored"
        if resume_step > 0:
            self._continue_epoch_count(resume_step)

        self._catch_up(manifest, model, cache_dir)
        if self.stop_event.is_set():
            return 0

        self.stats.update(phase="training", local_epoch=self.opt.local_epoch)
        use_amp = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        epoch, epoch_losses, epoch_samples, epoch_t0 = self.opt.local_epoch, [], 0, time.monotonic()
        samples_total, ema_rate = 0, 0.0
        # a live status line on a terminal; plain epoch log lines when output is a file or a pipe
        live, last_draw = sys.stderr.isatty(), 0.0
        model.train()
        while not self.stop_event.is_set():
            if self.heartbeat.refused is not None:
                raise PeerError(
                    f"stopped training: {self.heartbeat.refused}. The run's operator no longer accepts "
                    "this peer; ask them, or run it under another --name only if they agree"
                )
            t0 = time.monotonic()
            batch = as_batch(next_batch, self.device)
            try:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss = model(input_ids=batch, labels=batch).loss
                if not torch.isfinite(loss):
                    raise PeerError(
                        f"training loss became {loss.item()} at epoch {self.opt.local_epoch}; "
                        "lower the learning rate"
                    )
                loss.backward()
            except torch.cuda.OutOfMemoryError as e:
                raise PeerError(
                    f"{self.device_label} ran out of memory at --batch-size {batch_size} "
                    f"({str(e).splitlines()[0][:120]}); restart with --batch-size {max(1, batch_size // 2)}, "
                    "or free the GPU"
                ) from None
            self.opt.step()
            self.opt.zero_grad()
            next_batch = next(batches)
            loss_value = loss.item()
            samples_total += batch.shape[0]
            rate = batch.shape[0] / max(time.monotonic() - t0, 1e-6)
            ema_rate = rate if ema_rate == 0 else 0.9 * ema_rate + 0.1 * rate
            epoch_losses.append(loss_value)
            epoch_samples += batch.shape[0]
            swarm_peers = self.opt.tracker.global_progress.num_peers
            self.stats.update(
                local_epoch=self.opt.local_epoch,
                loss=loss_value,
                samples_per_s=ema_rate,
                samples_total=samples_total,
                swarm_size=swarm_peers,
            )
            if live and time.monotonic() - last_draw >= 0.5:
                last_draw = time.monotonic()
                eta_s = max(0.0, self.opt.tracker.estimated_next_update_time - get_dht_time())
                sys.stderr.write(
                    f"\r\033[Kepoch {self.opt.local_epoch} | loss {loss_value:.3f} | {ema_rate:.1f} samples/s | "
                    f"swarm {swarm_peers} peers | next averaging in {eta_s:.0f}s"
                )
                sys.stderr.flush()
            if self.opt.local_epoch != epoch:
                if live:
                    sys.stderr.write("\r\033[K")  # the epoch log line replaces the live status line
                elapsed = time.monotonic() - epoch_t0
                mean_loss, lr = sum(epoch_losses) / len(epoch_losses), self.opt.opt.param_groups[0]["lr"]
                emit(
                    logger,
                    "epoch",
                    "epoch=%d loss=%.3f samples_per_s=%.1f swarm_peers=%d lr=%.1e samples_total=%d",
                    self.opt.local_epoch,
                    mean_loss,
                    epoch_samples / max(elapsed, 1e-6),
                    swarm_peers,
                    lr,
                    samples_total,
                    epoch=self.opt.local_epoch,
                    loss=round(mean_loss, 5),
                    samples_per_s=round(epoch_samples / max(elapsed, 1e-6), 3),
                    swarm_peers=swarm_peers,
                    lr=lr,
                    samples_total=samples_total,
                )
                epoch, epoch_losses, epoch_samples, epoch_t0 = self.opt.local_epoch, [], 0, time.monotonic()
                if self.config.max_epochs and epoch >= self.config.max_epochs:
                    logger.info("reached --max-epochs %d, leaving", self.config.max_epochs)
                    break
        if self.config.save_dir:
            self._save(model, joined.tokenizer_json, manifest)
        return 0

    def _save(self, model, tokenizer_json: str, manifest: RunManifest) -> None:
        """Write this peer's model to --save-dir atomically (staging directory, then rename)."""
        import shutil

        from crowdtrain.peer.model import hf_tokenizer

        out = Path(self.config.save_dir).expanduser()
        staging = out.with_name(f".{out.name}.saving-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        hf_tokenizer(tokenizer_json, manifest).save_pretrained(staging)
        (staging / "epoch.txt").write_text(f"{self.opt.local_epoch}\n")
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
        logger.info("saved this peer's model at epoch %d to %s", self.opt.local_epoch, out)

    def _load_checkpoint(self, model, step: int, cache_dir: Path) -> None:
        """Download (verified, see peer/pull.py) and load the weights of a published checkpoint."""
        import torch
        from crowdtrain.peer.pull import pull
        from safetensors.torch import load_file

        out = cache_dir / "resume-checkpoint"
        meta = pull(self.config.coordinator, out, step=step)
        state = load_file(str(out / "model.safetensors"), device=str(self.device))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if unexpected or set(missing) - tied:
            raise PeerError(
                f"checkpoint step {step} does not fit the run's model (missing {missing}, unexpected {unexpected})"
            )
        with torch.no_grad():
            model.tie_weights()
        emit(
            logger,
            "resumed_from_checkpoint",
            "resuming the run from published checkpoint step %d (eval loss %.4f)",
            step,
            meta.eval_loss,
            step=step,
            eval_loss=meta.eval_loss,
        )

    def _continue_epoch_count(self, step: int) -> None:
        """Number epochs on from the checkpoint, as hivemind does after loading state from a peer
        (optimizer statistics start afresh; the learning-rate schedule catches up to `step`)."""
        averager = self.opt.state_averager
        averager.local_epoch = step
        averager._update_scheduler()  # hivemind's own catch-up of the LR schedule to local_epoch
        self.opt.tracker.report_local_progress(local_epoch=step, samples_accumulated=0)

    def _catch_up(self, manifest: RunManifest, model, cache_dir: Path) -> None:
        """Before the first step: learn the swarm's epoch and, if it is ahead, download its state."""
        tracker = self.opt.tracker
        self.stats.update(phase="loading_state")
        wait_s = max(10.0, 3 * manifest.swarm.matchmaking_time_s)
        if not tracker.fetched_global_progress_this_epoch.wait(wait_s):
            logger.warning(
                "no progress records from the swarm after %.0fs; starting from the run's initial weights",
                wait_s,
            )
            return
        global_epoch = tracker.global_epoch
        if global_epoch <= self.opt.local_epoch:
            logger.info(
                "swarm is at epoch %d, we are at %d: nothing newer to load",
                global_epoch,
                self.opt.local_epoch,
            )
            return
        logger.info(
            "swarm is at epoch %d with %d peer(s): loading its state",
            global_epoch,
            tracker.global_progress.num_peers,
        )
        deadline = time.monotonic() + 3 * manifest.swarm.load_state_timeout_s
        for attempt in range(1, STATE_LOAD_ATTEMPTS + 1):
            t0 = time.monotonic()
            self.opt.load_state_from_peers()
            if self.opt.local_epoch >= global_epoch - 1:
                seconds = time.monotonic() - t0
                emit(
                    logger,
                    "state_loaded",
                    "loaded the swarm's state at epoch %d in %.1fs",
                    self.opt.local_epoch,
                    seconds,
                    epoch=self.opt.local_epoch,
                    seconds=round(seconds, 3),
                )
                return
            logger.warning(
                "attempt %d/%d: no peer served a state at the swarm's epoch %d (we have %d); retrying",
                attempt,
                STATE_LOAD_ATTEMPTS,
                global_epoch,
                self.opt.local_epoch,
            )
            if time.monotonic() > deadline or self.stop_event.wait(min(2.0 * attempt, 10.0)):
                break
        if self.stop_event.is_set():
            return
        self._fall_back_to_checkpoint(model, cache_dir, global_epoch)

    def _fall_back_to_checkpoint(self, model, cache_dir: Path, global_epoch: int) -> None:
        """No peer could serve the swarm's state: start from the latest published checkpoint.

        The weights are at most one publishing interval old; we then take part in the swarm's
        current epoch (as hivemind itself does when a peer is one epoch behind), and the next
        state-averaging round pulls our parameters to the swarm's.
        """
        import torch
        from crowdtrain.peer.pull import PullError, list_published

        try:
            listed, _ = list_published(self.config.coordinator)
        except (PullError, CoordinatorUnavailable, CoordinatorRejected) as e:
            listed = []
            logger.warning("could not list published checkpoints: %s", e)
        if not listed or listed[-1].step <= self.opt.local_epoch:
            raise PeerError(
                f"no peer could send the swarm's state (epoch {global_epoch}) and no newer checkpoint is "
                "published; the other peers may be overloaded or unreachable - restart later"
            )
        step = listed[-1].step
        emit(
            logger,
            "checkpoint_fallback",
            "no peer could send the swarm's state: starting from published checkpoint step %d "
            "and joining the swarm at epoch %d",
            step,
            global_epoch,
            level=logging.WARNING,
            step=step,
            swarm_epoch=global_epoch,
        )
        self._load_checkpoint(model, step, cache_dir)
        # the optimizer works on its own (offloaded) copy of the parameters: refresh it too
        offloaded = [p for group in self.opt.state_averager.optimizer.param_groups for p in group["params"]]
        with torch.no_grad():
            for copy, param in zip(offloaded, model.parameters(), strict=True):
                copy.copy_(param)
        self._continue_epoch_count(max(step, global_epoch))

    # ------------------------------------------------------------------ teardown

    def shutdown(self) -> None:
        """Leave the run and stop hivemind's processes; idempotent, safe from any exit path."""
        self.stop_event.set()
        if self.heartbeat is not None:
            self.heartbeat.shutdown()
            self.heartbeat = None
        if self.session_id:
            try:
                self.client.leave(self.session_id, reason="shutdown")
            except (CoordinatorUnavailable, CoordinatorRejected) as e:
                logger.info("could not tell the coordinator we leave: %s", e)
            self.session_id = ""
        if self.opt is not None:
            self.opt.shutdown()
            self.opt = None
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None
        self.client.close()
