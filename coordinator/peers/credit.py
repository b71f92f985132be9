"""Credit is what the swarm accepted: per epoch, the run's target batch size, shared among the proven
identities that took part in it. Pure functions; the swarm monitor only schedules them.

A progress record is its writer's word (its epoch, its samples, its samples/s), so none of its
numbers is credited. What the monitor counts instead:

- **who**: only DHT identities a live coordinator session proved (`live_identity_roots`), each
  under its admission root (an invite, an allowlist entry or, in open runs, an address); DHT-only
  nodes never;
- **which epochs**: the swarm's epoch (`next_swarm_epoch`) is the highest that identities of at
  least two admission roots reached (the only root's when one is active), never behind its last
  value (roots more than an epoch behind it are laggards and have no say) and at most one epoch
  ahead of it per read. An identity takes part in an epoch when a read finds it there with samples,
  in the swarm's epoch or the one before, or up to `ahead_epochs` ahead of it: such an epoch is
  only noted, and credited like the others once the swarm passes it. The swarm's epoch lags the
  training when a root's record stands still (its peer paused, its record left where its last round
  put it, so two roots no longer agree on anything newer; then it walks up one epoch per read):
  what the others trained meanwhile, and what the paused peer trains right after it resumes, would
  otherwise be read ahead of the swarm and lost. Noting them gives a record nothing it could not
  have had by sitting in the swarm's epoch: an even share of epochs the swarm really passes;
- **how much**: an epoch the swarm passed is settled `settle_s` later (the groups that averaged it
  have reached the coordinator with heartbeats) and credited once (`epoch_rows`): the target batch
  size split evenly among its participants, and only among those that a groupmate of another
  admission root confirms averaged around that epoch (`vouched`), if any participant is so
  confirmed. With one root, or where nobody averaged across roots, every participant shares.

So a stream of fake records earns nothing for epochs the swarm did not reach, nothing without a
session, and at most an even share of the epochs it really sat in - none when the other roots'
peers confirm each other and not it. The ledger keeps the largest row per (identity, epoch), so
settling an epoch again after a restart adds nothing to what an identity already holds.

Limits: with exactly one admission root active, its word sets the swarm's epoch (at most one epoch
per read, `poll_interval_s`, and only while no other root is active); two colluding roots can vouch
for each other, and a peer that no groupmate of another root lists (they kept it out of their
groups) is credited only in epochs where nobody is confirmed; and with one honest root and one
hostile root the two disagree with no one to break the tie: the hostile root can then hold the
swarm's epoch where it sits (credit stops for both) but not take the honest root's share. A peer
paused for longer than `ahead_epochs` epochs, as one of exactly two roots, holds the swarm's epoch
back like that: the other root's epochs beyond that window, and its own first ones after resuming,
are not credited. A part noted ahead is kept only by a session still proven when the swarm's epoch
reaches it (`_reached`), and it is lost with the tally's other open epochs when the coordinator
restarts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from crowdtrain.coordinator.peers.groups import GroupReport, confirmed
from crowdtrain.coordinator.peers.health import HealthSettings, PeerRecord

_NO_ROOT = "\x00"  # a root no reporter has: any other member's account confirms


@dataclass(frozen=True)
class CreditSettings:
    target_batch_size: int  # samples the swarm accepts per epoch: the manifest's swarm.target_batch_size
    heartbeat_interval_s: float  # groups arrive with heartbeats: an epoch settles a few intervals late
    settle_heartbeats: float = 3.0  # raise when peers' groups reach the coordinator later than this
    confirm_epochs: int = 2  # a group reported at epoch g confirms taking part in epochs g-2..g
    # taking part this far ahead of the swarm's epoch is noted (credited once the swarm passes it):
    # what is trained while a paused peer's record holds the swarm's epoch back is kept for pauses up
    # to ahead_epochs epochs long (about an hour of 4 s epochs on `tiny`); raise it for longer pauses
    ahead_epochs: int = 1024

    @property
    def settle_s(self) -> float:
        return self.settle_heartbeats * self.heartbeat_interval_s


@dataclass(frozen=True)
class Sighting:
    """One progress record as the credit sees it: whose, which epoch, whether it holds samples."""

    identity: str
    epoch: int
    has_samples: bool


@dataclass(frozen=True)
class OpenEpoch:
    """An epoch identities were seen taking part in, not credited yet."""

    epoch: int
    participants: Mapping[str, str]  # identity -> admission root
    first_seen_unix_s: float
    passed_unix_s: float | None = None  # when the swarm's epoch first went past it
    # participants seen in it only while it was ahead of the swarm's epoch: they keep their part only
    # if still proven (a live, unbanned session) when the swarm reaches it
    ahead_only: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Tally:
    """The credit's memory between reads: the swarm's epoch and the epochs still open."""

    swarm_epoch: int | None = None
    open_epochs: tuple[OpenEpoch, ...] = field(default_factory=tuple)


def identity_roots(peers: Iterable[PeerRecord], keep=lambda record: True) -> dict[str, str]:
    """identity -> admission root of every proven, unbanned heartbeat session that `keep` accepts;
    an identity with several sessions is under its earliest session's root. A session from before
    admission roots is its own root."""
    earliest: dict[str, tuple[float, str]] = {}
    banned: set[str] = set()
    for r in peers:
        if r.source != "heartbeat" or not r.dht_verified or not r.dht_peer_id:
            continue
        if r.banned:
            banned.add(r.dht_peer_id)
        elif keep(r):
            root = r.admission_root or f"identity:{r.dht_peer_id}"
            earliest[r.dht_peer_id] = min(
                earliest.get(r.dht_peer_id, (r.joined_unix_s, root)), (r.joined_unix_s, root)
            )
    return {who: root for who, (_, root) in earliest.items() if who not in banned}


def live_identity_roots(now: float, peers: Iterable[PeerRecord], health: HealthSettings) -> dict[str, str]:
    """`identity_roots` of the sessions that have not left and were heard within the heartbeat
    timeout: a session that went silent no longer vouches for the records under its identity."""
    return identity_roots(
        peers,
        lambda r: r.left_unix_s is None and now - r.last_seen_unix_s <= health.heartbeat_timeout_s,
    )


def vouched(
    reports: Iterable[GroupReport],
    roots: Mapping[str, str],
    excluded: frozenset[str] = frozenset(),
    across_roots: bool = True,
) -> frozenset[str]:
    """The identities of `roots` (identity -> admission root) that another member of one of
    `reports` lists in a group beside itself (`groups.confirmed`: a peer's own account never counts),
    a member admitted through another root unless `across_roots` is False. Reports by `excluded`
    identities (banned ones) do not count."""
    found: set[str] = set()
    for r in reports:
        if r.reporter in excluded:
            continue
        for member in r.members & roots.keys():
            root = roots[member] if across_roots else _NO_ROOT
            if member not in found and confirmed(r.group_id, member, r.reporter, root, (r,))[0]:
                found.add(member)
    return frozenset(found)


def next_swarm_epoch(previous: int | None, root_epochs: Mapping[str, int]) -> tuple[int | None, str]:
    """The swarm's epoch after a read in which each admission root's identities reached at most
    `root_epochs[root]`, and why. See the module docstring: the second-highest root (the only
    one when alone), roots more than one epoch behind `previous` ignored, each root counted at most
    one epoch past `previous`, and never below `previous` unless every root is behind it (the swarm
    came back from an older checkpoint: then it is found afresh)."""
    if not root_epochs:
        return previous, "no proven identity in the progress records"
    current = dict(root_epochs)
    if previous is not None:
        current = {root: e for root, e in root_epochs.items() if e >= previous - 1}
        if not current:
            fresh, why = next_swarm_epoch(None, root_epochs)
            return fresh, f"every root is behind epoch {previous}: found afresh, {why}"
    counted = sorted(
        (e if previous is None else min(e, previous + 1) for e in current.values()), reverse=True
    )
    if len(counted) == 1:
        epoch, why = counted[0], "the only admission root near the swarm's epoch"
    else:
        epoch, why = counted[1], f"the highest that {len(counted)} admission roots' identities reached"
    if previous is not None and epoch < previous:
        return previous, f"epoch {previous} kept: {why} is {epoch}"
    return epoch, f"epoch {epoch}: {why}"


def advance(
    tally: Tally,
    sightings: Iterable[Sighting],
    roots: Mapping[str, str],
    now: float,
    settings: CreditSettings,
) -> tuple[Tally, list[OpenEpoch], str]:
    """One read: the sightings of proven identities (`roots`) move the swarm's epoch and are noted
    in the open epochs; returns the new tally, the epochs now settled, and the swarm epoch's reason."""
    seen = [s for s in sightings if s.identity in roots]
    root_epochs: dict[str, int] = {}
    for s in seen:
        root = roots[s.identity]
        root_epochs[root] = max(root_epochs.get(root, s.epoch), s.epoch)
    epoch, why = next_swarm_epoch(tally.swarm_epoch, root_epochs)
    if epoch is None:
        return tally, [], why
    kept = tally.open_epochs if tally.swarm_epoch is None or epoch >= tally.swarm_epoch else ()
    by_epoch = {o.epoch: o for o in kept}
    for s in seen:  # ahead of the swarm's epoch: noted, not passed, so not settled until the swarm is there
        if s.has_samples and epoch - 1 <= s.epoch <= epoch + settings.ahead_epochs:
            o = by_epoch.get(s.epoch) or OpenEpoch(s.epoch, {}, now)
            by_epoch[s.epoch] = _noted(o, s.identity, roots[s.identity], ahead=s.epoch > epoch)
    still, settled = [], []
    for o in sorted(by_epoch.values(), key=lambda o: o.epoch):
        if o.ahead_only and epoch >= o.epoch:
            o = _reached(o, roots)
        if o.passed_unix_s is None and epoch > o.epoch:
            o = replace(o, passed_unix_s=now)
        done = o.passed_unix_s is not None and now - o.passed_unix_s >= settings.settle_s
        (settled if done else still).append(o)
    return Tally(epoch, tuple(still)), settled, why


def _noted(o: OpenEpoch, who: str, root: str, ahead: bool) -> OpenEpoch:
    """`o` with `who` (admitted through `root`) taking part; `ahead`: seen while the swarm's epoch
    had not reached `o` yet. A sighting within the swarm's reach makes the part unconditional."""
    if not ahead:
        ahead_only = o.ahead_only - {who}
    elif who in o.participants:
        ahead_only = o.ahead_only
    else:
        ahead_only = o.ahead_only | {who}
    return replace(o, participants={**o.participants, who: root}, ahead_only=ahead_only)


def _reached(o: OpenEpoch, roots: Mapping[str, str]) -> OpenEpoch:
    """`o` as the swarm's epoch reaches it: its participants seen only ahead of the swarm keep their
    part only if still proven now (`roots`), so a part noted ahead is not kept by a session that has
    since left or been banned."""
    gone = o.ahead_only - roots.keys()
    kept = {who: root for who, root in o.participants.items() if who not in gone}
    return replace(o, participants=kept, ahead_only=frozenset())


def epoch_rows(
    settled: OpenEpoch, reports: Iterable[GroupReport], settings: CreditSettings, excluded=frozenset()
) -> tuple[list[tuple[str, int, int]], str]:
    """The ledger rows (identity, epoch, samples) of a settled epoch: the target batch size split
    evenly among the participants a groupmate of another root confirms around it (reports of
    epochs e..e+confirm_epochs), or among all of them when none is so confirmed; and why."""
    e = settled.epoch
    near = [r for r in reports if e <= r.epoch <= e + settings.confirm_epochs]
    confirmed_ids = vouched(near, settled.participants, excluded)
    credited = sorted(confirmed_ids or settled.participants)
    if not credited:
        return [], f"epoch {e}: nobody took part"
    share = settings.target_batch_size // len(credited)
    left_out = len(settled.participants) - len(credited)
    why = f"epoch {e}: {share} samples each to {len(credited)} identities" + (
        f"; {left_out} not confirmed by a groupmate of another admission root" if left_out else ""
    )
    return [(who, e, share) for who in credited if share > 0], why
