"""Every field a request may carry, with its limit: one table for gRPC and HTTP alike.

Strangers call the coordinator, so nothing a request says is kept unless it fits here: text has a
length and a charset (identifiers) or is display text (normalised: `clean_display`, in
peer/display.py), a phase is one of an enum, a number lies in a plausible range. A request outside
its limits is refused with `InvalidRequestError` (gRPC INVALID_ARGUMENT) naming the field and the
limit; display text is cut to its length instead, since a long name harms no one once cut. Pure:
no I/O, no clock.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from crowdtrain.coordinator.errors import InvalidRequestError
from crowdtrain.peer.display import clean_display


@dataclass(frozen=True)
class Limit:
    """The limit of one request field. `kind`: "display" (cleaned and cut), "id" (must match
    `pattern` in full; empty allowed unless `required`), "enum" (one of `choices`), "int", "float"
    (within [low, high]; NaN means "unknown" and becomes `nan_as`), "bytes" (at most `max_len`),
    "messages" (at most `max_len` nested messages, each checked), "list"/"ids" (at most `max_len`
    multiaddrs / base58 peer ids)."""

    kind: str
    max_len: int = 0
    pattern: str = ""
    choices: tuple[str, ...] = ()
    low: float = 0
    high: float = 0
    nan_as: float = 0.0
    out_of_range_unknown: bool = False  # a value outside [low, high] becomes `nan_as` instead of refused
    required: bool = False
    what: str = ""  # the charset in words, for the error message


BASE58 = "[1-9A-HJ-NP-Za-km-z]"
SESSION_ID = Limit("id", 32, "[0-9a-f]{32}", required=True, what="32 lowercase hex digits")
SESSION_TOKEN = Limit("id", 64, "[A-Za-z0-9_-]{32,64}", what="32-64 URL-safe base64 characters")
PHASES = ("joining", "loading_state", "training", "paused")
MAX_EPOCH = 2**40  # 10^12 epochs: no real swarm comes near; far from int64's end
MAX_SAMPLES = 2**50  # a peer's own sample count; far from int64's end even summed over 2^13 peers
MAX_SAMPLES_PER_S = 1e6  # one peer; a tiny model on the fastest accelerator does ~10^4
MAX_UPTIME_S = 10 * 365 * 86400.0
MAX_SHARDS = 2**20  # a run's data shards (presets use 8-64)
MAX_SHARD_SEQUENCES = 2**40  # sequences in one shard
MAX_SHARD_PASSES = 2**20
MAX_MADDRS = 16  # multiaddrs one reachability request may list (the first 8 are dialed)
# a libp2p multiaddr as hivemind prints it: /ip4/1.2.3.4/tcp/40000/p2p/Qm...
MADDR = Limit(
    "id", 200, r"/[A-Za-z0-9./_:%-]{1,199}", required=True, what="a multiaddr such as /ip4/1.2.3.4/tcp/4001"
)
SHARD_INDEX = Limit("int", low=0, high=MAX_SHARDS - 1)
SHARD_POSITION = Limit("int", low=0, high=MAX_SHARD_SEQUENCES)
SHARD_PASS = Limit("int", low=0, high=MAX_SHARD_PASSES)
FLAG = Limit("int", low=0, high=1)
MAX_REJECTIONS_PER_HEARTBEAT = 32  # evidence a peer sends per heartbeat (it sends one every few seconds)
MAX_GROUPS_PER_HEARTBEAT = 16  # averaging groups a peer reports per heartbeat (one per round at most)
MAX_GROUP_MEMBERS = 64  # hivemind's target group sizes are 4-16
GROUP_ID = Limit("bytes", 64)  # hivemind's group ids are 20-32 random bytes
# a base58 libp2p peer id: an RSA key's sha2-256 multihash is 46 characters, identity ones ~50
PEER_ID = Limit("id", 64, f"{BASE58}{{20,64}}", required=True, what="a base58 hivemind peer id")

REQUEST_LIMITS: dict[str, dict[str, Limit]] = {
    "JoinRequest": {
        "name": Limit("display", 64),
        "version": Limit("display", 32),
        "device": Limit("display", 64),
        # secrets.token_urlsafe(24) of `crowdtrain invite create`: 32 characters
        "invite_code": Limit("id", 64, "[A-Za-z0-9_-]{16,64}", what="16-64 URL-safe base64 characters"),
        "dht_public_key": Limit("bytes", 1024),  # an RSA-2048 libp2p key is ~300 bytes
        "resume_shard": SHARD_INDEX,  # where its last session stopped reading (see `shardbook`)
        "resume_position": SHARD_POSITION,
        "resume_pass": SHARD_PASS,
        "resume_run_id": Limit("id", 64, "[A-Za-z0-9_.-]{1,64}", what="a run id"),
        "join_signature": Limit("bytes", 1024),  # RSA-4096: 512 bytes
        "join_unix_s": Limit("int", low=0, high=2**40),
    },
    "Rejection": {
        "offender": PEER_ID,
        "kind": Limit("id", 32, "[a-z0-9_]{1,32}", required=True, what="1-32 of a-z, 0-9 and _"),
        "detail": Limit("display", 200),
        "epoch": Limit("int", low=0, high=MAX_EPOCH - 1),
        "group_id": GROUP_ID,
    },
    "AveragingGroup": {
        "group_id": GROUP_ID,
        "epoch": Limit("int", low=0, high=MAX_EPOCH - 1),
        "members": Limit("ids", MAX_GROUP_MEMBERS, what="base58 hivemind peer ids"),
    },
    "HeartbeatRequest": {
        "session_id": SESSION_ID,
        "session_token": SESSION_TOKEN,
        "dht_public_key": Limit("bytes", 1024),  # an RSA-2048 libp2p key is ~300 bytes
        "dht_signature": Limit("bytes", 1024),  # RSA-2048: 256 bytes
        # "" until its DHT runs; a base58 hivemind peer id has ~46-52 characters
        "dht_peer_id": Limit("id", 128, f"{BASE58}{{1,128}}", what="base58 (a hivemind peer id)"),
        "phase": Limit("enum", choices=("", *PHASES)),  # "": unchanged
        "name": Limit("display", 64),
        "version": Limit("display", 32),
        "device": Limit("display", 64),
        "samples_per_s": Limit("float", low=0, high=MAX_SAMPLES_PER_S),
        "local_epoch": Limit("int", low=0, high=MAX_EPOCH - 1),
        "loss": Limit("float", low=0, high=1e6, nan_as=math.nan, out_of_range_unknown=True),
        "uptime_s": Limit("float", low=0, high=MAX_UPTIME_S),
        "samples_total": Limit("int", low=0, high=MAX_SAMPLES),
        "swarm_size": Limit("int", low=0, high=100_000),
        "rejections": Limit("messages", MAX_REJECTIONS_PER_HEARTBEAT, "Rejection"),
        "pause_reason": Limit("display", 120),
        "client_mode": FLAG,
        "shard_index": SHARD_INDEX,  # claims: kept only for the shard the coordinator leased to it
        "shard_position": SHARD_POSITION,
        "shard_sequences": SHARD_POSITION,
        "shard_pass": SHARD_PASS,
        "groups": Limit("messages", MAX_GROUPS_PER_HEARTBEAT, "AveragingGroup"),
    },
    "ReachabilityRequest": {
        "session_id": SESSION_ID,
        "session_token": SESSION_TOKEN,
        "maddrs": Limit("list", MAX_MADDRS, "", what="multiaddrs"),
    },
    "LeaveRequest": {
        "session_id": SESSION_ID,
        "session_token": SESSION_TOKEN,
        "reason": Limit("display", 200),
    },
    "DownloadCheckpointFileRequest": {
        "step": Limit("int", low=0, high=MAX_EPOCH - 1),
        # which names exist is archive.lookup_file's to say (NOT_FOUND); here only the length
        "name": Limit("id", 128, r"[^\x00-\x1f]{1,128}", what="a file name without control characters"),
        "offset": Limit("int", low=0, high=2**50),
    },
    "GetStatusRequest": {},
    "ListCheckpointsRequest": {},
}


def check_value(message: str, field: str, value, limit: Limit):
    """The value as the coordinator keeps it, or InvalidRequestError naming the field and its limit."""
    where = f"{field} ({message})"
    if limit.kind == "display":
        return clean_display(value, limit.max_len)
    if limit.kind == "messages":
        if len(value) > limit.max_len:
            raise InvalidRequestError(
                f"{where} has {len(value)} entries, more than the {limit.max_len} allowed per request; "
                "send the rest with the next one"
            )
        checked = []
        for i, item in enumerate(value):
            try:
                checked.append(check_request(item))
            except InvalidRequestError as e:
                raise InvalidRequestError(f"{field}[{i}]: {e}") from None
        return checked
    if limit.kind in ("list", "ids"):  # of multiaddrs or of peer ids: each one checked like an id
        if len(value) > limit.max_len:
            raise InvalidRequestError(
                f"{where} has {len(value)} entries, more than the {limit.max_len} allowed"
            )
        item_limit = MADDR if limit.kind == "list" else PEER_ID
        return [check_value(message, f"{field}[{i}]", item, item_limit) for i, item in enumerate(value)]
    if limit.kind == "bytes":
        if len(value) > limit.max_len:
            raise InvalidRequestError(
                f"{where} has {len(value)} bytes, more than the {limit.max_len} allowed"
            )
        return value
    if limit.kind == "enum":
        if value not in limit.choices:
            shown = clean_display(value, 40)
            raise InvalidRequestError(
                f"{where} is {shown!r}; it must be one of {', '.join(filter(None, limit.choices))}"
            )
        return value
    if limit.kind == "id":
        if not value and not limit.required:
            return value
        if len(value) > limit.max_len:
            raise InvalidRequestError(
                f"{where} has {len(value)} characters, more than the {limit.max_len} the coordinator accepts; "
                "send the value crowdtrain gave you (is this client modified or from another version?)"
            )
        if not re.fullmatch(limit.pattern, value, flags=re.ASCII):
            raise InvalidRequestError(
                f"{where} must be {limit.what or limit.pattern}; got {clean_display(value, 40)!r}"
            )
        return value
    if isinstance(value, float) and math.isnan(value):
        return limit.nan_as
    if not limit.low <= value <= limit.high:  # +-inf too
        if limit.out_of_range_unknown:
            return limit.nan_as
        raise InvalidRequestError(f"{where} is {value!r}, outside the range {limit.low:g}..{limit.high:g}")
    return value


def check_request(request) -> dict[str, object]:
    """Every limited field of a protobuf request, checked (see `check_value`), by name."""
    message = type(request).DESCRIPTOR.name
    limits = REQUEST_LIMITS[message]
    return {
        field: check_value(message, field, getattr(request, field), limit) for field, limit in limits.items()
    }
