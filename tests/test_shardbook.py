"""Shard leases, places in the data and coverage: the pure core with an injected clock, then the
servicer over in-process gRPC on 127.0.0.1:0 with a run built from a local Parquet dataset."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from crowdtrain.coordinator.api.servicer import CoordinatorServicer, RunInfo
from crowdtrain.coordinator.peers.health import HealthSettings
from crowdtrain.coordinator.peers.shardbook import (
    Claim,
    Coverage,
    Cursor,
    ShardBook,
    advance,
    choose_shard,
    coverage_of,
)
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.peer.data.reader import Place, PlaceFile, ShardReader, pass_order
from crowdtrain.protos import coordinator_pb2 as pb

from tests.helpers import serving
from tests.identities import signed_join

FRESH = [Cursor() for _ in range(4)]


def test_a_joiner_gets_the_least_read_free_shard_and_shares_only_when_all_are_read():
    cursors = [Cursor(1, 0, 100), Cursor(0, 90, 100), Cursor(0, 10, 100), Cursor(0, 50, 100)]
    shard, start, why = choose_shard(4, cursors, Counter({2: 1}))
    assert (shard, start) == (3, cursors[3]) and "least-read free shard (3 of 4 free)" in why
    # all read: the least-shared, then the least-read of those (shard 3: one reader, half read)
    shard, _, why = choose_shard(4, cursors, Counter({0: 1, 1: 1, 2: 2, 3: 1}))
    assert shard == 3 and "all 4 shards are being read: shares shard 3 with 1 peer(s)" in why


def test_a_returning_peer_continues_its_shard_only_while_nobody_reads_it():
    cursors = [Cursor(0, 40, 100)] + FRESH[1:]
    shard, start, why = choose_shard(4, cursors, Counter(), Claim(0, 64, 0))
    assert (shard, start.position, start.passes) == (0, 64, 0) and "continues shard 0" in why
    # its own older claim never moves the shard back
    assert choose_shard(4, cursors, Counter(), Claim(0, 8, 0))[1].position == 40
    # taken by another peer meanwhile: it gets another shard
    assert choose_shard(4, cursors, Counter({0: 1}), Claim(0, 64, 0))[0] != 0
    # a claim naming no shard of the run is ignored
    assert choose_shard(4, cursors, Counter(), Claim(99, 5, 0))[0] in (1, 2, 3)


@pytest.mark.parametrize(
    ("claim", "after", "note"),
    [
        (Claim(0, 60, 0, 100), Cursor(0, 60, 100), ""),
        (Claim(0, 10, 0, 100), Cursor(0, 40, 100), "behind the cursor"),
        (Claim(0, 101, 0, 100), Cursor(0, 40, 100), "past the shard's end"),
        (Claim(0, 0, 3, 100), Cursor(0, 40, 100), "skipped passes"),
        (Claim(0, 0, 1, 100), Cursor(1, 0, 100), ""),
    ],
)
def test_a_cursor_moves_only_forward_one_pass_at_a_time_within_the_shard(claim, after, note):
    moved, why = advance(Cursor(0, 40, 100), claim, 10**6)
    assert moved == after and note in why


def test_a_shard_size_larger_than_its_bytes_allow_is_not_believed():
    moved, why = advance(Cursor(), Claim(0, 5, 0, 10**9), max_sequences=5000)
    assert moved.sequences == 0 and "exceeds what the shard's bytes allow" in why
    assert coverage_of([moved, Cursor(2, 50, 100)]) == Coverage(read=250, total=100, shards=2, sized=1)


def test_leases_move_on_to_the_reserved_shard_and_a_leaver_frees_its_shard():
    book = ShardBook(None, num_shards=3, shard_bytes=[10**6] * 3, live_s=10.0)
    a, _, _ = book.lease(0.0, "a")
    b, _, _ = book.lease(0.0, "b")
    assert a != b
    lease, reserved = book.report(1.0, "a", a, -1, Claim(a, 30, 0, 50))
    assert lease == a and reserved not in (a, b)  # the one shard nobody reads
    # a reads its reserved shard now: that is its lease; the old one is free again
    lease, reserved = book.report(2.0, "a", a, reserved, Claim(reserved, 8, 0, 50))
    assert lease not in (a, b) and book.cursor(a) == Cursor(0, 30, 50)
    book.release("b")
    c, start, _ = book.lease(3.0, "c")
    assert c in (a, b)  # a freed shard, continued where it stood
    assert start == book.cursor(c)
    # a silent peer's lease expires too
    d, _, _ = book.lease(100.0, "d")
    assert book.lease(100.0, "e")[0] not in (d,) and d in (0, 1, 2)


def test_the_reader_tags_each_batch_with_the_place_after_it_and_continues_from_a_place():
    blocks = [[i] * 4 for i in range(10)]
    reader = ShardReader(lambda i: blocks, 3, Place(1, 0, 0), batch_size=3, run_id="r")
    it = iter(reader)
    got = [next(it) for _ in range(4)]
    order = pass_order(10, "r", 1, 0)
    assert [b[0][0] for b, _ in got[:3]] == [blocks[order[0]][0], blocks[order[3]][0], blocks[order[6]][0]]
    assert [p for _, p in got[:3]] == [Place(1, 0, 3, 10), Place(1, 0, 6, 10), Place(1, 1, 0, 10)]
    assert got[3][1].shard == 2  # without a word from the coordinator: the next shard
    # a restart from Place(1, 0, 3) yields exactly the batches after the first
    again = iter(ShardReader(lambda i: blocks, 3, Place(1, 0, 3), batch_size=3, run_id="r"))
    assert [next(again)[0] for _ in range(2)] == [got[1][0], got[2][0]]


def test_the_place_file_survives_a_restart_and_a_damaged_one_is_ignored(tmp_path: Path):
    places = PlaceFile(tmp_path, "127.0.0.1:1", "alice")
    assert places.read() is None
    places.write("ct_run", Place(2, 1, 40, 90))
    assert PlaceFile(tmp_path, "127.0.0.1:1", "alice").read() == ("ct_run", Place(2, 1, 40, 90))
    assert PlaceFile(tmp_path, "127.0.0.1:1", "bob").read() is None
    places.path.write_text('{"run_id": "x", "shard": -1, "passes": 0, "position": 0, "sequences": 0}')
    assert places.read() is None
    places.path.write_text("{" * 10_000)
    assert places.read() is None


@pytest.fixture
def parquet_run(tmp_path: Path):
    """A coordinator servicer over a run whose data is a local Parquet file."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from crowdtrain.coordinator.run import dataset

    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 20 for i in range(400)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "corpus.parquet")
    spec, _, _ = dataset.build_dataset(
        [str(tmp_path / "corpus.parquet")],
        tmp_path / "d",
        source_label="p",
        num_shards=4,
        eval_fraction=0.05,
        max_bytes=0,
        seq_len=32,
        eval_max_sequences=8,
        vocab_size=300,
    )
    store = Store(tmp_path / "state.sqlite3")
    run = RunInfo(
        manifest_json='{"run_id": "ct_pq"}',
        manifest_sha256="abc",
        tokenizer_json="{}",
        num_shards=len(spec.shards),
        http_base_url="http://127.0.0.1:1",
        checkpoint_root=tmp_path / "checkpoints",
        shard_bytes=tuple(s.size_bytes for s in spec.shards),
    )
    clock = [time.time()]  # joins are signed on the wall clock
    servicer = CoordinatorServicer(
        run, store, HealthSettings(2.0, 10.0), initial_peers=list, clock=lambda: clock[0]
    )
    with serving(servicer, store) as client:
        yield client, servicer, clock


def _beat(client, joined, shard, position, passes=0, sequences=50):
    return client.heartbeat(
        pb.HeartbeatRequest(
            session_id=joined.session_id,
            session_token=joined.session_token,
            phase="training",
            shard_index=shard,
            shard_position=position,
            shard_pass=passes,
            shard_sequences=sequences,
        )
    )


def test_two_peers_over_parquet_never_read_one_shard_and_a_restart_continues(parquet_run):
    client, servicer, clock = parquet_run
    a = client.join(signed_join(name="a"))
    b = client.join(signed_join(name="b"))
    shard_a, shard_b = a.settings.shard_index, b.settings.shard_index
    assert shard_a != shard_b
    answer = _beat(client, a, shard_a, 20)
    assert answer.HasField("next_shard") and answer.next_shard not in (shard_a, shard_b)
    answer_b = _beat(client, b, shard_b, 10)
    assert answer_b.next_shard not in (shard_a, shard_b, answer.next_shard)  # reservations differ too
    # a stops after sequence 30 and comes back, saying so: it continues there
    _beat(client, a, shard_a, 30)
    client.leave(a.session_id, a.session_token, "restart")
    again = client.join(
        signed_join(name="a", resume_run_id="ct_pq", resume_shard=shard_a, resume_position=30, resume_pass=0)
    )
    assert (again.settings.shard_index, again.settings.shard_position) == (shard_a, 30)
    # b's shard is not given to a newcomer while b reads it; a claim for another run is ignored
    c = client.join(signed_join(name="c", resume_run_id="other", resume_shard=shard_b, resume_position=5))
    assert c.settings.shard_index not in (shard_a, shard_b)
    # b leaves: its shard is held for its restart a while, then reassigned, continued where b stopped
    client.leave(b.session_id, b.session_token, "bye")
    d = client.join(signed_join(name="d"))
    assert d.settings.shard_index not in (shard_a, shard_b, c.settings.shard_index)
    clock[0] += 121.0
    for peer, shard in ((again, shard_a), (c, c.settings.shard_index), (d, d.settings.shard_index)):
        _beat(client, peer, shard, 1)
    e = client.join(signed_join(name="e"))
    assert (e.settings.shard_index, e.settings.shard_position) == (shard_b, 10)
    coverage = servicer.shards.coverage()
    assert (coverage.read, coverage.total, coverage.sized) == (30 + 10 + 1 + 1, 4 * 50, 4)


def test_hostile_places_are_refused_or_ignored(parquet_run):
    client, servicer, _ = parquet_run
    a = client.join(signed_join(name="a"))
    shard = a.settings.shard_index
    reserved = _beat(client, a, shard, 10).next_shard
    _beat(client, a, shard, 10**9)  # past the shard's end
    other = next(i for i in range(4) if i not in (shard, reserved))
    _beat(client, a, other, 45)  # a shard it was neither given nor reserved
    assert servicer.shards.cursor(shard) == Cursor(0, 10, 50)
    assert servicer.shards.cursor(other).position == 0
    from crowdtrain.peer.link.client import CoordinatorRejected

    with pytest.raises(CoordinatorRejected, match="INVALID_ARGUMENT"):
        _beat(client, a, shard, -5)
    with pytest.raises(CoordinatorRejected, match="INVALID_ARGUMENT"):
        client.join(signed_join(name="x", resume_run_id="../../etc", resume_shard=1))
    # a claim for a shard the run does not have (within the field's bound): an ordinary lease instead
    past = client.join(signed_join(name="y", resume_run_id="ct_pq", resume_shard=7, resume_position=40))
    assert 0 <= past.settings.shard_index < 4 and past.settings.shard_position == 0
    assert past.settings.shard_index not in (shard, reserved)  # still not a live peer's shard
    assert all(servicer.shards.cursor(i).position <= 10 for i in range(4))


def test_crowdtrain_status_says_how_much_of_the_data_was_read():
    from crowdtrain.coordinator.dashboard.render import format_status

    summary = pb.SwarmSummary(
        run_id="r",
        latest_checkpoint_step=-1,
        dataset_sequences_read=150,
        dataset_sequences=180,
        dataset_shards=3,
        dataset_shards_sized=2,
    )
    text = format_status(pb.GetStatusResponse(summary=summary), 0.0)
    # no share while a shard's size is unknown: it would fall as more get sized (dashboard.numbers)
    assert "data read: 150 training sequences; 2 of 3 shards sized (a share once every shard is)" in text
    summary.dataset_shards_sized, summary.dataset_sequences = 3, 200
    text = format_status(pb.GetStatusResponse(summary=summary), 0.0)
    assert "data read: 150 of 200 training sequences (75.0%)" in text
