"""Credit is what the swarm accepted (`credit`), and the same proof for trainers and voters: a fake
progress record stream earns nothing for epochs the swarm did not reach and nothing without a
session, one admitted peer's own records do not send newcomers to random weights, and a lone honest
volunteer is still credited; a pause costs an honest volunteer no credit, and a forged burst after
a claimed pause earns no more than a share of epochs the swarm passed. Pure functions with an
injected clock, plus the monitor's scheduling over a fake DHT."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from crowdtrain.coordinator.peers import policy
from crowdtrain.coordinator.peers.credit import (
    CreditSettings,
    Sighting,
    Tally,
    advance,
    epoch_rows,
    next_swarm_epoch,
)
from crowdtrain.coordinator.peers.groups import GroupReport
from crowdtrain.coordinator.peers.health import HealthSettings, PeerRecord
from crowdtrain.coordinator.peers.monitor import SwarmMonitor
from crowdtrain.coordinator.peers.standings import Standings
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.coordinator.publishing.voters import VoterSettings, eligible_voters
from crowdtrain.peer.volunteer.meter import standing_text
from crowdtrain.protos import coordinator_pb2 as pb

from tests.test_monitor import _FakeDHT  # the one stand-in for hivemind.DHT's progress read

SETTINGS = CreditSettings(target_batch_size=64, heartbeat_interval_s=1.0)  # an epoch settles 3 s after
ROOTS = {"H1": "invite:1", "H2": "invite:2", "A": "invite:a"}  # DHT-only "D" has no session: no root


def group(
    epoch: int, reporter: str, members: set[str], t: float = 0.0, gid: str = "", root: str = ""
) -> GroupReport:
    """`reporter`'s account of averaging with `members` at `epoch` (its local epoch after the round)."""
    return GroupReport(gid or f"g{epoch}", reporter, root or ROOTS[reporter], epoch, frozenset(members), t)


def credit(reads: list[list[Sighting]], roots: dict[str, str], reports=()) -> tuple[Tally, dict]:
    """Feed one read per second through the credit; the ledger as the store keeps it (the largest
    row per identity and epoch)."""
    tally, ledger = Tally(), {}
    for now, sightings in enumerate(reads):
        tally, settled, _ = advance(tally, sightings, roots, float(now), SETTINGS)
        for epoch in settled:
            for who, e, samples in epoch_rows(epoch, reports, SETTINGS)[0]:
                ledger[who, e] = max(ledger.get((who, e), 0), samples)
    return tally, ledger


def total(ledger: dict, who: str) -> int:
    return sum(samples for (peer, _), samples in ledger.items() if peer == who)


def honest(i: int, *who: str, start: int = 0) -> list[Sighting]:
    """The honest identities' records at read `i`: an epoch every 4 reads."""
    return [Sighting(w, start + i // 4, True) for w in who]


def test_fake_epochs_earn_nothing_and_a_peer_nobody_confirms_nothing_beside_confirmed_ones():
    reads = 40  # the honest swarm reaches epoch 9 at read 36: epochs 0..8 settle (3 s after it passed them)
    reports = [group(e + 1, h, {"H1", "H2"}) for e in range(10) for h in ("H1", "H2")]
    reports += [group(e + 1, "A", {"A", "H1"}, gid=f"forged{e}") for e in range(10)]  # its own word
    # the review's stream: a new epoch in every record, ahead of the swarm; and a DHT-only node
    stream = [
        [*honest(i, "H1", "H2"), Sighting("A", 50 + i, True), Sighting("D", 50 + i, True)]
        for i in range(reads)
    ]
    tally, ledger = credit(stream, ROOTS, reports)
    assert tally.swarm_epoch == 9
    assert total(ledger, "A") == 0 and total(ledger, "D") == 0
    assert total(ledger, "H1") == total(ledger, "H2") == 9 * 32
    # sitting in the swarm's own epoch without averaging with anyone: the groupmates confirm each other, not it
    sitting = [[*honest(i, "H1", "H2"), Sighting("A", i // 4, True)] for i in range(reads)]
    _, ledger = credit(sitting, ROOTS, reports)
    assert total(ledger, "A") == 0 and total(ledger, "H1") == 9 * 32
    # and no epoch ever holds more than the target batch size
    per_epoch: dict[int, int] = {}
    for (_, e), samples in ledger.items():
        per_epoch[e] = per_epoch.get(e, 0) + samples
    assert per_epoch and max(per_epoch.values()) <= SETTINGS.target_batch_size


def test_beside_a_lone_honest_root_a_fake_stream_earns_at_most_an_even_share_of_real_epochs():
    lone = {"H1": "invite:1", "A": "invite:a"}
    ahead = [[*honest(i, "H1"), Sighting("A", 50 + i, True)] for i in range(40)]
    _, ledger = credit(ahead, lone)
    assert total(ledger, "A") == 0 and total(ledger, "H1") == 9 * 64
    # in the swarm's epoch, unconfirmed like the honest peer (nobody averages across roots): a share
    alongside = [[*honest(i, "H1"), Sighting("A", i // 4, True)] for i in range(40)]
    _, ledger = credit(alongside, lone)
    assert total(ledger, "A") == total(ledger, "H1") == 9 * 32
    # walking up from epoch 0 far behind the swarm: a laggard, credited nothing
    behind = [honest(i, "H1", start=100) for i in range(8)]
    behind += [[*honest(i, "H1", start=100), Sighting("A", i, True)] for i in range(8, 40)]
    _, ledger = credit(behind, lone)
    assert total(ledger, "A") == 0 and total(ledger, "H1") == 9 * 64
    # no session, no credit, whatever its records say
    _, ledger = credit([[*honest(i, "H1"), Sighting("D", i // 4, True)] for i in range(40)], lone)
    assert total(ledger, "D") == 0 and total(ledger, "H1") == 9 * 64


def test_the_swarm_epoch_needs_two_roots_never_falls_back_and_moves_one_epoch_per_read():
    assert next_swarm_epoch(None, {"r1": 7}) == (7, "epoch 7: the only admission root near the swarm's epoch")
    assert next_swarm_epoch(None, {"r1": 7, "r2": 900})[0] == 7  # a root alone ahead is not the swarm
    assert next_swarm_epoch(7, {"r1": 8, "r2": 900})[0] == 8
    assert next_swarm_epoch(7, {"r1": 900})[0] == 8  # alone: one epoch per read, not a jump
    kept, why = next_swarm_epoch(7, {"r1": 7, "r2": 6})
    assert kept == 7 and "kept" in why
    assert next_swarm_epoch(7, {"r1": 8, "r2": 0})[0] == 8  # a root far behind has no say
    fresh, why = next_swarm_epoch(70, {"r1": 3, "r2": 3})  # the swarm came back from an older checkpoint
    assert fresh == 3 and "found afresh" in why
    assert next_swarm_epoch(7, {}) == (7, "no proven identity in the progress records")


# ---------------------------------------------------------------- the monitor schedules it


def peer_id(seed: int):
    from hivemind.p2p import PeerID

    key = b"\x08\x01\x12\x20" + hashlib.sha256(bytes([seed])).digest()  # an identity-multihash peer id
    return PeerID(b"\x00" + bytes([len(key)]) + key)


def entry(seed: int, epoch: int, samples: int, rate: float) -> dict:
    return dict(
        peer_id=peer_id(seed).to_bytes(),
        epoch=epoch,
        samples_accumulated=samples,
        samples_per_second=rate,
        time=1.0,
        client_mode=False,
    )


def session(seed: int, root: str, now: float) -> PeerRecord:
    return PeerRecord(
        session_id=f"s{seed}",
        name=f"peer{seed}",
        joined_unix_s=now,
        last_seen_unix_s=now,
        phase="training",
        dht_peer_id=peer_id(seed).to_base58(),
        dht_verified=True,
        admitted_dht_id=peer_id(seed).to_base58(),
        admission_root=root,
    )


def test_monitor_credits_a_lone_volunteer_and_not_a_fake_record_stream(tmp_path: Path):
    store = Store(tmp_path / "s.sqlite3")
    health = HealthSettings(1.0, 10.0, 20.0)
    clock = [1000.0]
    dht = _FakeDHT()
    monitor = SwarmMonitor(dht, "run", store, health, SETTINGS, clock=lambda: clock[0])
    honest, attacker, ghost = (peer_id(i).to_base58() for i in range(3))
    store.upsert_peer(session(0, "addr:198.51.100.7", clock[0]))

    def read(i: int, extra=()) -> None:
        for sid in ("s0", "s1"):  # their sessions heartbeat on time
            if (record := store.get_peer(sid)) is not None:
                store.upsert_peer(dataclasses.replace(record, last_seen_unix_s=clock[0]))
        dht.entries = [entry(0, i // 4, 10 + i % 4, 8.0), *extra]
        monitor.tick()
        clock[0] += 1.0

    for i in range(20):  # alone, an epoch every 4 reads (one a second): epochs 0..3 settle
        read(i)
    assert store.contribution_totals() == {honest: 4 * 64}
    standing = Standings(store.contribution_totals, clock=lambda: clock[0]).of(honest)
    answer = pb.HeartbeatResponse(
        accepted_samples=standing.accepted_samples, share=standing.share, rank=standing.rank,
        ranked_peers=standing.ranked_peers,
    )  # fmt: skip
    assert standing_text(answer) == "accepted 256 samples (100.0% of the run, rank 1 of 1)"

    # the review's attack: an admitted session and a DHT-only node claim 1e6 samples/s and a new
    # epoch in every record (the old clamp credited 168 M samples in 24 s)
    store.upsert_peer(session(1, "addr:203.0.113.9", clock[0]))
    for i in range(20, 44):
        fakes = [entry(1, 100 + i, 10**8, 1e6), entry(2, 100 + i, 10**8, 1e6)]
        read(i, fakes)
    totals = store.contribution_totals()
    assert attacker not in totals and ghost not in totals
    assert totals == {honest: 10 * 64} and monitor.progress.global_epoch == 10

    # a restarted coordinator keeps the swarm's epoch: walking up from epoch 0 earns nothing either
    monitor = SwarmMonitor(dht, "run", store, health, SETTINGS, clock=lambda: clock[0])
    assert monitor.tally.swarm_epoch == 10
    for i in range(44, 54):
        read(i, [entry(1, i - 44, 10**8, 1e6)])
    totals = store.contribution_totals()
    assert attacker not in totals and totals[honest] == 11 * 64  # epoch 10, open at the restart, is lost
    store.close()


# ---------------------------------------------------------------- who is a trainer


HEALTH = HealthSettings(5.0, 20.0, 45.0)
NOW = 10_000.0


def trainer(who: str, root: str, **kw) -> PeerRecord:
    """A proven session training on time, in the swarm's progress records (its own record)."""
    fields = dict(
        session_id=f"s-{who}",
        joined_unix_s=NOW - 600,
        last_seen_unix_s=NOW - 1,
        phase="training",
        dht_peer_id=who,
        dht_verified=True,
        dht_last_seen_unix_s=NOW - 5,
        admission_root=root,
    )
    return PeerRecord(**(fields | kw))


def test_one_admitted_peer_cannot_make_itself_a_confirmed_trainer():
    attacker = trainer("A", "invite:a")
    # its own progress record and "training" heartbeats made it one (newcomers started at random weights)
    step, why = policy.resume_step(NOW, [attacker], 12, HEALTH)
    assert step == 12 and "start from checkpoint 12" in why
    own = [group(3, "A", {"A", "H1"}, t=NOW - 2)]  # its own account of averaging with someone
    assert policy.resume_step(NOW, [attacker], 12, HEALTH, own)[0] == 12
    # a groupmate of another root confirms a trainer: newcomers load the live state
    h1, h2 = trainer("H1", "invite:1"), trainer("H2", "invite:2")
    confirmed = [group(3, "H2", {"H1", "H2"}, t=NOW - 2)]
    step, why = policy.resume_step(NOW, [h1, h2], 12, HEALTH, confirmed)
    assert step == 0 and "a groupmate of another admission root confirmed" in why
    # trainers of one root confirm each other (peers behind one address in an open run)...
    lan = [trainer("H1", "addr:x"), trainer("H2", "addr:x")]
    by_lan = [group(3, "H2", {"H1", "H2"}, t=NOW - 2, root="addr:x")]
    assert policy.resume_step(NOW, lan, 12, HEALTH, by_lan)[0] == 0
    # ...but not once another root trains beside them, nor with a round older than the grace period
    assert policy.resume_step(NOW, [*lan, attacker], 12, HEALTH, by_lan)[0] == 12
    old = [group(3, "H2", {"H1", "H2"}, t=NOW - 60)]
    assert policy.resume_step(NOW, [h1, h2], 12, HEALTH, old)[0] == 12
    # nor a confirmed identity that is not training, left the progress records, or is DHT-only
    for changed in ({"phase": "loading_state"}, {"dht_last_seen_unix_s": NOW - 60}, {"source": "dht"}):
        peers = [dataclasses.replace(h1, **changed), h2]
        assert policy.resume_step(NOW, peers, 12, HEALTH, confirmed)[0] == 12, changed


# ---------------------------------------------------------------- voters: the same proof


VOTING = VoterSettings(HEALTH, min_age_s=120.0, seen_within_s=45.0)


def test_voters_need_a_groupmate_of_another_root_when_others_have_one_and_no_quarantine():
    h1, h2, a = trainer("H1", "invite:1"), trainer("H2", "invite:2"), trainer("A", "invite:a")
    confirmed = [group(3, "H1", {"H1", "H2"}, t=NOW - 30), group(3, "A", {"A", "H1"}, t=NOW - 30, gid="x")]
    voters, why = eligible_voters(NOW, [h1, h2, a], VOTING, confirmed)
    assert voters == {"H1", "H2"} and "1 not confirmed by a groupmate of another admission root" in why
    voters, why = eligible_voters(NOW, [h1, h2, a], VOTING, confirmed, frozenset({"H2"}))
    assert voters == {"H1"} and "1 quarantined" in why  # H1: confirmed by A's account (vouching is no gain)
    # nobody confirmed across roots (a lone honest root beside another): everyone proven votes, as before
    assert eligible_voters(NOW, [h1, a], VOTING)[0] == {"H1", "A"}
    # one root: its members cannot confirm each other, and need not
    same = [h1, trainer("H2", "invite:1")]
    by_same_root = [group(3, "H1", {"H1", "H2"}, t=NOW - 30, root="invite:1")]
    assert eligible_voters(NOW, same, VOTING, by_same_root)[0] == {"H1", "H2"}


# ---------------------------------------------------------------- pausing keeps its promise


def paused_swarm(reads: int = 64, pause_at: int = 16, pause_reads: int = 16) -> list[list[Sighting]]:
    """H2 trains throughout, an epoch every 2 reads (a read a second, as on `tiny`); H1 pauses at
    read `pause_at` with samples accumulated towards its epoch, hands them in (its record stays in that epoch with
    samples until the round), joins the round, idles `pause_reads` reads in the next epoch with no
    samples (hivemind's record stays there while the swarm goes on), then loads the swarm's state
    and trains again in the swarm's epoch."""
    stream = []
    for i in range(reads):
        h1 = Sighting("H1", i // 2, True)
        handed_in = (pause_at // 2 + 1) * 2  # the round that takes the handed-in samples
        if pause_at <= i < handed_in + pause_reads:
            h1 = (
                Sighting("H1", pause_at // 2, True)
                if i < handed_in
                else Sighting("H1", pause_at // 2 + 1, False)
            )
        stream.append([h1, Sighting("H2", i // 2, True)])
    return stream


def epochs(who: str, ledger: dict) -> set[int]:
    return {e for (peer, e) in ledger if peer == who}


def test_a_paused_peer_loses_nothing_and_holds_back_no_one():
    both = {"H1": "invite:1", "H2": "invite:2"}
    _, steady = credit(
        [[Sighting("H1", i // 2, True), Sighting("H2", i // 2, True)] for i in range(64)], both
    )
    _, ledger = credit(paused_swarm(), both)
    # H1 took part in epochs 0..8 (8: the samples it handed in) and again from 17 on, when it resumed
    trained = set(range(9)) | set(range(17, 30))
    assert epochs("H1", ledger) == trained & epochs("H1", steady)
    for e in trained & epochs("H1", steady):
        assert ledger["H1", e] == steady["H1", e]  # the same share as had it never paused
    # H2 trained alone while H1 idled: every epoch, the whole batch in those H1 sat out
    assert epochs("H2", ledger) == epochs("H2", steady)
    assert all(ledger["H2", e] == SETTINGS.target_batch_size for e in range(9, 17))


def run_monitor(tmp_path: Path, name: str, records) -> tuple[dict[str, int], dict[tuple[str, int], int]]:
    """Two volunteers of two admission roots under a monitor reading once a second (injected clock);
    `records(i)` gives read i's progress entries and which of the two heartbeat as paused. Returns
    the ledger's totals and its rows."""
    store, clock = Store(tmp_path / f"{name}.sqlite3"), [1000.0]
    dht = _FakeDHT()
    monitor = SwarmMonitor(
        dht, "run", store, HealthSettings(1.0, 10.0, 20.0), SETTINGS, clock=lambda: clock[0]
    )
    store.upsert_peer(session(0, "invite:0", clock[0]))
    store.upsert_peer(session(1, "invite:1", clock[0]))
    for i in range(64):
        dht.entries, paused = records(i)
        for seed in (0, 1):  # both heartbeat on time, "paused" while they are
            record = store.get_peer(f"s{seed}")
            phase = "paused" if seed in paused else "training"
            store.upsert_peer(dataclasses.replace(record, last_seen_unix_s=clock[0], phase=phase))
        monitor.tick()
        clock[0] += 1.0
    totals = store.contribution_totals()
    rows = {(who, e): n for who, e, n in store.query("SELECT dht_peer_id, epoch, samples FROM contributions")}
    store.close()
    return totals, rows


def test_monitor_the_reviews_pause_the_next_two_records_lose_nothing(tmp_path: Path):
    """The users' review: after a 16 s pause the honest peer's next two progress records claimed 96
    samples at 14.2 samples/s and 240 at 27.5 (hivemind's rate, measured across the pause, lags the
    samples); the old clamp kept 58 and 178. Here a second volunteer trains on meanwhile, an epoch
    every 2 s as on `tiny`: the paused peer's record, left in the epoch after its round, held the
    swarm's epoch back, so what it trained on resuming, and what the other one trained while it was
    paused, was read ahead of the swarm and lost."""

    def steady(i: int):
        return [entry(0, i // 2, 16 + 16 * (i % 2), 27.5), entry(1, i // 2, 16 + 16 * (i % 2), 27.5)], ()

    def pausing(i: int):
        other = entry(1, i // 2, 16 + 16 * (i % 2), 27.5)
        if 16 <= i < 18:  # paused at read 16: hands in the 48 samples it accumulated towards epoch 8
            return [entry(0, 8, 48, 27.5), other], {0}
        if 18 <= i < 34:  # the round took them: 16 s idle in epoch 9, no samples, the record unchanged
            return [entry(0, 9, 0, 27.5), other], {0}
        if i == 34:  # resumed, loaded the swarm's state (epoch 17): the review's next two records
            return [entry(0, 17, 96, 14.2), other], ()
        if i == 35:
            return [entry(0, 17, 240, 27.5), other], ()
        return steady(i)

    me, other = peer_id(0).to_base58(), peer_id(1).to_base58()
    plain, plain_rows = run_monitor(tmp_path, "steady", steady)
    totals, rows = run_monitor(tmp_path, "paused", pausing)
    half = SETTINGS.target_batch_size // 2
    assert rows[me, 8] == half  # what it handed in when it paused
    assert rows[me, 17] == half  # the two records after the pause, in full
    sat_out = range(9, 17)  # the epochs it was paused in: nothing for it, the whole batch for the other
    assert all((me, e) not in rows and rows[other, e] == SETTINGS.target_batch_size for e in sat_out)
    assert {k: v for k, v in rows.items() if k[1] not in sat_out} == {
        k: v for k, v in plain_rows.items() if k[1] not in sat_out
    }
    assert totals[me] == plain[me] - len(sat_out) * half
    assert totals[other] == plain[other] + len(sat_out) * half


def test_a_forged_burst_after_a_claimed_pause_earns_no_more_than_a_share_of_real_epochs():
    """An attacker "pauses", then claims 10^9 samples at 10^6 samples/s, in the swarm's epoch and
    far ahead of it. No record's samples or rate are credited: it is at most a participant of epochs
    the swarm really passes, and none where honest groupmates confirm each other and not it."""
    roots = {**ROOTS, "A": "invite:a"}
    reads = 64
    idle = [Sighting("A", 0, False)] * 16  # its "pause": a record with no samples
    burst = [[Sighting("A", e, True) for e in (i // 4, i // 4 + 1, 100 + i, 10**6)] for i in range(16, reads)]
    stream = [[*honest(i, "H1", "H2"), *([idle[i]] if i < 16 else burst[i - 16])] for i in range(reads)]
    reports = [group(e + 1, h, {"H1", "H2"}) for e in range(20) for h in ("H1", "H2")]
    tally, ledger = credit(stream, roots, reports)
    assert tally.swarm_epoch == reads // 4 - 1
    assert total(ledger, "A") == 0  # the honest pair confirm each other, not it
    assert total(ledger, "H1") == total(ledger, "H2") == (reads // 4 - 1) * 32  # epochs 0..14 settled
    # nobody confirmed across roots: it shares the epochs the swarm passed, no more, and the ones far ahead never
    tally, ledger = credit(stream, roots)
    assert {e for (who, e) in ledger if who == "A"} <= set(range(4, reads // 4 - 1))
    assert max(samples for (who, _), samples in ledger.items() if who == "A") == 64 // 3
    # what it claimed far ahead is noted at most `ahead_epochs` ahead, and credited only if the swarm gets there
    assert max(o.epoch for o in tally.open_epochs) <= tally.swarm_epoch + SETTINGS.ahead_epochs


def test_a_part_noted_ahead_of_the_swarm_is_dropped_if_its_session_is_gone_when_the_swarm_arrives():
    both = {"H1": "invite:1", "H2": "invite:2"}
    tally, settled, _ = advance(
        Tally(5), [Sighting("H1", 5, True), Sighting("H2", 9, True)], both, 0.0, SETTINGS
    )
    assert [o.epoch for o in tally.open_epochs] == [5, 9] and not settled
    assert tally.open_epochs[1].ahead_only == {"H2"}
    now, gone = 1.0, {"H1": "invite:1", "H3": "invite:3"}  # H2's session left (or was banned) meanwhile
    for e in range(6, 11):
        tally, settled, _ = advance(
            tally, [Sighting("H1", e, True), Sighting("H3", e, True)], gone, now, SETTINGS
        )
        now += 1.0
    nine = next(o for o in tally.open_epochs if o.epoch == 9)
    assert set(nine.participants) == {"H1", "H3"} and not nine.ahead_only
    # a part noted ahead, then seen again within the swarm's reach, is kept like any other
    tally, _, _ = advance(Tally(5), [Sighting("H1", 5, True), Sighting("H2", 6, True)], both, 0.0, SETTINGS)
    tally, _, _ = advance(tally, [Sighting("H1", 6, True), Sighting("H2", 6, True)], both, 1.0, SETTINGS)
    assert not next(o for o in tally.open_epochs if o.epoch == 6).ahead_only
