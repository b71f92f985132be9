"""The volunteer's trust store (peer/checkpoints/trust.py) under a hostile coordinator: it must not
grow with every run id met (it did until, past 4 MiB, it no longer parsed and every pull and join
from every coordinator failed), and it records how each key was trusted, which the refusal of an
impostor that renames the run relies on.
Pure file operations on tmp_path; no server, well under a second each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from crowdtrain.peer.checkpoints import trust
from crowdtrain.peer.checkpoints.trust import (
    MAX_RUNS_PER_ADDRESS,
    TrustedRun,
    TrustPolicy,
    TrustStore,
    UntrustedKey,
    runs_to_keep,
    trust_joined_run,
)

HOSTILE, OTHER = "203.0.113.66:50051", "198.51.100.7:50051"
KEY = "ab" * 32


@pytest.fixture
def store(tmp_path: Path) -> TrustStore:
    return TrustStore(tmp_path / "config" / "trusted_keys.json")


def test_a_coordinator_cycling_run_ids_cannot_grow_the_store_past_its_cap(store):
    """Each run id the volunteer accepts at one address is kept, up to MAX_RUNS_PER_ADDRESS: the
    oldest go first, the run just trusted and every explicitly pinned run stay."""
    store.remember(HOSTILE, "ct_pinned", KEY, 5, trust.HOW_PINNED, now_unix_s=0.0)
    for i in range(3 * MAX_RUNS_PER_ADDRESS):
        store.remember(HOSTILE, f"ct_{i}", KEY, -1, trust.HOW_ACCEPTED, now_unix_s=1.0 + i)
    runs = store.runs_at(HOSTILE)
    assert len(runs) == MAX_RUNS_PER_ADDRESS
    assert "ct_pinned" in runs and f"ct_{3 * MAX_RUNS_PER_ADDRESS - 1}" in runs
    assert "ct_0" not in runs, "the least recently seen run goes first"
    assert store.file_for(HOSTILE).stat().st_size < 32 << 10


def test_a_broken_or_oversized_record_fails_its_own_address_only(store):
    store.remember(OTHER, "ct_good", KEY, 3, trust.HOW_FIRST_USE)
    store.remember(HOSTILE, "ct_x", KEY, 3, trust.HOW_FIRST_USE)
    hostile_file = store.file_for(HOSTILE)
    for broken in (b"{" + b" " * (trust.MAX_FILE_BYTES + 1), b'{"address": "203.0.113.66:50051", "runs": {'):
        hostile_file.write_bytes(broken)
        with pytest.raises(
            UntrustedKey, match=f"{HOSTILE}.*fix or delete.*other coordinators are not affected"
        ):
            TrustPolicy(store).check(HOSTILE, "ct_x", KEY)
        # every other coordinator works as before: its key is still trusted, a changed one refused
        known, _ = TrustPolicy(store).check(OTHER, "ct_good", KEY)
        assert (known.public_key, known.newest_step, known.how) == (KEY, 3, trust.HOW_FIRST_USE)
        with pytest.raises(UntrustedKey, match="now signed by key"):
            TrustPolicy(store).check(OTHER, "ct_good", "cd" * 32)
        # a pinned key decides alone, so even the broken address can be pulled with --public-key
        assert TrustPolicy(store, pinned_key=KEY).check(HOSTILE, "ct_x", KEY)[1] == trust.HOW_PINNED


def test_a_malformed_entry_is_not_mistaken_for_a_first_contact(store):
    """Dropping the entry would make the address look new: any key would then be trusted on first use."""
    store.remember(HOSTILE, "ct_x", KEY, 3, trust.HOW_FIRST_USE)
    record = json.loads(store.file_for(HOSTILE).read_text())
    record["runs"]["ct_x"]["newest_step"] = "3"
    store.file_for(HOSTILE).write_text(json.dumps(record))
    with pytest.raises(UntrustedKey, match="malformed"):
        TrustPolicy(store).check(HOSTILE, "ct_x", "cd" * 32)


def test_the_single_file_of_older_versions_is_still_read_even_past_4_mib(store):
    """A trusted_keys.json an older crowdtrain grew past 4 MiB (unparseable before) is read, and whatever
    is learnt about an address from then on goes to that address's own file."""
    legacy = {
        f"10.0.{i // 250}.{i % 250}:50051": {f"ct_{i}": {"public_key": KEY, "newest_step": 1}}
        for i in range(30_000)
    }
    legacy[HOSTILE] = {"ct_x": {"public_key": KEY, "newest_step": 7}}
    store.path.parent.mkdir(parents=True)
    store.path.write_text(json.dumps(legacy, indent=2))
    assert store.path.stat().st_size > 4 << 20
    assert store.runs_at(HOSTILE) == {"ct_x": TrustedRun(KEY, 7, trust.HOW_JOINED, 0.0)}
    with pytest.raises(UntrustedKey, match="now signed by key"):
        trust_joined_run(HOSTILE, "ct_x", "cd" * 32, store)
    trust_joined_run(HOSTILE, "ct_x", KEY, store)
    assert store.runs_at(HOSTILE)["ct_x"].newest_step == 7 and store.file_for(HOSTILE).exists()
    store.path.write_text("{ not json")  # now the old file breaks: only addresses without a file fail
    assert set(store.runs_at(HOSTILE)) == {"ct_x"}
    with pytest.raises(UntrustedKey, match="trusted_keys.json"):
        store.runs_at(OTHER)


def test_how_a_key_was_trusted_only_ever_strengthens_while_the_key_stays(store):
    store.remember(HOSTILE, "ct_x", KEY, 3, trust.HOW_PINNED)
    store.remember(HOSTILE, "ct_x", KEY, -1, trust.HOW_JOINED)  # a peer re-joining the pinned run
    assert store.runs_at(HOSTILE)["ct_x"].how == trust.HOW_PINNED
    assert store.runs_at(HOSTILE)["ct_x"].newest_step == 3
    store.remember(HOSTILE, "ct_x", "cd" * 32, 4, trust.HOW_ACCEPTED)  # --trust-new-key: a new record
    replaced = store.runs_at(HOSTILE)["ct_x"]
    assert (replaced.public_key, replaced.newest_step, replaced.how) == ("cd" * 32, 4, trust.HOW_ACCEPTED)


def test_the_store_is_private(store):
    store.remember(HOSTILE, "ct_x", KEY, 3, trust.HOW_FIRST_USE)
    assert store.directory.stat().st_mode & 0o777 == 0o700
    assert store.file_for(HOSTILE).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("hows", "kept"),
    [
        ({"a": "pinned", "b": "joined", "c": "first_use"}, {"a", "c", "new"}),
        ({"a": "pinned", "b": "pinned", "c": "pinned"}, {"a", "b", "c", "new"}),
        ({"b": "joined", "c": "accepted"}, {"b", "c", "new"}),
    ],
)
def test_runs_to_keep(hows, kept):
    runs = {r: TrustedRun(KEY, 1, how, float(i)) for i, (r, how) in enumerate(hows.items())}
    runs["new"] = TrustedRun(KEY, 1, "joined", -1.0)  # just trusted, whatever its clock says
    assert set(runs_to_keep(runs, "new", 3)) == kept
