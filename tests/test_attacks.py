"""One bad volunteer against three honest ones, as real processes (issue 11). Slow: ~4 minutes
per scenario on 2 cores, so marked `attack` and left out of the default run; run them with
`pytest -m attack tests/test_attacks.py`, or `python -m scripts.attacks` for the table of figures
(docs/security.md).

Each attack must leave the honest peers training to the end with a final held-out loss within
10% of the same run without the attacker, publish nothing the attacker served, and (for attacks
whose contributions are refused) get the attacker banned by the evidence the honest peers report.
"""

from __future__ import annotations

import math

import pytest

from scripts.attacks import BANNABLE, run_scenario

pytestmark = [pytest.mark.attack, pytest.mark.swarm]  # `-m "not swarm"` skips them too
EPOCHS = 24


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    outcome = run_scenario("baseline", tmp_path_factory.mktemp("baseline"), EPOCHS)
    assert outcome.honest_exits == [0, 0, 0], outcome
    assert math.isfinite(outcome.mean_loss), outcome
    return outcome


@pytest.mark.parametrize("attack", ["nan", "scale", "signflip", "shift", "forge", "giant"])
def test_one_attacker_cannot_ruin_the_run(attack, baseline, tmp_path):
    outcome = run_scenario(attack, tmp_path, EPOCHS)
    assert outcome.attacker_ids, f"the attacker never took part: {outcome}"
    assert outcome.honest_exits == [0, 0, 0], f"honest peers did not all finish: {outcome}"
    assert outcome.epochs_reached and min(outcome.epochs_reached) >= EPOCHS, outcome
    assert outcome.mean_loss <= 1.10 * baseline.mean_loss, (
        f"{attack}: held-out loss {outcome.mean_loss:.3f} vs baseline {baseline.mean_loss:.3f}"
    )
    assert not outcome.forged_published, outcome
    if attack in BANNABLE:
        assert all(state == "BANNED" for state in outcome.attacker_states), outcome
