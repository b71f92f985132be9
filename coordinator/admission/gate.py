"""Who may join the run, and the swarm tokens that carry that decision into the swarm itself.

The operator chooses `--admission`: `open` (anyone), `invite` (a code from `crowdtrain invite
create`, see `invites`), or `allowlist` (the hivemind peer ids listed in `--allowlist-path`, one per
line, `#` comments; the file is re-read when it changes). A joiner in allowlist mode names its
hivemind public key at Join (`JoinRequest.dht_public_key`); in every mode the joiner names its key
and signs the Join with it (`identity.verify_join`), and that key is the only one its session may
ever prove: a session never switches identity, and an invite use binds the identity that spent it.

Once a session has proven its DHT identity (the heartbeat's proof, `identity.verify_dht_claim`)
and is admitted and not banned, its heartbeat response carries a `SwarmToken` (peer/admission/tokens.py)
for that identity, signed by the run's key and valid for `swarm_token_ttl_s`; it is renewed when
less than half its lifetime is left. Banned, revoked or unlisted peers get no new token, so they
drop out of honest peers' swarm within one token lifetime. `admit_join` and `token_decision` are
pure; `Gate` holds the state (allowlist file, invites, tokens issued) for the servicer, and
`servicer_admission` builds it, with the evidence book, from the operator's settings.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from crowdtrain.coordinator.admission.bans import AutobanSettings, EvidenceBook
from crowdtrain.coordinator.admission.invites import InviteBook
from crowdtrain.coordinator.admission.signatures import KEY_RSA, parse_public_key, verify_join
from crowdtrain.coordinator.errors import BannedError, InvalidRequestError
from crowdtrain.coordinator.limits import PEER_ID
from crowdtrain.coordinator.peers.health import PeerRecord
from crowdtrain.peer.admission.tokens import ADMISSION_MODES, SwarmToken, needs_renewal, sign_token
from crowdtrain.peer.errors import CrowdtrainError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

logger = logging.getLogger(__name__)


class AdmissionConfigError(CrowdtrainError):
    """The admission settings cannot work (an unknown mode, a missing allowlist file)."""


class NotAdmittedError(BannedError):
    """The run's admission refuses this peer (no valid invite, not on the allowlist, a revoked
    invite); PERMISSION_DENIED like a ban: the peer stops and the message says what to do."""


@dataclass(frozen=True)
class AdmissionSettings:
    mode: str = "open"  # one of peer.admission.ADMISSION_MODES
    allowlist_path: str = ""  # base58 hivemind peer ids, one per line (allowlist mode)
    swarm_token_ttl_s: float = 600.0  # a ban or revocation reaches the swarm within this
    max_join_skew_s: float = 300.0  # a Join signed further from the coordinator's clock is refused

    def __post_init__(self):
        if self.mode not in ADMISSION_MODES:
            raise AdmissionConfigError(
                f"--admission {self.mode!r} is not one of {', '.join(ADMISSION_MODES)}"
            )
        if self.mode == "allowlist" and not self.allowlist_path:
            raise AdmissionConfigError(
                "--admission allowlist needs --allowlist-path FILE (peer ids, one per line)"
            )
        if not 10 <= self.swarm_token_ttl_s <= 86400:
            raise AdmissionConfigError(
                f"--swarm-token-ttl-s {self.swarm_token_ttl_s} is outside 10..86400 (a ban reaches the swarm "
                "within one token lifetime; peers renew at half of it)"
            )


def parse_allowlist(text: str) -> tuple[frozenset[str], list[str]]:
    """(peer ids, problems): one base58 peer id per line; `#` starts a comment; blank lines skipped."""
    ids, problems = set(), []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if re.fullmatch(PEER_ID.pattern, entry, flags=re.ASCII):
            ids.add(entry)
        else:
            problems.append(f"line {number}: {entry[:60]!r} is not a base58 hivemind peer id; skipped")
    return frozenset(ids), problems


class Allowlist:
    """The allowlist file, re-read whenever its modification time or size changes."""

    def __init__(self, path: Path):
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._ids: frozenset[str] = frozenset()
        if not self.path.is_file():
            raise AdmissionConfigError(
                f"allowlist {self.path} does not exist; create it with one hivemind peer id per line "
                "(volunteers print theirs with `crowdtrain identity`)"
            )
        self.ids()

    def ids(self) -> frozenset[str]:
        """The listed peer ids; the last good list when the file cannot be read now."""
        with self._lock:
            try:
                st = os.stat(self.path)
                if (st.st_mtime_ns, st.st_size) != self._seen:
                    self._ids, problems = parse_allowlist(self.path.read_text(errors="replace"))
                    self._seen = (st.st_mtime_ns, st.st_size)
                    for problem in problems:
                        logger.warning("allowlist %s %s", self.path, problem)
                    logger.info("allowlist %s: %d peer id(s)", self.path, len(self._ids))
            except OSError as e:
                logger.warning(
                    "cannot read allowlist %s (%s); keeping the last %d id(s)", self.path, e, len(self._ids)
                )
            return self._ids


def admit_join(
    mode: str, invite_ok: tuple[bool, str], announced_dht_id: str, allowlisted: frozenset[str]
) -> tuple[bool, str]:
    """Whether a Join is admitted: `invite_ok` is the invite's verdict (invite mode),
    `announced_dht_id` the peer id of the key it named ("" if none)."""
    if mode == "invite":
        return invite_ok
    if mode == "allowlist":
        if not announced_dht_id:
            return False, (
                "this run admits listed peers only: join with a hivemind identity (`crowdtrain peer` uses one by "
                "default, `--identity FILE` names another) and ask the operator to add its peer id "
                "(`crowdtrain identity` prints it)"
            )
        if announced_dht_id not in allowlisted:
            return False, (
                f"peer id {announced_dht_id} is not on this run's allowlist; send it to the run's operator"
            )
        return True, f"peer id {announced_dht_id} is on the allowlist"
    return True, "this run is open to anyone"


def still_admitted(mode: str, record: PeerRecord, allowlisted: frozenset[str]) -> tuple[bool, str]:
    """Whether an admitted session stays admitted (allowlist mode: its identity is still listed)."""
    if mode != "allowlist":
        return True, f"{mode} run"
    dht_id = record.dht_peer_id if record.dht_verified else record.admitted_dht_id
    if dht_id not in allowlisted:
        return False, f"peer id {dht_id or '(none)'} was removed from this run's allowlist"
    return True, "still on the allowlist"


def openssh_public_key(encoded_libp2p_key: bytes) -> bytes:
    """A libp2p RSA public key as hivemind's `RSAPublicKey.to_bytes()` writes it (OpenSSH);
    ValueError for any other key."""
    key_type, der = parse_public_key(encoded_libp2p_key)
    if key_type != KEY_RSA:
        raise ValueError(f"key type {key_type} is not RSA: hivemind identities are RSA keys")
    key = serialization.load_der_public_key(der)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("the key data is not an RSA public key")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def token_decision(
    now: float,
    record: PeerRecord,
    allowed: tuple[bool, str],
    banned_dht_ids: frozenset[str],
    last: SwarmToken | None,
    ttl_s: float,
) -> tuple[bool, str]:
    """Whether this heartbeat's response carries a new swarm token: proven, admitted (`allowed`:
    `still_admitted`'s verdict), not banned, and none issued or the last one due for renewal."""
    if not record.dht_verified or not record.proven_key_hex:
        return False, "its DHT identity is not proven yet"
    if record.banned or record.dht_peer_id in banned_dht_ids:
        return False, "banned: no swarm token"
    if not allowed[0]:
        return False, f"not admitted: {allowed[1]}"
    if last is not None and last.peer_id == record.dht_peer_id and not needs_renewal(last, now, ttl_s):
        return False, f"its token is valid for {last.expires_unix_s - now:.0f}s more"
    return True, "proven and admitted: token issued" if last is None else "token renewed"


def _openssh_of(key) -> bytes:
    """OpenSSH bytes of an RSA key given as OpenSSH bytes, a `cryptography` RSA private or public
    key, or a hivemind RSAPrivateKey/RSAPublicKey (anything with `get_public_key()`/`to_bytes()`)."""
    if isinstance(key, bytes | str):
        return key.encode() if isinstance(key, str) else key
    if isinstance(key, rsa.RSAPrivateKey):
        key = key.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if hasattr(key, "get_public_key"):
        key = key.get_public_key()
    return key.to_bytes()


def mint_token(
    signing_key, run_id: str, rsa_key, peer_id: str, ttl_s: float, now: float | None = None
) -> SwarmToken:
    """A swarm token for `peer_id` holding `rsa_key` (OpenSSH bytes, or an RSA key object, private or
    public: see `_openssh_of`), valid for `ttl_s`, signed with the run's Ed25519 `signing_key`;
    for the coordinator's own DHT nodes and tests."""
    import time

    expires = (time.time() if now is None else now) + ttl_s
    return sign_token(signing_key, SwarmToken(run_id, peer_id, _openssh_of(rsa_key), expires))


class Gate:
    """The servicer's admission state: mode, allowlist, invites, and the token last issued per session."""

    def __init__(
        self,
        settings: AdmissionSettings,
        run_id: str,
        sign: Callable[[SwarmToken], SwarmToken] | None,
        invites: InviteBook | None = None,
    ):
        self.settings = settings
        self.run_id = run_id
        self.sign = sign
        self.invites = invites
        if settings.mode == "invite" and invites is None:
            raise AdmissionConfigError("invite admission needs the run's invite book")
        self.allowlist = Allowlist(Path(settings.allowlist_path)) if settings.mode == "allowlist" else None
        self._issued: dict[str, SwarmToken] = {}  # session id -> last token sent
        self._lock = threading.Lock()

    def allowlisted(self) -> frozenset[str]:
        return self.allowlist.ids() if self.allowlist is not None else frozenset()

    def admit_join(
        self, joiner: dict, now: float, refuse_banned: Callable[[str], None] = lambda dht_id: None
    ) -> tuple[str, str]:
        """(invite id, the joiner's DHT id) of an admitted Join (`joiner`: its checked fields),
        spending an invite use; else `NotAdmittedError` saying why (`InvalidRequestError` when it
        does not prove the identity key it names: every mode binds a session to one identity);
        `refuse_banned(dht_id)` raises for a banned identity before an invite use is spent."""
        announced, why = verify_join(
            joiner["dht_public_key"], joiner["join_signature"], joiner["join_unix_s"], now,
            self.settings.max_join_skew_s,
        )  # fmt: skip
        if not announced:
            raise InvalidRequestError(why)
        refuse_banned(announced)  # before any invite use is spent
        invite_ok, invite_id = (True, ""), ""
        if self.settings.mode == "invite":
            if not joiner["invite_code"]:
                invite_ok = (
                    False,
                    "this run admits by invitation: pass --invite CODE from the run's operator",
                )
            else:
                invite, why = self.invites.consume(joiner["invite_code"], now, announced)
                invite_ok, invite_id = (invite is not None, why), invite.invite_id if invite else ""
        ok, reason = admit_join(self.settings.mode, invite_ok, announced, self.allowlisted())
        if not ok:
            raise NotAdmittedError(reason)
        return invite_id, announced

    def admission_root(self, invite_id: str, dht_id: str, address: str) -> str:
        """What vouches for a session, for counting independent reporters (`evidence`): its invite,
        its allowlist entry, or (open runs) the address it joined from."""
        if self.settings.mode == "invite":
            return f"invite:{invite_id}"
        return f"key:{dht_id}" if self.settings.mode == "allowlist" else f"addr:{address}"

    def still_admitted(self, record: PeerRecord) -> tuple[bool, str]:
        return still_admitted(self.settings.mode, record, self.allowlisted())

    def token_for(self, now: float, record: PeerRecord, banned_dht_ids: frozenset[str]) -> tuple[str, str]:
        """(token JSON or "", reason) for this heartbeat's response."""
        with self._lock:
            last = self._issued.get(record.session_id)
        ttl_s = self.settings.swarm_token_ttl_s
        if self.sign is None:
            return "", "this coordinator issues no swarm tokens (no signing key)"
        issue, reason = token_decision(now, record, self.still_admitted(record), banned_dht_ids, last, ttl_s)
        if not issue:
            return "", reason
        try:
            public_key = openssh_public_key(bytes.fromhex(record.proven_key_hex))
        except ValueError as e:
            return "", f"no swarm token: {e}"
        token = self.sign(SwarmToken(self.run_id, record.dht_peer_id, public_key, now + ttl_s))
        with self._lock:
            self._issued[record.session_id] = token
        return token.to_json(), reason

    def holds_token(self, session_id: str, now: float) -> bool:
        """Whether this session was sent a swarm token that is still valid."""
        with self._lock:
            last = self._issued.get(session_id)
        return last is not None and last.expires_unix_s > now

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._issued.pop(session_id, None)


@dataclass(frozen=True)
class ServicerAdmission:
    """The servicer's `gate` (who may join, swarm tokens) and `evidence` (reports against peers,
    automatic bans) for one run, built from the operator's settings by `servicer_admission`."""

    gate: Gate
    evidence: EvidenceBook


def servicer_admission(
    settings: AdmissionSettings,
    autoban: AutobanSettings,
    run_id: str,
    signing_key,
    store,
    protected: Callable[[], frozenset[str]] = frozenset,
) -> ServicerAdmission:
    """The gate and evidence book of run `run_id`, signing swarm tokens with the run's `signing_key`;
    `protected()` gives the coordinator's own DHT node ids (no evidence counts against them)."""
    gate = Gate(settings, run_id, lambda token: sign_token(signing_key, token), InviteBook(store))
    logger.info("admission: %s; swarm tokens valid %.0fs", settings.mode, settings.swarm_token_ttl_s)
    return ServicerAdmission(gate, EvidenceBook(store, autoban, settings.mode, protected))
