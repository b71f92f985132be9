"""Whose state counts when the publisher picks the swarm's state. Pure: no clock, no network.

DHT identities cost nothing: anyone can start ten and declare the highest donor priority. So the
publisher asks only *voters* and counts one vote per voter. A voter is a DHT identity that

- a coordinator session proved it holds (`dht_verified`: it signed the Join challenge with the
  identity's key), not banned (no session of that identity is), not left, online, training;
- is in the swarm's signed progress records lately (`seen_within_s`): it takes part in training;
- is long-standing: its first proven session joined at least `min_age_s` ago;
- is not quarantined by the evidence book (`evidence.EvidenceBook.quarantined`);
- when the candidates come from several admission roots, is one that a groupmate of another root
  confirms in a recent all-reduce group (`credit.vouched`), the proof credit asks for: a hostile
  identity that writes records but never averages with the others does not vote. Where nobody is
  so confirmed (one root, or nobody averaged across roots), every candidate votes as before:
  voters are needed to publish at all, and a hostile root cannot turn that rule against the
  honest, since it cannot undo their confirmations of each other.

Several sessions of one identity are one voter. Donors come from the swarm's signed progress
records (`<run_id>_progress`), never from the unsigned `<prefix>.all_averagers` dictionary where
anyone can hide other donors or list itself first; a record only names a candidate, the state
itself is downloaded from that peer id over its authenticated libp2p connection.

The peer id inside a progress record is its writer's claim (hivemind signs each record with a
per-process RSA key, not the libp2p key), so a record claiming a voter's id may be forged: when
several claim one id, the lowest epoch is kept (a forged claim can then only make the publisher
wait, never raise the epoch it accepts).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from crowdtrain.coordinator.peers.credit import identity_roots, vouched
from crowdtrain.coordinator.peers.groups import GroupReport
from crowdtrain.coordinator.peers.health import HealthSettings, PeerRecord, is_online


@dataclass(frozen=True)
class VoterSettings:
    health: HealthSettings  # what "online" means (heartbeat interval and timeout)
    min_age_s: float = 120.0  # an identity votes once its first proven session is this old
    seen_within_s: float = 45.0  # and its signed progress record was read this recently
    # and a groupmate of another admission root reported averaging with it this recently (several
    # roots only); raise it for runs whose epochs are longer than this
    confirmed_within_s: float = 600.0


def voter_status(now: float, record: PeerRecord, settings: VoterSettings) -> tuple[bool, str]:
    """Whether this one session may vote for its identity now (its age is judged over all the
    identity's sessions by `eligible_voters`), and why."""
    if not record.dht_peer_id or not record.dht_verified:
        return False, "its DHT identity is not proven"
    if record.banned:
        return False, "banned"
    if record.source != "heartbeat":
        return False, "known only from the DHT (the peer id in a progress record is a claim)"
    if not is_online(now, record, settings.health):
        return False, "not online and training"
    seen = record.dht_last_seen_unix_s
    if seen is None or now - seen > settings.seen_within_s:
        return False, f"not in the swarm's signed progress records within {settings.seen_within_s:.0f}s"
    return True, "proven identity, online, in the signed progress records"


def eligible_voters(
    now: float,
    peers: Iterable[PeerRecord],
    settings: VoterSettings,
    groups: Iterable[GroupReport] = (),
    quarantined: frozenset[str] = frozenset(),
) -> tuple[frozenset[str], str]:
    """The DHT identities whose state counts, and a summary of who was left out and why. `groups`:
    recent all-reduce groups peers reported (`groups.GroupBook.since`); `quarantined`: identities
    the evidence book quarantined (`evidence.EvidenceBook.quarantined`)."""
    peers = list(peers)
    since: dict[str, float] = {}  # identity -> when its first proven session joined
    banned: set[str] = set()
    active: set[str] = set()
    skipped: dict[str, int] = {}
    for record in peers:
        if record.dht_verified and record.dht_peer_id:
            who = record.dht_peer_id
            since[who] = min(since.get(who, record.joined_unix_s), record.joined_unix_s)
            if record.banned:
                banned.add(who)
        ok, why = voter_status(now, record, settings)
        if ok:
            active.add(record.dht_peer_id)
        elif record.left_unix_s is None:
            skipped[why] = skipped.get(why, 0) + 1
    young = {who for who in active if now - since[who] < settings.min_age_s}
    candidates = active - banned - young - quarantined
    unconfirmed = unconfirmed_voters(now, peers, candidates, groups, settings, frozenset(banned))
    voters = frozenset(candidates - unconfirmed)
    parts = [f"{len(voters)} voter(s)"]
    if banned & active:
        parts.append(f"{len(banned & active)} banned")
    if (quarantined & active) - banned:
        parts.append(f"{len((quarantined & active) - banned)} quarantined")
    if young - banned:
        parts.append(f"{len(young - banned)} joined less than {settings.min_age_s:.0f}s ago")
    if unconfirmed:
        parts.append(
            f"{len(unconfirmed)} not confirmed by a groupmate of another admission root "
            f"within {settings.confirmed_within_s:.0f}s"
        )
    parts += [f"{n} session(s): {why}" for why, n in sorted(skipped.items())]
    return voters, "; ".join(parts)


def unconfirmed_voters(
    now: float,
    peers: list[PeerRecord],
    candidates: set[str],
    groups: Iterable[GroupReport],
    settings: VoterSettings,
    banned: frozenset[str],
) -> set[str]:
    """The candidates left out for want of a groupmate of another admission root (module docstring):
    none when the candidates share one root or when none of them is confirmed."""
    roots = {who: root for who, root in identity_roots(peers).items() if who in candidates}
    if len(set(roots.values())) < 2:
        return set()
    recent = [g for g in groups if now - g.t <= settings.confirmed_within_s]
    confirmed_ids = vouched(recent, roots, banned)
    return candidates - confirmed_ids if confirmed_ids else set()


def voter_epochs(claims: Iterable[tuple[str, int, bool]], voters: frozenset[str]) -> dict[str, int]:
    """Each voter's epoch from the signed progress records' claims (peer id, epoch, client_mode):
    the lowest when several records claim one id (see the module docstring)."""
    epochs: dict[str, int] = {}
    for peer, epoch, _client_mode in claims:
        if peer in voters:
            epochs[peer] = min(epochs.get(peer, epoch), epoch)
    return epochs


def candidate_donors(
    claims: Iterable[tuple[str, int, bool]], voters: frozenset[str], salt: str = ""
) -> list[str]:
    """Voters whose progress records say they can serve state (not client mode: unreachable), the
    most up to date first. An epoch claimed beyond the median voter's + 1 earns no precedence (a
    claim is cheap), and ties are broken by a hash of the peer id with `salt` (the publisher passes
    the round), so no one can grind an id that is always asked first."""
    claims = list(claims)
    epochs = voter_epochs(claims, voters)
    reachable = {peer for peer, _, client_mode in claims if peer in epochs and not client_mode}
    if not reachable:
        return []
    ordered = sorted(epochs.values())
    ceiling = ordered[(len(ordered) - 1) // 2] + 1

    def key(peer: str):
        return (-min(epochs[peer], ceiling), hashlib.sha256(f"{salt}/{peer}".encode()).hexdigest())

    return sorted(reachable, key=key)


def epoch_bound(donor: str, epoch: int, epochs: Mapping[str, int]) -> tuple[bool, str]:
    """Whether a donor's state `epoch` is believable: at most one past (a step in flight) the
    swarm's epoch as the *other* voters' signed records show it (the donor's own record is its own
    claim), or past its own record when it is the only voter."""
    others = [e for peer, e in epochs.items() if peer != donor]
    if others:
        bound, source = max(others) + 1, f"the other voters' progress records reach epoch {max(others)}"
    elif donor in epochs:
        bound, source = epochs[donor] + 1, f"its own progress record says epoch {epochs[donor]}"
    else:
        return False, f"epoch {epoch}: no voter's progress record to check it against"
    if epoch <= bound:
        return True, f"epoch {epoch} within {bound} ({source})"
    return False, f"claims epoch {epoch}, beyond {bound}: {source}"
