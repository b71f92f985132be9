"""One bad volunteer against three honest ones: does the run survive?

    python -m scripts.attacks                        # every attack, then the table
    python -m scripts.attacks --attacks nan scale    # some of them
    python -m scripts.attacks --epochs 24 --out docs/attacks.md
    python -m scripts.attacks --attacks scale signflip --swarm mode=diloco target_batch_size=512
    python -m scripts.attacks --attacks baseline shift innorm_flip const_shift --unscored innorm_flip

For each scenario: a coordinator (open admission: anyone may join), 3 honest `crowdtrain peer`s
(1 CPU thread each) and the attacker(s) of tests/attacker.py, real processes on 127.0.0.1. The
honest peers train to `--epochs` swarm epochs and save their models; the harness then evaluates
each on the run's held-out shard and compares with the `baseline` scenario (no attacker, the same
number of epochs). It also reads the coordinator's view: was the attacker banned or quarantined
(an open run's automatic action) and why, and did the publisher ever choose a state the attacker
served? And the honest peers' own: whom their contribution scores left out of their reductions
(peer/robust/contribscore.py), the attacker or (framed) an honest peer.

Scenarios: baseline, stock (the baseline's honest peers on stock hivemind averagers, without
the defences: what they cost in throughput), nan, scale (x1e4), signflip, shift ("a little is
enough"), innorm_flip (a push against the swarm's direction within every per-round bound),
const_shift (the same vector added every round), forge (two sybil identities serving the same
forged state with the highest priority), giant (a state 10x the model's size) and frame (never
trains: for 3 minutes, fake evidence against everyone from as many identities as it can make, and
the overwrite of the swarm's admission records: tests/framer.py). `--unscored A
...` runs those attacks again with the honest peers' contribution scoring off (`A (unscored)`).
Goals: honest peers keep training, final held-out loss within 10% of the baseline (5% for
bounded poisoning and framing), the attacker banned or quarantined, no forged state
published, and (frame) nobody banned or quarantined.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from crowdtrain.coordinator.demo import (
    Child,
    coordinator_command,
    local_peer_command,
    spawn,
    stop_children,
    wait_for_endpoints,
)

from scripts.harness import add_swarm_option, events_named, wait_for_event

SCENARIOS = (
    "baseline", "stock", "nan", "scale", "signflip", "shift", "innorm_flip", "const_shift", "forge", "giant",
    "frame",
)  # fmt: skip
FRAME_S = 180  # how long the framer (tests/framer.py) attacks: the 3 minutes
HONEST_PEERS = 3
BANNABLE = (
    "nan",
    "scale",
    "signflip",
)  # contributions that are refused, so reported, then banned or quarantined
ACTED_ON = ("banned", "quarantined")  # what the coordinator's automatic action makes of a peer
_LEFT_OUT = re.compile(r"left (\S+) out of our reduction")  # peer/robust/contribscore.py's warning


@dataclass
class Outcome:
    scenario: str
    unscored: bool = False  # honest peers ran with contribution scoring off
    honest_losses: list[float] = field(default_factory=list)  # held-out loss of each honest peer's model
    honest_exits: list[int | None] = field(default_factory=list)
    samples_per_s: list[float] = field(default_factory=list)  # each honest peer's mean epoch throughput
    epochs_reached: list[int] = field(default_factory=list)
    seconds: float = 0.0
    attacker_ids: list[str] = field(default_factory=list)
    attacker_states: list[str] = field(default_factory=list)  # as /api/v1/peers shows them
    attacker_reasons: list[str] = field(default_factory=list)
    attacker_actions: list[str] = field(default_factory=list)  # banned | quarantined | none
    acted_against: list[str] = field(default_factory=list)  # every identity banned or quarantined
    framer: dict = field(default_factory=dict)  # what tests/framer.py says it did (`frame`)
    left_out: dict[str, int] = field(default_factory=dict)  # peer id -> honest peers that left it out
    forged_published: bool = False
    checkpoints: int = 0
    rejections: int = 0  # evidence records the coordinator holds

    @property
    def label(self) -> str:
        return f"{self.scenario} (unscored)" if self.unscored else self.scenario

    @property
    def framed(self) -> int:
        """Honest peers (not the attacker) left out by an honest peer's contribution score."""
        return sum(1 for peer in self.left_out if peer not in self.attacker_ids)

    @property
    def mean_loss(self) -> float:
        finite = [x for x in self.honest_losses if math.isfinite(x)]
        return sum(finite) / len(finite) if len(finite) == len(self.honest_losses) and finite else math.inf


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def _attacker_command(attack: str, grpc: str, cache_dir: Path, name: str) -> list[str]:
    if attack == "frame":  # never trains: fake evidence from many identities, admission-record overwrite
        args = ["--coordinator", grpc, "--cache-dir", str(cache_dir), "--seconds", str(FRAME_S)]
        return [sys.executable, "-m", "tests.framer", *args]
    args = ["--attack", attack, "--coordinator", grpc, "--name", name, "--listen-host", "127.0.0.1"]
    args += ["--cache-dir", str(cache_dir), "--threads", "1", "--device", "cpu"]
    return [sys.executable, "-m", "tests.attacker", *args]


def _honest_command(
    scenario: str, grpc: str, work_dir: Path, i: int, epochs: int, unscored: bool = False
) -> list[str]:
    """An honest volunteer: `crowdtrain peer`, or for `stock` the same on stock hivemind averagers,
    or with `unscored` on crowdtrain's averagers without contribution scoring (tests/attacker.py)."""
    args = ("--name", f"honest-{i}", "--threads", "1", "--device", "cpu", "--seed", str(i + 1))
    args += ("--max-epochs", str(epochs), "--save-dir", str(work_dir / f"saved-{i}"))
    if scenario == "stock" or unscored:
        as_volunteer = "none" if scenario == "stock" else "unscored"
        return _attacker_command(as_volunteer, grpc, work_dir / "cache", f"honest-{i}") + list(args[2:])
    return local_peer_command(grpc, work_dir / "cache", *args)


def evaluate_saved(model_dir: Path, data_dir: Path, manifest: dict) -> float:
    """Held-out loss of a saved peer model on the run's eval shard."""
    from crowdtrain.peer.data.shards import read_shard, tokenize_blocks
    from crowdtrain.peer.run.model import evaluate
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    if not (model_dir / "config.json").exists():
        return math.inf
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    eval_name = manifest["data"]["eval"]["name"]
    blocks = tokenize_blocks(
        tokenizer, read_shard(data_dir / "data" / eval_name), manifest["data"]["seq_len"]
    )
    return evaluate(model, blocks[: manifest["data"]["eval_max_sequences"]])


def prepare_run(data_dir: Path, *extra: str) -> Path:
    """Build the run once (dataset, tokenizer, manifest, keys) in `data_dir`; scenarios start their
    coordinators on copies of it, so each swarm is fresh but no scenario rebuilds the run. `extra`:
    more `crowdtrain coordinator` flags (`--preset small30m`)."""
    work_dir = data_dir.parent
    work_dir.mkdir(parents=True, exist_ok=True)
    child = spawn(
        "prepare", coordinator_command(data_dir, "--checkpoint-interval-s", "0", *extra), work_dir, echo=False
    )
    try:
        wait_for_endpoints(data_dir / "endpoints.json", child, timeout_s=600)
    finally:
        stop_children([child])
    return data_dir


def run_scenario(
    scenario: str,
    work_dir: Path,
    epochs: int,
    timeout_s: float = 1200.0,
    prepared: Path | None = None,
    unscored: bool = False,
) -> Outcome:
    """One scenario from a fresh coordinator to the honest peers' saved models; always cleans up.
    `unscored`: the honest peers run with contribution scoring off."""
    outcome, children = Outcome(scenario, unscored=unscored), []
    data_dir, t0 = work_dir / "coordinator", time.monotonic()
    if prepared is not None:
        shutil.copytree(prepared, data_dir, ignore=shutil.ignore_patterns("endpoints.json"))
    try:
        coordinator = spawn(
            "coordinator",
            coordinator_command(data_dir, "--checkpoint-interval-s", "10", "--heartbeat-interval-s", "2"),
            work_dir,
            echo=False,
        )
        children.append(coordinator)
        endpoints = wait_for_endpoints(data_dir / "endpoints.json", coordinator, timeout_s=600)
        honest = [
            spawn(
                f"honest-{i}",
                _honest_command(scenario, endpoints["grpc"], work_dir, i, epochs, unscored),
                work_dir,
                echo=False,
            )
            for i in range(HONEST_PEERS)
        ]
        children += honest
        attackers = []
        if scenario not in ("baseline", "stock"):
            wait_for_event(honest[0], "epoch", timeout_s=600)  # the attack starts on a running swarm
            for j in range(2 if scenario == "forge" else 1):
                command = _attacker_command(
                    scenario, endpoints["grpc"], work_dir / f"attacker-cache-{j}", f"attacker-{j}"
                )
                attackers.append(spawn(f"attacker-{j}", command, work_dir, echo=False))
            children += attackers
        _wait_for_exits(honest + (attackers if scenario == "frame" else []), time.monotonic() + timeout_s)
        outcome.seconds = time.monotonic() - t0
        _read_coordinator(outcome, endpoints, coordinator, attackers)
        _read_honest(outcome, honest, work_dir, data_dir, _get_json(f"{endpoints['http']}/api/v1/run"))
    finally:
        stop_children(children)
    return outcome


def _read_honest(
    outcome: Outcome, honest: list[Child], work_dir: Path, data_dir: Path, manifest: dict
) -> None:
    """What the honest peers did: exits, epochs, throughput, whom their scores left out, and the
    held-out loss of each one's saved model."""
    for i, child in enumerate(honest):
        outcome.honest_exits.append(child.proc.poll())
        epoch_events = events_named(child, "epoch")
        epochs_seen = [e["epoch"] for e in epoch_events]
        rates = [e["samples_per_s"] for e in epoch_events[2:]]  # after the start-up epochs
        outcome.samples_per_s.append(sum(rates) / len(rates) if rates else 0.0)
        outcome.epochs_reached.append(max(epochs_seen, default=0))
        for peer in {m.group(1) for line in child.lines for m in _LEFT_OUT.finditer(line)}:
            outcome.left_out[peer] = outcome.left_out.get(peer, 0) + 1
        outcome.honest_losses.append(evaluate_saved(work_dir / f"saved-{i}", data_dir, manifest))


def _wait_for_exits(children: list[Child], deadline: float) -> None:
    while time.monotonic() < deadline and any(c.proc.poll() is None for c in children):
        time.sleep(1)


def _read_coordinator(outcome: Outcome, endpoints: dict, coordinator: Child, attackers: list[Child]) -> None:
    """What the coordinator says about the attackers, the evidence and what it published."""
    base = endpoints["http"]
    for child in attackers:
        attacking = events_named(child, "attacking")
        if attacking:
            outcome.attacker_ids.append(attacking[0]["dht_peer_id"])
    peers = _get_json(f"{base}/api/v1/peers")
    rows = peers if isinstance(peers, list) else peers.get("peers", [])
    for dht_id in outcome.attacker_ids:
        mine = [p for p in rows if p.get("dht_peer_id") == dht_id]
        outcome.attacker_states.append(mine[0]["state"] if mine else "not listed")
        outcome.attacker_reasons.append(mine[0].get("reason", "") if mine else "")
    try:
        rejections = _get_json(f"{base}/api/v1/rejections")
    except OSError:
        rejections = []
    outcome.rejections = sum(r.get("source") == "peer_evidence" for r in rejections)
    actions = [r for r in rejections if r.get("source") == "automatic_ban"]
    outcome.attacker_actions = [automatic_action(actions, dht_id) for dht_id in outcome.attacker_ids]
    outcome.acted_against = sorted({r.get("offender", "") for r in actions})
    for child in attackers:
        done = events_named(child, "framed") or events_named(child, "framing")[-1:]
        outcome.framer = done[0] if done else outcome.framer
    chosen = events_named(coordinator, "state_chosen")
    outcome.forged_published = any(set(e.get("agreeing", [])) & set(outcome.attacker_ids) for e in chosen)
    outcome.checkpoints = len(events_named(coordinator, "checkpoint_published"))


def automatic_action(rows: list[dict], dht_id: str) -> str:
    """What the coordinator's automatic action made of `dht_id`, from /api/v1/rejections'
    `automatic_ban` rows (they hold the quarantines of open runs too): banned, quarantined or none."""
    reasons = [r.get("reason", "") for r in rows if r.get("offender") == dht_id]
    if any(reason.startswith("quarantined") for reason in reasons):
        return "quarantined"
    return "banned" if reasons else "none"


def table(outcomes: list[Outcome]) -> str:
    base = next((o for o in outcomes if o.scenario == "baseline"), None)
    lines = [
        "| scenario | honest held-out loss (mean) | vs baseline | honest peers finished | honest samples/s "
        "(sum) | attacker state | automatic action | left out by honest scores (attacker / honest) | "
        "forged state published | checkpoints | evidence records | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        ratio = o.mean_loss / base.mean_loss if base and math.isfinite(base.mean_loss) else math.nan
        finished = sum(e == 0 for e in o.honest_exits)
        by_attacker = sum(o.left_out.get(a, 0) for a in o.attacker_ids)
        lines.append(
            f"| {o.label} | {o.mean_loss:.3f} | {ratio:.3f} | {finished}/{len(o.honest_exits)} | "
            f"{sum(o.samples_per_s):.1f} | {', '.join(o.attacker_states) or '-'} | "
            f"{', '.join(o.attacker_actions) or '-'} | {by_attacker} / {o.framed} | "
            f"{'YES' if o.forged_published else 'no'} | "
            f"{o.checkpoints} | {o.rejections} | {o.seconds:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument(
        "--unscored",
        nargs="*",
        choices=SCENARIOS,
        default=[],
        help="also run these scenarios with the honest peers' contribution scoring off",
    )
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--out", default="", help="also write the table (markdown) to this file")
    add_swarm_option(parser)
    args = parser.parse_args(argv)
    scenarios = ["baseline", *[a for a in args.attacks if a != "baseline"]]
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="crowdtrain-attacks-") as tmp:
        swarm = ("--swarm", *args.swarm) if args.swarm else ()
        prepared = prepare_run(Path(tmp) / "prepared" / "coordinator", *swarm)
        runs = [(scenario, False) for scenario in scenarios] + [
            (scenario, True) for scenario in args.unscored
        ]
        for scenario, unscored in runs:
            print(f"--- {scenario}{' (unscored)' if unscored else ''}", flush=True)
            work = Path(tmp) / f"{scenario}{'-unscored' if unscored else ''}"
            outcome = run_scenario(scenario, work, args.epochs, prepared=prepared, unscored=unscored)
            print(json.dumps(outcome.__dict__ | {"mean_loss": outcome.mean_loss}, default=str), flush=True)
            outcomes.append(outcome)
    text = table(outcomes)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
