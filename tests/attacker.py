"""A malicious volunteer, for tests and scripts/attacks.py only (never installed).

It joins like any volunteer (Join, the DHT proof, a swarm token: the run admits anyone in `open`
mode), then attacks with STOCK hivemind averagers: no robust reduction on its side, no gate, no
checks, so its own span of every all-reduce is the plain mean hivemind computes. Attacks:

    nan        its gradient contribution is NaN
    scale      its gradient times 1e4
    signflip   its gradient times -1
    shift      "a little is enough": its gradient plus a fixed direction of 0.5x its norm
    innorm_flip  a push against the swarm's direction within every per-round bound: its gradient
               replaced by ||g|| x (-0.5 g/||g|| + 0.87 n), n a fresh random unit vector each
               round (the same norm as its gradient; cosine ~ -0.5x an honest one's)
    const_shift  its gradient plus the same vector every round: a fixed random direction of
               0.5x the norm of its first gradient
    forge      never trains; serves the run's initial weights x3 as its state, claiming the
               swarm's epoch and the highest donor priority (two of them: sybils agreeing)
    giant      never trains; serves a state 10x the model's size with the highest priority
    none       an honest volunteer on stock hivemind averagers (what the defences cost is
               measured against it: scripts/attacks.py's `stock` scenario)
    unscored   an honest volunteer on crowdtrain's guarded averagers with contribution scoring
               off (peer/robust/contribscore.py; scripts/attacks.py --no-score: what the score is worth)

Usage: python -m tests.attacker --attack nan --coordinator HOST:PORT [peer flags...]
It logs what a peer logs (`--log-format json` events) plus one event of its own,
{"event": "attacking", "attack": ..., "dht_peer_id": ...}, once it takes part.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

ATTACKS = (
    "nan",
    "scale",
    "signflip",
    "shift",
    "innorm_flip",
    "const_shift",
    "forge",
    "giant",
    "none",
    "unscored",
)


def corrupt(attack: str, tensors, memory: dict) -> None:
    """Apply a gradient attack in place to the tensors about to be averaged (`memory`: the
    attack's state across rounds)."""
    with torch.no_grad():
        if attack == "nan":
            for t in tensors:
                t.fill_(float("nan"))
        elif attack == "scale":
            for t in tensors:
                t.mul_(1e4)
        elif attack == "signflip":
            for t in tensors:
                t.neg_()
        elif attack in ("shift", "const_shift"):
            if "direction" not in memory:
                memory["direction"] = _random_unit(tensors, seed=1234)
            direction = memory["direction"]
            if attack == "shift" or "norm" not in memory:
                memory["norm"] = _norm(tensors)  # const_shift: the first round's, for good
            for t, d in zip(tensors, direction, strict=True):
                t.add_(d, alpha=0.5 * memory["norm"])
        elif attack == "innorm_flip":
            memory["round"] = memory.get("round", 0) + 1
            noise = _random_unit(tensors, seed=10_000 + memory["round"])
            norm = _norm(tensors)
            for t, n in zip(tensors, noise, strict=True):
                t.mul_(-0.5).add_(n, alpha=0.866 * norm)


def _norm(tensors) -> float:
    return torch.sqrt(sum(t.double().pow(2).sum() for t in tensors)).item()


def _random_unit(tensors, seed: int) -> list[torch.Tensor]:
    """A random direction of norm 1, shaped like `tensors`."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(t.shape, generator=g) for t in tensors]
    norm = max(_norm(out), 1e-12)
    return [x / norm for x in out]


def _stock_optimizer(volunteer, joined, model, attack: str):
    """The run's optimizer with STOCK hivemind averagers in place of peer/swarm/averaging.py's guarded
    ones (test-only: swapped where make_optimizer looks them up), its contribution corrupted."""
    import hivemind.compression
    from crowdtrain.peer.swarm import averaging, diloco
    from crowdtrain.peer.swarm import wiring as swarm
    from hivemind.optim.grad_averager import GradientAverager
    from hivemind.optim.state_averager import TrainingStateAverager

    memory: dict = {}

    # hivemind names an averager's RPCs after its class: ours must be spelt as stock hivemind's
    # (what a real attacker runs), or no honest peer ever hears from it

    class CorruptingGradientAverager(GradientAverager):
        @classmethod
        def _get_handle_name(cls, namespace, method_name):
            return GradientAverager._get_handle_name(namespace, method_name)

        def __init__(self, *args, gate=None, evidence=None, robust_cfg=None, **kwargs):
            super().__init__(*args, **kwargs)  # no gate, no evidence: a stock averager

        def load_accumulators_into_averager_(self):
            super().load_accumulators_into_averager_()
            with self.get_tensors() as tensors:
                corrupt(attack, tensors, memory)

    class StockStateAverager(TrainingStateAverager):
        @classmethod
        def _get_handle_name(cls, namespace, method_name):
            return TrainingStateAverager._get_handle_name(namespace, method_name)

        def __init__(self, *args, gate=None, evidence=None, robust_cfg=None, **kwargs):
            super().__init__(*args, **kwargs)

        def get_current_state(self):
            metadata, tensors, infos = super().get_current_state()
            if attack != "giant":
                return metadata, tensors, infos
            extra = torch.zeros(10 * sum(t.numel() for t in tensors) + 1)  # 10x the whole state
            info = hivemind.compression.CompressionInfo.from_tensor(extra, key=len(infos))
            return metadata, [*tensors, extra], [*infos, info]

    class CorruptingPseudoGradientAverager(diloco.PseudoGradients, CorruptingGradientAverager):
        """mode=diloco: the same attacks on the pseudo-gradient it contributes."""

        def load_accumulators_into_averager_(self):
            diloco.PseudoGradients.load_accumulators_into_averager_(self)
            with self.get_tensors() as tensors:
                corrupt(attack, tensors, memory)

    class StockOuterStateAverager(diloco.KeepsLocalProgress, StockStateAverager):
        """mode=diloco: the outer model's state averager, stock."""

    averaging.GuardedGradientAverager = CorruptingGradientAverager
    diloco.PseudoGradientAverager = CorruptingPseudoGradientAverager
    averaging.GuardedStateAverager = StockStateAverager
    diloco.OuterStateAverager = StockOuterStateAverager
    return swarm.make_optimizer(
        joined.manifest, model, volunteer.dht, batch_size_per_step=joined.batch_size, verbose=False
    )


def _unscore_gradient_averagers() -> None:
    """Make the guarded gradient averagers run with contribution scoring off (test-only: swapped
    where make_optimizer looks them up); everything else stays as a volunteer runs it."""
    import dataclasses

    from crowdtrain.peer.robust.contribscore import ScoreConfig
    from crowdtrain.peer.robust.reduce import DEFAULT
    from crowdtrain.peer.swarm import averaging, diloco

    unscored = dataclasses.replace(DEFAULT, score=ScoreConfig(enabled=False))

    def without_score(base):
        class Unscored(base):
            def __init__(self, *args, robust_cfg=None, **kwargs):
                super().__init__(*args, robust_cfg=unscored, **kwargs)

        return Unscored

    averaging.GuardedGradientAverager = without_score(averaging.GuardedGradientAverager)
    diloco.PseudoGradientAverager = without_score(diloco.PseudoGradientAverager)


def make_attacker(config, attack: str):
    from crowdtrain.peer.volunteer.trainer import Volunteer

    class Attacker(Volunteer):
        def _make_optimizer(self, joined, model):
            if attack == "unscored":
                _unscore_gradient_averagers()
                return super()._make_optimizer(joined, model)
            self.evidence_sink = None
            opt = _stock_optimizer(self, joined, model, attack)
            record = {"ts": round(time.time(), 3), "level": "WARNING", "logger": "attacker"}
            record |= {"msg": f"attacking the swarm with {attack} as {joined.identity.peer_id}"}
            print(
                json.dumps(
                    record | {"event": "attacking", "attack": attack, "dht_peer_id": joined.identity.peer_id}
                ),
                flush=True,
            )
            return opt

        def recover(self, joined) -> None:
            if attack not in ("forge", "giant"):
                super().recover(joined)

        def train(self, joined, model, batches) -> None:
            if attack in ("none", "unscored"):
                return super().train(joined, model, batches)
            if attack not in ("forge", "giant"):
                return self._train_tolerating_nan(joined.device, model, batches)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(3.0)  # every forger serves the same forged state: sybils agree
            from crowdtrain.peer.swarm.wiring import refresh_offloaded_parameters

            refresh_offloaded_parameters(self.opt, model)
            while not self.stop_event.wait(0.5):
                self.opt.state_averager.local_epoch = max(self.opt.tracker.global_epoch, 1)
                self.opt.state_averager.state_sharing_priority = 1e9
                self.stats.update(phase="training", local_epoch=self.opt.state_averager.local_epoch)

        def _train_tolerating_nan(self, device, model, batches) -> None:
            """Train as a volunteer does, but never stop: an attacker whose own model went bad
            goes back to its initial weights and keeps attacking."""
            from crowdtrain.peer.run.model import as_batch
            from crowdtrain.peer.swarm.wiring import refresh_offloaded_parameters

            clean = [p.detach().clone() for p in model.parameters()]
            self.stats.update(phase="training")
            model.train()
            while not self.stop_event.is_set():
                blocks, place = next(batches)
                batch = as_batch(blocks, device)
                self.feed.trained(place)
                loss = model(input_ids=batch, labels=batch).loss
                if torch.isfinite(loss):
                    loss.backward()
                else:
                    with torch.no_grad():
                        for p, c in zip(model.parameters(), clean, strict=True):
                            p.copy_(c)
                    refresh_offloaded_parameters(self.opt, model)
                    (model(input_ids=batch, labels=batch).loss).backward()
                if self.inner is not None:  # mode=diloco: a local step; the pseudo-gradient is corrupted
                    self.inner.step()
                self.opt.step()
                if self.inner is None:  # hivemind zeroes them itself in diloco (reused buffers)
                    self.opt.zero_grad()
                self.stats.update(local_epoch=self.opt.local_epoch, samples_per_s=10.0)
                time.sleep(0.01)

    return Attacker(config)


def main(argv: list[str] | None = None) -> int:
    from crowdtrain.peer.settings.commands import PeerConfig, add_arguments, from_arguments

    parser = argparse.ArgumentParser(prog="attacker")
    parser.add_argument("--attack", choices=ATTACKS, required=True)
    parser.add_argument("--log-format", default="json")
    add_arguments(parser, PeerConfig)
    args = parser.parse_args(argv)
    from crowdtrain.peer.cli import configure_logging

    configure_logging("INFO", args.log_format)
    config = from_arguments(PeerConfig, args)
    try:
        return make_attacker(config, args.attack).run()
    except Exception as e:  # an attacker's failure is the test's information, not a crash
        print(json.dumps({"event": "attacker_failed", "error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
