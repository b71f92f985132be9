"""Whose state the publisher trusts (voters), how far ahead a donor may claim to be (epoch bound), and
which tensors may ever be copied into the model (shape, dtype, finite) - pure decisions, plus the
publisher's round with a fake fetcher: two sybil identities serving the same forged state with the
highest priority are never asked, while the honest voters' state is chosen; a state the stream's
reader refuses reaches the round as a typed refusal, and is recorded."""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import pytest
import torch
from crowdtrain.coordinator.peers.health import HealthSettings, PeerRecord
from crowdtrain.coordinator.publishing.agreement import FetchedState, FetchFailed
from crowdtrain.coordinator.publishing.choice import admissible, choose_state, stream_refusals
from crowdtrain.coordinator.publishing.publisher import PublisherSettings
from crowdtrain.coordinator.publishing.statefetch import StateFetcher, publisher_limits
from crowdtrain.coordinator.publishing.voters import (
    VoterSettings,
    candidate_donors,
    eligible_voters,
    epoch_bound,
    voter_epochs,
)
from crowdtrain.peer.run.tensors import ExpectedTensor, check_tensor, check_tensors, expected_tensors

NOW = 10_000.0
SETTINGS = VoterSettings(HealthSettings(5.0, 20.0, 45.0), min_age_s=120.0, seen_within_s=45.0)


def session(who: str, **kw) -> PeerRecord:
    """A long-standing, proven, online, training session of DHT identity `who`."""
    fields = dict(
        session_id=f"s-{who}-{kw.pop('n', 0)}",
        joined_unix_s=NOW - 600,
        last_seen_unix_s=NOW - 1,
        phase="training",
        dht_peer_id=who,
        dht_verified=True,
        dht_last_seen_unix_s=NOW - 5,
    )
    return PeerRecord(**(fields | kw))


@pytest.mark.parametrize(
    ("record", "votes", "why"),
    [
        (session("a"), True, "1 voter(s)"),
        (session("a", dht_verified=False), False, "not proven"),
        (session("a", dht_peer_id=""), False, "not proven"),
        (session("a", banned=True), False, "banned"),
        (session("a", left_unix_s=NOW - 10), False, "0 voter(s)"),
        (session("a", last_seen_unix_s=NOW - 30), False, "not online"),
        (session("a", phase="loading_state"), False, "not online"),
        (session("a", dht_last_seen_unix_s=None), False, "signed progress records"),
        (session("a", dht_last_seen_unix_s=NOW - 60), False, "signed progress records"),
        (session("a", joined_unix_s=NOW - 60), False, "joined less than 120s ago"),
        (session("a", source="dht"), False, "known only from the DHT"),
    ],
)
def test_who_votes(record, votes, why):
    voters, reason = eligible_voters(NOW, [record], SETTINGS)
    assert (record.dht_peer_id in voters) is votes, reason
    assert why in reason


def test_one_vote_per_identity_and_its_oldest_session_counts():
    # two sessions of one identity are one voter; a re-join keeps the identity's age
    rejoined = [session("a", n=1, joined_unix_s=NOW - 30), session("a", n=2, left_unix_s=NOW - 40)]
    voters, _ = eligible_voters(NOW, [session("a"), session("a", n=1), session("b")], SETTINGS)
    assert voters == {"a", "b"}
    assert eligible_voters(NOW, rejoined, SETTINGS)[0] == {"a"}
    # a ban of any proven session bans the identity; an unproven session claiming it changes nothing
    banned = [session("a"), session("a", n=1, banned=True, left_unix_s=NOW - 5)]
    assert eligible_voters(NOW, banned, SETTINGS)[0] == frozenset()
    claimed = [session("a"), session("a", n=1, dht_verified=False, banned=True)]
    assert eligible_voters(NOW, claimed, SETTINGS)[0] == {"a"}
    # sybils: fresh identities with proven ids vote only once they are long-standing
    sybils = [session(f"s{i}", joined_unix_s=NOW - 10) for i in range(5)]
    voters, reason = eligible_voters(NOW, [session("a"), *sybils], SETTINGS)
    assert voters == {"a"} and "5 joined less than 120s ago" in reason


def test_donors_come_from_voters_signed_records_and_forged_claims_only_lower_an_epoch():
    voters = frozenset({"a", "b", "c"})
    claims = [("a", 7, False), ("b", 8, False), ("c", 8, True), ("x", 99, False), ("b", 3, False)]
    assert voter_epochs(claims, voters) == {"a": 7, "b": 3, "c": 8}
    assert candidate_donors(claims, voters) == ["a", "b"]  # c is in client mode: cannot serve
    assert candidate_donors([("x", 99, False)], voters) == []


def test_a_voter_claiming_a_later_epoch_in_its_record_is_not_asked_first():
    voters = frozenset({"a", "b", "c", "liar"})
    claims = [("a", 7, False), ("b", 7, False), ("c", 6, False), ("liar", 10**9, False)]
    for salt in ("0", "1", "2", "3"):
        order = candidate_donors(claims, voters, salt=salt)
        assert order[-1] == "c" and set(order[:3]) == {"a", "b", "liar"}
    orders = {tuple(candidate_donors(claims, voters, salt=str(i))[:3]) for i in range(20)}
    assert len(orders) > 1  # ties are broken differently each round, not by a grindable id


@pytest.mark.parametrize(
    ("donor", "epoch", "epochs", "ok", "why"),
    [
        ("a", 10, {"a": 10, "b": 10}, True, "within 11"),
        ("a", 11, {"a": 10, "b": 10}, True, "within 11"),  # a step in flight
        ("a", 12, {"a": 12, "b": 10}, False, "beyond 11"),  # its own record does not vouch for it
        ("a", 2**62, {"a": 10, "b": 10, "c": 9}, False, f"claims epoch {2**62}"),
        ("a", 11, {"a": 10}, True, "its own progress record"),  # the only voter
        ("a", 12, {"a": 10}, False, "beyond 11"),
        ("a", 5, {}, False, "no voter's progress record"),
    ],
)
def test_epoch_bound(donor, epoch, epochs, ok, why):
    decision, reason = epoch_bound(donor, epoch, epochs)
    assert decision is ok and why in reason, reason


W = ExpectedTensor("w", (4, 3), "torch.float32", 4)


@pytest.mark.parametrize(
    ("tensor", "why"),
    [
        (torch.zeros(4, 3), None),
        (torch.zeros(1), "has shape (1,)"),  # copy_ would broadcast it over the whole matrix
        (torch.zeros(3, 4), "has shape (3, 4)"),
        (torch.zeros(4, 3, dtype=torch.float64), "has dtype torch.float64"),
        (torch.zeros(4, 3, dtype=torch.int64), "has dtype torch.int64"),
        (torch.full((4, 3), float("nan")), "NaN or infinite"),
        (torch.full((4, 3), float("-inf")), "NaN or infinite"),
        ([0.0] * 12, "is a list, not a tensor"),
    ],
)
def test_each_tensor_must_fit_the_model(tensor, why):
    problem = check_tensor(tensor, W)
    assert problem == why if why is None else why in problem


def test_a_state_must_have_every_parameter():
    b = ExpectedTensor("b", (3,), "torch.float32", 4)
    assert check_tensors([torch.zeros(4, 3), torch.zeros(3)], [W, b]) is None
    assert "1 tensors, the model has 2" in check_tensors([torch.zeros(4, 3)], [W, b])
    assert "b has shape (1,)" in check_tensors([torch.zeros(4, 3), torch.zeros(1)], [W, b])


# ------------------------------------------------------------------ the publisher's round


HONEST = [torch.ones(4, 3)]
FORGED = [torch.full((4, 3), 3.0)]


class FakeFetcher:
    """The swarm as the publisher sees it: signed progress records, and the states peers serve."""

    def __init__(self, claims, served):
        self.claims, self.served, self.asked = claims, served, []

    def progress_claims(self):
        return self.claims

    def fetch_all(self, peers):
        self.asked += peers
        return [FetchedState(p, *self.served[p]) for p in peers if p in self.served], {}


def run_round(fetcher, voters, last=0):
    rejected = []
    chosen = choose_state(
        fetcher,
        frozenset(voters),
        "test",
        last,
        dataclasses.replace(PublisherSettings(), agreement_retry_s=0.0),
        threading.Event(),
        lambda step, reason: rejected.append(reason),
    )
    return chosen, rejected


def test_two_sybils_with_the_top_priority_and_the_same_forged_state_are_never_asked():
    claims = [("sybil1", 12, False), ("sybil2", 12, False), ("h1", 12, False), ("h2", 12, False)]
    served = {"sybil1": (12, FORGED), "sybil2": (12, FORGED), "h1": (12, HONEST), "h2": (12, HONEST)}
    fetcher = FakeFetcher(claims, served)
    chosen, rejected = run_round(fetcher, {"h1", "h2"})
    assert chosen is not None and torch.equal(chosen.tensors[0], HONEST[0])
    assert not {"sybil1", "sybil2"} & set(fetcher.asked) and not rejected


def test_two_colluding_voters_among_five_never_publish_their_state():
    honest = {f"h{i}": (12, HONEST) for i in range(3)}
    served = honest | {"f1": (12, FORGED), "f2": (12, FORGED)}
    claims = [(p, 12, False) for p in served]
    for last in range(10):  # each round breaks ties differently: whichever 4 of 5 are asked
        chosen, _ = run_round(FakeFetcher(claims, served), set(served), last=last)
        assert chosen is None or torch.equal(chosen.tensors[0], HONEST[0])
    chosen, rejected = run_round(FakeFetcher(claims[:2] + claims[3:], served), set(served) - {"h2"})
    assert chosen is None and any("disagree" in r for r in rejected)  # 2 against 2: nothing


def test_with_no_eligible_voter_nothing_is_published(caplog):
    fetcher = FakeFetcher([("sybil1", 12, False)], {"sybil1": (12, FORGED)})
    with caplog.at_level("INFO"):
        chosen, _ = run_round(fetcher, set())
    assert chosen is None and fetcher.asked == []
    assert "no eligible voter serves state" in caplog.text


def test_a_lone_donor_is_trusted_only_when_it_is_an_eligible_voter():
    served = {"h1": (12, HONEST), "sybil1": (12, FORGED)}
    claims = [("h1", 12, False), ("sybil1", 12, False)]
    chosen, _ = run_round(FakeFetcher(claims, served), {"h1"})
    assert chosen is not None and chosen.peer == "h1"


def test_a_voter_claiming_a_huge_epoch_is_refused_with_its_evidence():
    claims = [("h1", 12, False), ("h2", 12, False), ("bad", 12, False)]
    served = {"bad": (2**62, HONEST), "h1": (12, HONEST), "h2": (12, HONEST)}
    chosen, rejected = run_round(FakeFetcher(claims, served), {"h1", "h2", "bad"})
    assert chosen is not None and chosen.epoch == 12
    assert any("peer bad" in r and f"claims epoch {2**62}" in r for r in rejected), rejected


def _stream(epoch: int, tensors: list) -> list:
    """`tensors` as hivemind 1.1.12's rpc_download_state streams them, the metadata first."""
    from hivemind.compression import serialize_torch_tensor
    from hivemind.proto import averaging_pb2
    from hivemind.utils.serializer import MSGPackSerializer
    from hivemind.utils.streaming import split_for_streaming

    parts = [part for t in tensors for part in split_for_streaming(serialize_torch_tensor(t))]
    metadata = MSGPackSerializer.dumps({"epoch": epoch})
    return [
        averaging_pb2.DownloadData(tensor_part=part, metadata=metadata if i == 0 else b"")
        for i, part in enumerate(parts)
    ]


@contextlib.contextmanager
def streaming_fetcher(served: dict, expected=(W,), gone=()):
    """The publisher's real StateFetcher (its reading, checking and typed failures), whose donors
    stream `served` (peer -> (epoch, tensors)) from memory; a peer in `gone` has left."""
    fetcher = StateFetcher(None, "run", publisher_limits(tuple(expected)), timeout_s=10)

    async def open_stream(peer):
        if peer in gone:
            raise ConnectionResetError(f"{peer} left the swarm")

        async def stream():
            for message in _stream(*served[peer]):
                yield message

        return stream()

    fetcher._open_stream = open_stream
    fetcher.progress_claims = lambda: (
        [(p, served[p][0], False) for p in served] + [(p, 12, False) for p in gone]
    )
    try:
        yield fetcher
    finally:
        fetcher.shutdown()


def test_a_broadcastable_or_wrongly_typed_state_is_refused_before_judging():
    served = {
        "one": (12, [torch.ones(1)]),
        "f64": (12, [torch.ones(4, 3, dtype=torch.float64)]),
        "ok": (12, HONEST),
        "old": (3, HONEST),
    }
    with streaming_fetcher(served) as fetcher:
        fetched, failed = fetcher.fetch_all(list(served))
    kept, refused = admissible(fetched, {"one": 12, "f64": 12, "ok": 12, "old": 12}, 5)
    refused |= stream_refusals(failed)
    assert [s.peer for s in kept] == ["ok"]
    assert set(refused) == {"one", "f64"} and "shape (1,)" in refused["one"]


def test_the_publisher_refuses_a_broadcastable_tensor_before_copying_it(tmp_path):
    """Tensor.copy_ broadcasts: a (1,) tensor would fill the whole matrix and then pass any shape
    check of the model's own state. It must be refused before the copy (where its stream is read),
    the model untouched."""
    from types import SimpleNamespace

    from crowdtrain.coordinator.publishing.publisher import Publisher

    model = torch.nn.Linear(3, 4, bias=False)
    before = model.weight.detach().clone()
    publisher = Publisher.__new__(Publisher)  # no DHT, no swarm: only the round itself
    rejected = []
    publisher.settings = dataclasses.replace(PublisherSettings(), agreement_retry_s=0.0)
    publisher.root, publisher.model, publisher._stop = tmp_path, model, threading.Event()
    publisher.expected, publisher._tracker = expected_tensors(model), SimpleNamespace(global_epoch=12)
    publisher.on_reject = lambda step, reason: rejected.append(reason)
    publisher.voters = lambda: (frozenset({"peer"}), "test")
    with streaming_fetcher({"peer": (12, [torch.full((1,), 7.0)])}, publisher.expected) as fetcher:
        publisher._fetcher = fetcher
        assert publisher.publish_once() is None
    assert torch.equal(model.weight, before) and "weight declares shape (1,)" in rejected[0], rejected


def test_a_refused_stream_is_recorded_as_a_refusal_and_a_donor_that_left_is_not():
    """The reader's StateRefused reaches choice's refusals as a typed `FetchFailed(refused=True)`
    (no class name in a string); a donor that left is a failure, not evidence against it."""
    served = {f"h{i}": (12, HONEST) for i in range(3)} | {"nan": (12, [torch.full((4, 3), float("nan"))])}
    settings = dataclasses.replace(PublisherSettings(), agreement_retry_s=0.0, max_donors_asked=5)
    rejected = []
    with streaming_fetcher(served, gone=("left",)) as fetcher:
        fetched, failed = fetcher.fetch_all(["h0", "nan", "left"])
        chosen = choose_state(
            fetcher,
            frozenset({*served, "left"}),
            "test",
            0,
            settings,
            threading.Event(),
            lambda step, reason: rejected.append(reason),
        )
    assert [s.peer for s in fetched] == ["h0"] and failed["nan"].refused and not failed["left"].refused
    assert failed["nan"] == FetchFailed("w contains NaN or infinite values", refused=True)
    assert "left the swarm" in failed["left"].reason
    assert stream_refusals(failed) == {"nan": "w contains NaN or infinite values"}
    assert chosen is not None and torch.equal(chosen.tensors[0], HONEST[0])
    assert rejected == ["refused the state of peer nan: w contains NaN or infinite values"], rejected


# ------------------------------------------------------------------ a real download over hivemind


def test_a_donor_streaming_a_giant_state_is_cut_off_early():
    """A DecentralizedAverager serves a 10 MiB state; a fetcher for that model gets it whole, one
    for a model 10x smaller hangs up at the first part, which declares the bigger shape."""
    import time

    import hivemind
    from crowdtrain.peer.swarm.lifecycle import use_fork_start_method
    from hivemind.averaging import DecentralizedAverager

    # hivemind 1.1.12: the RPC's protocol name is "<prefix>::<class name>.rpc_download_state"
    class TrainingStateAverager(DecentralizedAverager):
        def get_current_state(self):  # what TrainingStateAverager serves: the epoch, then tensors
            with self.get_tensors() as tensors:
                return {"epoch": 7}, [t.clone() for t in tensors], None

    use_fork_start_method()
    served = torch.randn(2560, 1024)  # 10 MiB of float32
    fair = publisher_limits((ExpectedTensor("w", (2560, 1024), "torch.float32", 4),))
    small = publisher_limits((ExpectedTensor("w", (256, 1024), "torch.float32", 4),))  # 1 MiB
    maddrs = ["/ip4/127.0.0.1/tcp/0"]
    donor_dht = hivemind.DHT(start=True, host_maddrs=maddrs)
    fetcher_dht = hivemind.DHT(
        start=True, host_maddrs=maddrs, initial_peers=[str(m) for m in donor_dht.get_visible_maddrs()]
    )
    donor = TrainingStateAverager(
        [served], donor_dht, prefix="trust_state_averager", target_group_size=2, start=True
    )
    fetchers = [StateFetcher(fetcher_dht, "trust", limits, timeout_s=30) for limits in (fair, small)]
    try:
        peer = donor_dht.peer_id.to_base58()
        states, failed = fetchers[0].fetch_all([peer])
        assert not failed and states[0].epoch == 7 and torch.equal(states[0].tensors[0], served)

        t0 = time.monotonic()
        states, failed = fetchers[1].fetch_all([peer])
        # refused at its first part, before reading (or decoding) the rest: peer/swarm/statewire.py
        assert states == [] and failed[peer].refused, failed
        assert "declares shape (2560, 1024), ours is (256, 1024)" in failed[peer].reason, failed
        assert time.monotonic() - t0 < 20
    finally:
        for fetcher in fetchers:
            fetcher.shutdown()
        donor.shutdown()
        fetcher_dht.shutdown()
        donor_dht.shutdown()


# ------------------------------------------------------------------ a joiner checks what it loaded


def _weights(scale: float = 1.0, shift: float = 0.0, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = {"w": 0.02 * torch.randn(64, 32, generator=g), "b": torch.zeros(32)}
    return {k: scale * v + shift for k, v in w.items()}


def _moved(rms: float) -> dict:
    g = torch.Generator().manual_seed(1)
    return {k: v + rms * torch.randn(v.shape, generator=g) for k, v in _weights().items()}


@pytest.mark.parametrize(
    ("loaded", "epochs", "ok", "why"),
    [
        (_weights(), 0, True, "RMS distance 0 "),
        (_moved(1e-3), 3, True, "for 3 epoch(s)"),  # 3 Adam steps at lr 1e-3 move about this much
        (_moved(3e-2), 3, False, "allowed 0.0077"),  # 1.5 * 1e-3 * (3 + 2) + 1% of RMS 0.02
        (_moved(3e-2), 100, True, "for 100 epoch(s)"),
        (_weights(scale=3.0), 3, False, "RMS distance 0.04"),  # the forger's 3x-scaled weights
        (_weights(shift=0.01) | {"w": torch.full((64, 32), 0.01)}, 3, False, "RMS distance"),
        (_weights() | {"b": torch.full((32,), float("nan"))}, 3, False, "b contains NaN"),
        ({"w": _weights()["w"]}, 3, False, "b is missing"),
        (_weights() | {"w": torch.zeros(1)}, 3, False, "w is missing or has another shape"),
    ],
)
def test_a_joiner_believes_a_state_only_as_far_from_the_checkpoint_as_the_epochs_allow(
    loaded, epochs, ok, why
):
    from crowdtrain.peer.volunteer.recovery import drift_check

    decision, reason = drift_check(loaded, _weights(), epochs, peak_lr=1e-3)
    assert decision is ok and why in reason, reason


def test_without_a_checkpoint_a_joiner_still_refuses_non_finite_state():
    from crowdtrain.peer.volunteer.recovery import drift_check

    assert drift_check(_weights(), {}, 0, 0.0)[0]
    assert not drift_check(_weights() | {"w": torch.full((2,), float("inf"))}, {}, 0, 0.0)[0]


def _fake_optimizer(adam, load_state_from_peers, global_epoch: int, epochs: list):
    """What Recovery reads of hivemind's Optimizer: a swarm at `global_epoch` (3 peers); every
    epoch the joiner reports is appended to `epochs`."""
    from types import SimpleNamespace

    averager = SimpleNamespace(optimizer=adam, local_epoch=0, _update_scheduler=lambda: None)
    tracker = SimpleNamespace(
        fetched_global_progress_this_epoch=threading.Event(),
        global_epoch=global_epoch,
        global_progress=SimpleNamespace(num_peers=3),
        report_local_progress=lambda local_epoch, samples_accumulated: epochs.append(local_epoch),
    )
    tracker.fetched_global_progress_this_epoch.set()
    return SimpleNamespace(
        tracker=tracker, local_epoch=0, state_averager=averager, load_state_from_peers=load_state_from_peers
    )


def test_a_joiner_discards_a_forged_state_and_starts_from_the_checkpoint(tmp_path, monkeypatch, caplog):
    """The whole path with a fake optimizer: hivemind 'loads' a 3x-scaled state at the swarm's
    epoch; the joiner compares it with the published checkpoint, discards it (statistics zeroed)
    and loads the checkpoint's weights, joining at the swarm's epoch."""
    from types import SimpleNamespace

    from crowdtrain.peer.checkpoints import pull
    from crowdtrain.peer.volunteer.recovery import Recovery

    model = torch.nn.Linear(32, 64)
    published = {"weight": 0.02 * torch.randn(64, 32), "bias": torch.zeros(64)}
    adam = torch.optim.AdamW(model.parameters(), lr=1e-3)
    adam.state[model.weight] = {"step": torch.tensor(5.0), "exp_avg": torch.full((64, 32), 9.0)}
    epochs = []

    def load_state_from_peers():  # what a forger at the top of the donor list makes hivemind do
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(3 * published[name])
        opt.local_epoch = 12

    opt = _fake_optimizer(adam, load_state_from_peers, 12, epochs)
    listed = [SimpleNamespace(step=10)]
    monkeypatch.setattr(pull, "list_published", lambda coordinator, tls: (listed, "key"))
    recovery = Recovery("127.0.0.1:1", model, torch.device("cpu"), tmp_path, threading.Event())
    monkeypatch.setattr(recovery, "_checkpoint_tensors", lambda step: published)

    def load_checkpoint(step):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(published[name])

    monkeypatch.setattr(recovery, "load_checkpoint", load_checkpoint)
    swarm = SimpleNamespace(matchmaking_time_s=1.0, load_state_timeout_s=5.0)
    with caplog.at_level("INFO"):
        recovery.catch_up(opt, swarm)
    assert "discarding the state loaded from the swarm" in caplog.text
    assert "the state loaded from the swarm was discarded" in caplog.text
    assert torch.equal(model.weight, published["weight"]) and epochs == [12]
    assert not adam.state[model.weight]["exp_avg"].any()


def test_a_joiner_that_holds_the_latest_checkpoint_joins_a_swarm_that_cannot_send_its_state(
    tmp_path, monkeypatch, caplog
):
    """Join had the newcomer start from the latest checkpoint (step 10); the swarm is at epoch 12
    but its only trainer froze. Nothing newer is published, yet the joiner holds the best the run
    can offer: it joins the swarm's epoch with those weights rather than giving up (seen in CI)."""
    from types import SimpleNamespace

    from crowdtrain.peer.checkpoints import pull
    from crowdtrain.peer.volunteer.recovery import Recovery

    model = torch.nn.Linear(8, 4)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    epochs = []
    opt = _fake_optimizer(torch.optim.AdamW(model.parameters()), lambda: None, 12, epochs)
    monkeypatch.setattr(pull, "list_published", lambda coordinator, tls: ([SimpleNamespace(step=10)], "key"))
    monkeypatch.setattr(pull, "pull", lambda *a, **kw: pytest.fail("the checkpoint is pulled again"))
    recovery = Recovery("127.0.0.1:1", model, torch.device("cpu"), tmp_path, threading.Event())
    recovery.loaded_step = opt.local_epoch = 10  # as load_checkpoint + continue_epoch_count leave it
    monkeypatch.setattr("crowdtrain.peer.volunteer.recovery.CATCH_UP_RETRY_S", 0.0)
    swarm = SimpleNamespace(matchmaking_time_s=1.0, load_state_timeout_s=0.1)
    with caplog.at_level("INFO"):
        recovery.catch_up(opt, swarm)
    assert "no peer could send the swarm's state: starting from published checkpoint step 10" in caplog.text
    assert epochs == [12]
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_an_operator_who_trusts_one_voter_gets_the_first_voters_state():
    claims = [("h1", 12, False), ("h2", 12, False)]
    served = {"h1": (12, HONEST), "h2": (12, HONEST)}
    fetcher = FakeFetcher(claims, served)
    rejected = []
    chosen = choose_state(
        fetcher,
        frozenset(served),
        "test",
        0,
        PublisherSettings(agreement_peers=1),
        threading.Event(),
        lambda step, reason: rejected.append(reason),
    )
    assert chosen is not None and len(fetcher.asked) == 1 and not rejected
