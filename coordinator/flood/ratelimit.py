"""Rate limits as token buckets: a pure decision (`take`) and a bounded table of buckets by key.

Joins are limited per caller address (an IPv6 caller by its /64, which one host usually owns
whole), heartbeats per session. A refusal says when to retry; the servicer raises it as
`RateLimitedError` (gRPC RESOURCE_EXHAUSTED, which peers retry with backoff).
"""

from __future__ import annotations

import ipaddress
import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class BucketSettings:
    capacity: float  # requests allowed in a burst
    refill_per_s: float  # sustained requests per second


@dataclass(frozen=True)
class Bucket:
    tokens: float
    updated_unix_s: float


def take(bucket: Bucket | None, now: float, settings: BucketSettings) -> tuple[bool, Bucket, float]:
    """(allowed, the bucket after this request, seconds until one request is allowed again)."""
    if bucket is None:
        bucket = Bucket(settings.capacity, now)
    elapsed = max(0.0, now - bucket.updated_unix_s)
    tokens = min(settings.capacity, bucket.tokens + elapsed * settings.refill_per_s)
    if tokens >= 1.0:
        return True, Bucket(tokens - 1.0, now), 0.0
    return False, Bucket(tokens, now), (1.0 - tokens) / settings.refill_per_s


def caller_key(peer: str) -> str:
    """The rate-limit key of a gRPC `context.peer()` ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678",
    "unix:..."): the host without its port; an IPv6 host by its /64 network."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]") if rest.startswith("[") else rest
        try:
            return str(ipaddress.IPv6Network(f"{host}/64", strict=False))
        except ValueError:
            return host
    return peer


class RateLimiter:
    """Buckets by key, at most `max_keys` of them (the least recently used are forgotten: a full
    bucket is what a forgotten key gets back, so forgetting only ever errs towards allowing)."""

    def __init__(self, settings: BucketSettings, max_keys: int = 100_000):
        self.settings, self.max_keys = settings, max_keys
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: str, now: float) -> tuple[bool, float]:
        """(allowed, seconds until the next request of `key` would be allowed)."""
        with self._lock:
            allowed, bucket, retry_s = take(self._buckets.pop(key, None), now, self.settings)
            self._buckets[key] = bucket
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return allowed, retry_s

    def forget(self, key: str) -> None:
        with self._lock:
            self._buckets.pop(key, None)
