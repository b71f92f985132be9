"""The coordinator's bootstrap DHT node keeps only the run's records, and only so many of them.

hivemind's node stores whatever any admitted peer sends it, under any key, without limit. The coordinator's node is the one every peer knows, in the operator's process, so:

- `RunKeysValidator` refuses records under keys other than the run's (peer/admission/dhtrecords.py
  `run_dht_keys`: validators see only hashed keys, so the run's keys are listed, not prefixes);
- `CappedStorage` (installed into the running node by `cap_storage`) refuses a record larger than
  `max_record_bytes`, and a new subkey once a key holds `max_subkeys_per_key` or the node holds
  `max_records` in all; an existing record is still refreshed, and what it refuses is stored by the
  other nodes, as hivemind replicates every record. These limits are the storage's, not a
  validator's: validators also judge what lookups return, and hivemind drops a node's whole
  dictionary for one refused entry, so a large but valid record held by the honest peers would
  hide all their records from the coordinator.

At most `max_records` x `max_record_bytes` (64 MiB with the defaults; honest records are ~1 KiB).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

from crowdtrain.peer.admission.dhtrecords import dht_key_id, run_dht_keys
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DhtStorageLimits:
    max_record_bytes: int = 8192  # a signed token record is ~1.1 KiB, a progress record ~0.5 KiB
    max_subkeys_per_key: int = 2048  # records per key (a peer writes one per key): peers in the swarm
    max_records: int = 8192  # records in all, over the run's keys (about five per peer)


class RunKeysValidator(RecordValidatorBase):
    """Only the run's keys; checked before any signature (the coordinator looks up no other key)."""

    def __init__(self, run_id: str):
        self._keys = frozenset(dht_key_id(key) for key in run_dht_keys(run_id))

    def validate(self, record: DHTRecord) -> bool:
        if record.key not in self._keys:
            logger.debug("refused a DHT record under a key that is not the run's")
            return False
        return True

    @property
    def priority(self) -> int:
        return 20  # validators run in decreasing priority: this cheap one before RSA signatures


class CappedStorage(DHTLocalStorage):
    """hivemind's node storage that refuses new subkeys past the limits (see the module's text)."""

    limits = DhtStorageLimits()

    def store_subkey(self, key, subkey, value, expiration_time: float) -> bool:
        """hivemind's, within the limits (plain values never get here: AdmissionRecordValidator)."""
        if len(value) > self.limits.max_record_bytes:
            logger.debug("DHT storage: a record of %d bytes refused", len(value))
            return False
        current = self.get(key)
        held = current.value if current is not None else None
        if not (isinstance(held, DictionaryDHTValue) and subkey in held):  # a new record
            if isinstance(held, DictionaryDHTValue) and len(held) >= self.limits.max_subkeys_per_key:
                logger.debug("DHT storage: a key already holds %d records", len(held))
                return False
            if self.records() >= self.limits.max_records:
                logger.debug("DHT storage: %d records held, none more", self.limits.max_records)
                return False
        return super().store_subkey(key, subkey, value, expiration_time)

    def records(self) -> int:
        """How many records are held (a dictionary's entries each count; unexpired only)."""
        return sum(
            len(item.value) if isinstance(item.value, DictionaryDHTValue) else 1 for _, item in self.items()
        )


async def _install(_dht, node, limits: DhtStorageLimits) -> None:
    """In the DHT's process: cap the node's storage and cache (hivemind 1.1.12 has no option for
    either: `DHTProtocol.storage` and `.cache` are plain `DHTLocalStorage`s). The class of the live
    objects is switched, so nothing already stored is lost and nothing is stored meanwhile."""
    for storage in (node.protocol.storage, node.protocol.cache):
        storage.__class__ = CappedStorage
        storage.limits = limits


def cap_storage(dht, limits: DhtStorageLimits) -> None:
    """Cap the storage of the running `dht` node (in its own process)."""
    dht.run_coroutine(partial(_install, limits=limits))
