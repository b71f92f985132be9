from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("name", "version", "device", "invite_code", "dht_public_key", "resume_shard", "resume_position", "resume_pass", "resume_run_id", "join_signature", "join_unix_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    INVITE_CODE_FIELD_NUMBER: _ClassVar[int]
    DHT_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    RESUME_SHARD_FIELD_NUMBER: _ClassVar[int]
    RESUME_POSITION_FIELD_NUMBER: _ClassVar[int]
    RESUME_PASS_FIELD_NUMBER: _ClassVar[int]
    RESUME_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    JOIN_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    JOIN_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    device: str
    invite_code: str
    dht_public_key: bytes
    resume_shard: int
    resume_position: int
    resume_pass: int
    resume_run_id: str
    join_signature: bytes
    join_unix_s: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., device: _Optional[str] = ..., invite_code: _Optional[str] = ..., dht_public_key: _Optional[bytes] = ..., resume_shard: _Optional[int] = ..., resume_position: _Optional[int] = ..., resume_pass: _Optional[int] = ..., resume_run_id: _Optional[str] = ..., join_signature: _Optional[bytes] = ..., join_unix_s: _Optional[int] = ...) -> None: ...

class PeerSettings(_message.Message):
    __slots__ = ("heartbeat_interval_s", "shard_index", "http_base_url", "resume_from_step", "shard_position", "shard_pass")
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    HTTP_BASE_URL_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    SHARD_POSITION_FIELD_NUMBER: _ClassVar[int]
    SHARD_PASS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    shard_index: int
    http_base_url: str
    resume_from_step: int
    shard_position: int
    shard_pass: int
    def __init__(self, heartbeat_interval_s: _Optional[float] = ..., shard_index: _Optional[int] = ..., http_base_url: _Optional[str] = ..., resume_from_step: _Optional[int] = ..., shard_position: _Optional[int] = ..., shard_pass: _Optional[int] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("session_id", "manifest_json", "manifest_sha256", "tokenizer_json", "initial_peers", "settings", "session_token", "peer_id", "dht_challenge", "manifest_signature", "admission")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    INITIAL_PEERS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    DHT_CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    manifest_json: str
    manifest_sha256: str
    tokenizer_json: str
    initial_peers: _containers.RepeatedScalarFieldContainer[str]
    settings: PeerSettings
    session_token: str
    peer_id: str
    dht_challenge: bytes
    manifest_signature: str
    admission: str
    def __init__(self, session_id: _Optional[str] = ..., manifest_json: _Optional[str] = ..., manifest_sha256: _Optional[str] = ..., tokenizer_json: _Optional[str] = ..., initial_peers: _Optional[_Iterable[str]] = ..., settings: _Optional[_Union[PeerSettings, _Mapping]] = ..., session_token: _Optional[str] = ..., peer_id: _Optional[str] = ..., dht_challenge: _Optional[bytes] = ..., manifest_signature: _Optional[str] = ..., admission: _Optional[str] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("offender", "kind", "detail", "epoch", "group_id")
    OFFENDER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    offender: str
    kind: str
    detail: str
    epoch: int
    group_id: bytes
    def __init__(self, offender: _Optional[str] = ..., kind: _Optional[str] = ..., detail: _Optional[str] = ..., epoch: _Optional[int] = ..., group_id: _Optional[bytes] = ...) -> None: ...

class AveragingGroup(_message.Message):
    __slots__ = ("group_id", "epoch", "members")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    group_id: bytes
    epoch: int
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, group_id: _Optional[bytes] = ..., epoch: _Optional[int] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session_id", "session_token", "dht_public_key", "dht_signature", "dht_peer_id", "name", "version", "device", "samples_per_s", "local_epoch", "loss", "uptime_s", "samples_total", "swarm_size", "phase", "rejections", "pause_reason", "client_mode", "shard_index", "shard_position", "shard_sequences", "shard_pass", "groups")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DHT_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    DHT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    DHT_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_S_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SWARM_SIZE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    PAUSE_REASON_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MODE_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_POSITION_FIELD_NUMBER: _ClassVar[int]
    SHARD_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    SHARD_PASS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    session_token: str
    dht_public_key: bytes
    dht_signature: bytes
    dht_peer_id: str
    name: str
    version: str
    device: str
    samples_per_s: float
    local_epoch: int
    loss: float
    uptime_s: float
    samples_total: int
    swarm_size: int
    phase: str
    rejections: _containers.RepeatedCompositeFieldContainer[Rejection]
    pause_reason: str
    client_mode: bool
    shard_index: int
    shard_position: int
    shard_sequences: int
    shard_pass: int
    groups: _containers.RepeatedCompositeFieldContainer[AveragingGroup]
    def __init__(self, session_id: _Optional[str] = ..., session_token: _Optional[str] = ..., dht_public_key: _Optional[bytes] = ..., dht_signature: _Optional[bytes] = ..., dht_peer_id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., device: _Optional[str] = ..., samples_per_s: _Optional[float] = ..., local_epoch: _Optional[int] = ..., loss: _Optional[float] = ..., uptime_s: _Optional[float] = ..., samples_total: _Optional[int] = ..., swarm_size: _Optional[int] = ..., phase: _Optional[str] = ..., rejections: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ..., pause_reason: _Optional[str] = ..., client_mode: _Optional[bool] = ..., shard_index: _Optional[int] = ..., shard_position: _Optional[int] = ..., shard_sequences: _Optional[int] = ..., shard_pass: _Optional[int] = ..., groups: _Optional[_Iterable[_Union[AveragingGroup, _Mapping]]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("heartbeat_interval_s", "dht_verified", "swarm_token", "accepted_samples", "share", "rank", "ranked_peers", "next_shard", "next_shard_position", "next_shard_pass")
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    DHT_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    SWARM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    RANKED_PEERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_SHARD_FIELD_NUMBER: _ClassVar[int]
    NEXT_SHARD_POSITION_FIELD_NUMBER: _ClassVar[int]
    NEXT_SHARD_PASS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    dht_verified: bool
    swarm_token: str
    accepted_samples: int
    share: float
    rank: int
    ranked_peers: int
    next_shard: int
    next_shard_position: int
    next_shard_pass: int
    def __init__(self, heartbeat_interval_s: _Optional[float] = ..., dht_verified: _Optional[bool] = ..., swarm_token: _Optional[str] = ..., accepted_samples: _Optional[int] = ..., share: _Optional[float] = ..., rank: _Optional[int] = ..., ranked_peers: _Optional[int] = ..., next_shard: _Optional[int] = ..., next_shard_position: _Optional[int] = ..., next_shard_pass: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("session_id", "reason", "session_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    reason: str
    session_token: str
    def __init__(self, session_id: _Optional[str] = ..., reason: _Optional[str] = ..., session_token: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointFile(_message.Message):
    __slots__ = ("name", "sha256", "size_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    size_bytes: int
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("step", "created_unix_s", "eval_loss", "samples_seen", "files", "url")
    STEP_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_SEEN_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    step: int
    created_unix_s: float
    eval_loss: float
    samples_seen: int
    files: _containers.RepeatedCompositeFieldContainer[CheckpointFile]
    url: str
    def __init__(self, step: _Optional[int] = ..., created_unix_s: _Optional[float] = ..., eval_loss: _Optional[float] = ..., samples_seen: _Optional[int] = ..., files: _Optional[_Iterable[_Union[CheckpointFile, _Mapping]]] = ..., url: _Optional[str] = ...) -> None: ...

class DownloadCheckpointFileRequest(_message.Message):
    __slots__ = ("step", "name", "offset")
    STEP_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    step: int
    name: str
    offset: int
    def __init__(self, step: _Optional[int] = ..., name: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("data", "offset", "size_bytes", "step")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    size_bytes: int
    step: int
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., size_bytes: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints", "http_base_url", "signing_public_key")
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    HTTP_BASE_URL_FIELD_NUMBER: _ClassVar[int]
    SIGNING_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[CheckpointInfo]
    http_base_url: str
    signing_public_key: str
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[CheckpointInfo, _Mapping]]] = ..., http_base_url: _Optional[str] = ..., signing_public_key: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerStatus(_message.Message):
    __slots__ = ("peer_id", "name", "state", "reason", "device", "samples_per_s", "local_epoch", "contributed_samples", "last_seen_unix_s", "contributing", "dht_peer_id", "loss", "computed_samples", "uptime_s", "swarm_size", "dht_verified", "rejections_against", "version", "client_mode", "reachability", "shard_index", "pause_reason", "shard_position")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_S_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCH_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTING_FIELD_NUMBER: _ClassVar[int]
    DHT_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    SWARM_SIZE_FIELD_NUMBER: _ClassVar[int]
    DHT_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_AGAINST_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_MODE_FIELD_NUMBER: _ClassVar[int]
    REACHABILITY_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    PAUSE_REASON_FIELD_NUMBER: _ClassVar[int]
    SHARD_POSITION_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    name: str
    state: str
    reason: str
    device: str
    samples_per_s: float
    local_epoch: int
    contributed_samples: int
    last_seen_unix_s: float
    contributing: bool
    dht_peer_id: str
    loss: float
    computed_samples: int
    uptime_s: float
    swarm_size: int
    dht_verified: bool
    rejections_against: int
    version: str
    client_mode: bool
    reachability: str
    shard_index: int
    pause_reason: str
    shard_position: int
    def __init__(self, peer_id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., device: _Optional[str] = ..., samples_per_s: _Optional[float] = ..., local_epoch: _Optional[int] = ..., contributed_samples: _Optional[int] = ..., last_seen_unix_s: _Optional[float] = ..., contributing: _Optional[bool] = ..., dht_peer_id: _Optional[str] = ..., loss: _Optional[float] = ..., computed_samples: _Optional[int] = ..., uptime_s: _Optional[float] = ..., swarm_size: _Optional[int] = ..., dht_verified: _Optional[bool] = ..., rejections_against: _Optional[int] = ..., version: _Optional[str] = ..., client_mode: _Optional[bool] = ..., reachability: _Optional[str] = ..., shard_index: _Optional[int] = ..., pause_reason: _Optional[str] = ..., shard_position: _Optional[int] = ...) -> None: ...

class SwarmSummary(_message.Message):
    __slots__ = ("global_epoch", "samples_per_s", "latest_eval_loss", "latest_checkpoint_step", "peers_by_state", "total_contributed_samples", "run_id", "last_rejection", "peers_not_listed", "dataset_sequences_read", "dataset_sequences", "dataset_shards", "dataset_shards_sized")
    class PeersByStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    GLOBAL_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_S_FIELD_NUMBER: _ClassVar[int]
    LATEST_EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    LATEST_CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    PEERS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CONTRIBUTED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_REJECTION_FIELD_NUMBER: _ClassVar[int]
    PEERS_NOT_LISTED_FIELD_NUMBER: _ClassVar[int]
    DATASET_SEQUENCES_READ_FIELD_NUMBER: _ClassVar[int]
    DATASET_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    DATASET_SHARDS_FIELD_NUMBER: _ClassVar[int]
    DATASET_SHARDS_SIZED_FIELD_NUMBER: _ClassVar[int]
    global_epoch: int
    samples_per_s: float
    latest_eval_loss: float
    latest_checkpoint_step: int
    peers_by_state: _containers.ScalarMap[str, int]
    total_contributed_samples: int
    run_id: str
    last_rejection: str
    peers_not_listed: int
    dataset_sequences_read: int
    dataset_sequences: int
    dataset_shards: int
    dataset_shards_sized: int
    def __init__(self, global_epoch: _Optional[int] = ..., samples_per_s: _Optional[float] = ..., latest_eval_loss: _Optional[float] = ..., latest_checkpoint_step: _Optional[int] = ..., peers_by_state: _Optional[_Mapping[str, int]] = ..., total_contributed_samples: _Optional[int] = ..., run_id: _Optional[str] = ..., last_rejection: _Optional[str] = ..., peers_not_listed: _Optional[int] = ..., dataset_sequences_read: _Optional[int] = ..., dataset_sequences: _Optional[int] = ..., dataset_shards: _Optional[int] = ..., dataset_shards_sized: _Optional[int] = ...) -> None: ...

class ReachabilityRequest(_message.Message):
    __slots__ = ("session_id", "session_token", "maddrs")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MADDRS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    session_token: str
    maddrs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., session_token: _Optional[str] = ..., maddrs: _Optional[_Iterable[str]] = ...) -> None: ...

class ReachabilityResponse(_message.Message):
    __slots__ = ("reachable", "seen_host", "dialed", "advice")
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    SEEN_HOST_FIELD_NUMBER: _ClassVar[int]
    DIALED_FIELD_NUMBER: _ClassVar[int]
    ADVICE_FIELD_NUMBER: _ClassVar[int]
    reachable: bool
    seen_host: str
    dialed: str
    advice: str
    def __init__(self, reachable: _Optional[bool] = ..., seen_host: _Optional[str] = ..., dialed: _Optional[str] = ..., advice: _Optional[str] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("summary", "peers")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    summary: SwarmSummary
    peers: _containers.RepeatedCompositeFieldContainer[PeerStatus]
    def __init__(self, summary: _Optional[_Union[SwarmSummary, _Mapping]] = ..., peers: _Optional[_Iterable[_Union[PeerStatus, _Mapping]]] = ...) -> None: ...
