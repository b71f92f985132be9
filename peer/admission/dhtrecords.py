"""The run's records in the DHT, and the validators that keep each record its writer's.

Who may average is published under two keys (peer/admission/access.py reads them):

- `<run_id>_swarm_tokens`: one record per token holder, under the subkey `[owner:<its RSA key>]`,
  hivemind's `RSASignatureValidator` marker: a record under it must carry that key's signature,
  so only the holder writes (or replaces) its own record; the value must be a token the run's key
  signed for that very RSA key.
- `<run_id>_swarm_revocations`: one record per banned peer id (the subkey), a revocation signed by
  the run's key: only the coordinator can write one.

`AdmissionRecordValidator` refuses anything else under those keys, and a plain (non-dictionary)
value under any of the run's keys: in hivemind 1.1.12 a plain value with a later expiration
replaces the dictionary and every later subkey store is refused (dht/storage.py, case 3), which
let one admitted peer wipe every token for a year. Validators apply at every
honest node both to what it is asked to store and to what a lookup returns, so a record a hostile
node keeps for itself is dropped from its answer and the reader uses the honest nodes' copies.
The validator reads no clock: every node decides the same for the same record (a lookup refuses a
node's whole dictionary when one entry fails, so nodes must never disagree).

`IdentitySignatureValidator` is hivemind's `RSASignatureValidator` that also signs the records
marked with the node's identity key (the key its token names), besides those of the process-wide
key that hivemind's ProgressTracker marks its progress records with.
"""

from __future__ import annotations

import logging
import re

from crowdtrain.peer.admission.tokens import Revocation, SwarmToken, check_token, parse_revocation
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer

logger = logging.getLogger(__name__)

RECORD_SLACK_S = 60.0  # a record may outlive the token or revocation it holds by this much, no more
_OWNER = re.compile(rb"\[owner:([^\]]+)\]")  # exactly one hivemind owner marker, nothing else


def tokens_key(run_id: str) -> str:
    """The DHT key under which every admitted peer publishes its token (subkey: `owner_subkey`)."""
    return f"{run_id}_swarm_tokens"


def revocations_key(run_id: str) -> str:
    """The DHT key of the coordinator's signed revocations (subkey: the banned peer id)."""
    return f"{run_id}_swarm_revocations"


def run_dht_keys(run_id: str) -> tuple[str, ...]:
    """Every DHT key a run uses, each a dictionary (one subkey per writer): hivemind 1.1.12's
    Optimizer (progress records, matchmaking with the default empty group bits, state donors) and
    the admission records. A key added to the run's protocol must be added here."""
    return (
        f"{run_id}_progress",
        f"{run_id}_grad_averager.0b",
        f"{run_id}_state_averager.0b",
        f"{run_id}_grad_averager.all_averagers",
        f"{run_id}_state_averager.all_averagers",
        tokens_key(run_id),
        revocations_key(run_id),
    )


def dht_key_id(key: str) -> bytes:
    """The key as DHT records carry it (validators never see the key itself, only this hash)."""
    return DHTID.generate(source=key).to_bytes()


def owner_subkey(public_key: bytes) -> bytes:
    """The subkey only the holder of `public_key` (hivemind's `RSAPublicKey.to_bytes()`) can write."""
    return RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", public_key)


def token_record(subkey, value, run_id: str, run_public_key_hex: str) -> tuple[SwarmToken | None, str]:
    """The token a record under the tokens key holds, or (None, why not): the subkey is exactly
    the owner marker of the key the token names, and the run's key signed the token (its expiry is
    the reader's business: no clock here)."""
    match = _OWNER.fullmatch(subkey) if isinstance(subkey, bytes) else None
    if match is None:
        return None, "a token record's subkey is not an owner marker"
    if not isinstance(value, (str, bytes)):
        return None, f"a token record holds a {type(value).__name__}, not a token"
    try:
        token = SwarmToken.from_json(value)
    except (ValueError, UnicodeDecodeError, TypeError) as e:
        return None, f"not a swarm token: {e}"
    if token.public_key != match.group(1):
        return None, "the token names another key than the record's owner"
    ok, reason = check_token(token, run_id, run_public_key_hex, now=float("-inf"))
    return (token if ok else None), reason


def revocation_record(subkey, value, run_id: str, run_public_key_hex: str) -> tuple[Revocation | None, str]:
    """The revocation a record under the revocations key holds, or (None, why not): signed by the
    run's key, for the peer id it is stored under (whether it is still in force: the reader's)."""
    if not isinstance(subkey, str) or not isinstance(value, (str, bytes)):
        return None, "a revocation record is a text under a peer id"
    return parse_revocation(value, run_id, run_public_key_hex, now=float("-inf"), peer_id=subkey)


def admission_record_decision(
    kind: str, subkey, value, expiration_time: float, run_id: str, run_public_key_hex: str
) -> tuple[bool, str]:
    """Whether a DHT node keeps (or a reader accepts) a record under the run's `kind` key
    ("tokens", "revocations" or "other": any other run key), and why not."""
    if subkey is None:  # hivemind's subkey of a plain value
        return False, "a plain value under a run key would replace its dictionary"
    if kind == "other":
        return True, "a subkey record"
    if kind == "tokens":
        record, reason = token_record(subkey, value, run_id, run_public_key_hex)
        lasts_until = record.expires_unix_s if record is not None else 0.0
    else:
        record, reason = revocation_record(subkey, value, run_id, run_public_key_hex)
        lasts_until = record.until_unix_s if record is not None else 0.0
    if record is None:
        return False, reason
    if expiration_time > lasts_until + RECORD_SLACK_S:
        return False, f"the record expires {expiration_time - lasts_until:.0f}s after what it holds"
    return True, "well-formed, signed, and no longer-lived than what it holds"


class AdmissionRecordValidator(RecordValidatorBase):
    """hivemind record validator for one run's keys (`admission_record_decision`); other keys pass.
    Register it with `IdentitySignatureValidator` (start_dht does): that one checks the owner's
    signature first and strips it (without it, every signed record fails here: values do not parse)."""

    MAX_ACCEPTED = 4096  # records remembered as valid: a lookup re-validates every entry it returns

    def __init__(self, run_id: str, run_public_key_hex: str):
        self.run_id, self.run_public_key_hex = run_id, run_public_key_hex
        self._kinds = {dht_key_id(key): "other" for key in run_dht_keys(run_id)}
        self._kinds[dht_key_id(tokens_key(run_id))] = "tokens"
        self._kinds[dht_key_id(revocations_key(run_id))] = "revocations"
        self._accepted: set[DHTRecord] = set()

    def validate(self, record: DHTRecord) -> bool:
        kind = self._kinds.get(record.key)
        if kind is None:
            return True
        if kind == "other":  # only the subkey matters: cheap, not remembered
            return self._decide(kind, record)
        if record in self._accepted:
            return True
        accepted = self._decide(kind, record)
        if accepted:  # only honest records are re-validated often; junk must not fill this
            if len(self._accepted) >= self.MAX_ACCEPTED:
                self._accepted.clear()
            self._accepted.add(record)
        return accepted

    def _decide(self, kind: str, record: DHTRecord) -> bool:
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value) if kind != "other" else None
        except Exception as e:  # msgpack raises several types for hostile bytes
            ok, reason = False, f"not msgpack ({type(e).__name__})"
        else:
            ok, reason = admission_record_decision(
                kind, subkey, value, record.expiration_time, self.run_id, self.run_public_key_hex
            )
        if not ok:
            logger.debug("refused a DHT record under the run's %s key: %s", kind, reason)
        return ok


class IdentitySignatureValidator(RSASignatureValidator):
    """hivemind's `RSASignatureValidator` (it verifies whichever owner a record names, and absorbs
    any other instance registered later, as hivemind's ProgressTracker does) that signs records
    marked with `identity_key`, the node's libp2p identity and the key of its swarm token, with
    that key; records marked with the process-wide key, with that one, as hivemind's does."""

    def __init__(self, identity_key):
        super().__init__()  # hivemind's process-wide key: what ProgressTracker marks records with
        self._identity_key = identity_key
        self._identity_marker = owner_subkey(identity_key.get_public_key().to_bytes())

    def sign_value(self, record: DHTRecord) -> bytes:
        if self._identity_marker not in record.key and self._identity_marker not in record.subkey:
            return super().sign_value(record)
        signature = self._identity_key.sign(self._serialize_record(record))
        return record.value + self.SIGNATURE_FORMAT.replace(b"_value_", signature)


def admission_validators(run_id: str, run_public_key_hex: str, identity_key) -> list[RecordValidatorBase]:
    """The validators every crowdtrain DHT node of run `run_id` registers (peer/swarm/wiring.py start_dht)."""
    return [IdentitySignatureValidator(identity_key), AdmissionRecordValidator(run_id, run_public_key_hex)]
