"""One bad volunteer against three honest ones, as real processes. Slow: ~4 minutes
per scenario on 2 cores, so marked `attack` and left out of the default run; run them with
`pytest -m attack tests/test_attacks.py`, or `python -m scripts.attacks` for the table of figures
(docs/security.md).

Each attack must leave the honest peers training to the end with a final held-out loss within
10% of the same run without the attacker (5% for the bounded poisoning: shift,
innorm_flip, const_shift), publish nothing the attacker served, and (for attacks whose
contributions are refused) get the attacker banned or, in an open run such as these,
quarantined by the evidence the honest peers report (coordinator/admission/bans.py). No honest peer's
contribution score may leave another honest peer out (peer/robust/contribscore.py).
"""

from __future__ import annotations

import math

import pytest

from scripts.attacks import ACTED_ON, BANNABLE, run_scenario

pytestmark = [pytest.mark.attack, pytest.mark.swarm]  # `-m "not swarm"` skips them too
EPOCHS = 24
BOUNDED = ("shift", "innorm_flip", "const_shift")  # poisoning within every per-round bound


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    outcome = run_scenario("baseline", tmp_path_factory.mktemp("baseline"), EPOCHS)
    assert outcome.honest_exits == [0, 0, 0], outcome
    assert math.isfinite(outcome.mean_loss), outcome
    assert not outcome.left_out, f"an honest peer's score left out an honest peer: {outcome.left_out}"
    return outcome


@pytest.mark.parametrize(
    "attack", ["nan", "scale", "signflip", "shift", "innorm_flip", "const_shift", "forge", "giant"]
)
def test_one_attacker_cannot_ruin_the_run(attack, baseline, tmp_path):
    outcome = run_scenario(attack, tmp_path, EPOCHS)
    assert outcome.attacker_ids, f"the attacker never took part: {outcome}"
    assert outcome.honest_exits == [0, 0, 0], f"honest peers did not all finish: {outcome}"
    assert outcome.epochs_reached and min(outcome.epochs_reached) >= EPOCHS, outcome
    assert outcome.mean_loss <= (1.05 if attack in BOUNDED else 1.10) * baseline.mean_loss, (
        f"{attack}: held-out loss {outcome.mean_loss:.3f} vs baseline {baseline.mean_loss:.3f}"
    )
    assert not outcome.forged_published, outcome
    assert outcome.framed == 0, f"an honest peer was left out by another's score: {outcome.left_out}"
    if attack in BANNABLE:
        assert all(action in ACTED_ON for action in outcome.attacker_actions), outcome
    if attack == "innorm_flip":
        assert all(outcome.left_out.get(a, 0) >= 2 for a in outcome.attacker_ids), outcome


def test_a_framer_gets_nobody_banned_and_the_run_goes_on(baseline, tmp_path):
    """Framing, in a real swarm: for 3 minutes one open-admission attacker (tests/framer.py) sends
    fake evidence against the honest peers and the coordinator's nodes from as many identities as
    the coordinator lets it make, and tries to overwrite the swarm's admission records.
    Nobody is banned or quarantined, every honest peer keeps averaging to the end, held-out loss
    stays within 5% of the run without the attacker, and checkpoints keep being published."""
    outcome = run_scenario("frame", tmp_path, EPOCHS)
    assert outcome.framer.get("identities", 0) >= 5 and outcome.framer.get("reports", 0) > 100, outcome
    assert outcome.framer.get("victims"), f"the framer found nobody to accuse: {outcome}"
    assert outcome.acted_against == [], f"framed: {outcome.acted_against}"
    assert outcome.honest_exits == [0, 0, 0] and min(outcome.epochs_reached) >= EPOCHS, outcome
    assert outcome.mean_loss <= 1.05 * baseline.mean_loss, (outcome.mean_loss, baseline.mean_loss)
    assert outcome.checkpoints >= baseline.checkpoints // 2 and outcome.checkpoints >= 1, outcome
