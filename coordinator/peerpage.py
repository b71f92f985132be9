"""One peer's page: what a volunteer bookmarks to see "am I contributing?" (`/peer/<id>`).

A peer is found by its public id (the short one every view shows, new for every session) or by
its hivemind peer id (the same across restarts with `crowdtrain peer --identity`, so that is the
bookmark that lasts). Pure: built from the status snapshot's peer views and the ledger, once per
view refresh, in the status pool, as `{key: JSON bytes}`; a request only looks a key up.

    index = peer_index(status_json["peers"], store.contribution_totals())
    index["3fa9c01b22de"]   # b'{"peer": {...}, "sessions": [...], "standing": {...}}'
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

from crowdtrain.coordinator.standings import rank_totals

# a public peer id (12 hex digits) or a base58 hivemind peer id: nothing else is ever looked up
PEER_KEY = re.compile(r"[0-9a-f]{12}|[1-9A-HJ-NP-Za-km-z]{20,64}", flags=re.ASCII)
MAX_SESSIONS = 20  # sessions listed on one identity's page, newest first


def _standing(view: dict, ranks: dict, total: int, ranked: int) -> dict:
    credited = view.get("dht_verified") or view.get("source") == "dht"
    samples, rank = ranks.get(view.get("dht_peer_id"), (0, 0)) if credited else (0, 0)
    return {
        "accepted_samples": samples,
        "share": samples / total if total else 0.0,
        "rank": rank,
        "ranked_peers": ranked,
        "credited": bool(credited),
    }


def peer_index(peers: list[dict], contribution_totals: dict[str, int]) -> dict[str, bytes]:
    ranks, total, ranked = rank_totals(contribution_totals)
    by_identity: dict[str, list[dict]] = defaultdict(list)
    for view in peers:
        if view.get("dht_peer_id") and (view.get("dht_verified") or view.get("source") == "dht"):
            by_identity[view["dht_peer_id"]].append(view)  # only proven identities group sessions
    index: dict[str, bytes] = {}
    for view in peers:
        page = {"peer": view, "sessions": [view], "standing": _standing(view, ranks, total, ranked)}
        index[view["peer_id"]] = json.dumps(page).encode()
    for identity, views in by_identity.items():
        views.sort(key=lambda v: -v["last_seen_unix_s"])
        latest = views[0]
        page = {
            "peer": latest,
            "sessions": views[:MAX_SESSIONS],
            "standing": _standing(latest, ranks, total, ranked),
        }
        index[identity] = json.dumps(page).encode()
    return index
