"""API keys at the gateway: who a request comes from, and how fast that key may send them.

Keys are held only as SHA-256 digests, and may be configured that way (`sha256:HEX`), so the plain key need never
reach the gateway's flags, env or files. A presented key is hashed and compared with every digest in constant time.
A key's id, the first 12 hex digits of its digest, names it in logs and owns its jobs: it is not secret, and a
random key cannot be recovered from it. With no keys configured every request is anonymous (owner ""), as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable, Iterable

from services.common.errors import ResourceExhausted, Unauthenticated

logger = logging.getLogger(__name__)

HASHED_PREFIX = "sha256:"
KEY_ID_HEX_DIGITS = 12


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def parse_key(entry: str) -> bytes:
    """One configured key -> its digest: `sha256:` + 64 hex digits is a digest already, anything else a key."""
    entry = entry.strip()
    if entry.startswith(HASHED_PREFIX):
        hexdigits = entry[len(HASHED_PREFIX):]
        try:
            digest = bytes.fromhex(hexdigits)
        except ValueError:
            digest = b""
        if len(digest) != hashlib.sha256().digest_size:
            raise ValueError("an API key given as sha256:HEX needs 64 hex digits (sha256sum of the key)")
        return digest
    return digest_of(entry)


class KeyRing:
    def __init__(self, entries: Iterable[str] = ()) -> None:
        self._digests = list(dict.fromkeys(parse_key(entry) for entry in entries if entry.strip()))

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, authorization: str | None) -> str:
        """The key id behind an `Authorization: Bearer KEY` value; Unauthenticated when it is missing or unknown.
        With no keys configured, every caller is "" (anonymous)."""
        if not self._digests:
            return ""
        if not authorization:
            raise Unauthenticated("missing API key: send the header 'Authorization: Bearer KEY'")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("malformed Authorization: expected 'Bearer KEY'")
        presented = digest_of(key.strip())
        found = None
        # Every digest is compared, whatever matches: the time taken says nothing about which key, if any, matched.
        for digest in self._digests:
            if hmac.compare_digest(presented, digest):
                found = digest
        if found is None:
            raise Unauthenticated("invalid API key")
        return found.hex()[:KEY_ID_HEX_DIGITS]


@dataclasses.dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per key: `per_minute` requests a minute on average, bursts of up to `per_minute`.

    Written by hand: the bucket is a dozen lines, and rate-limit libraries bring storage backends and
    decorators this in-process gateway does not need."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not per_minute > 0:
            raise ValueError(f"--rate-limit must be > 0 requests per minute, not {per_minute}")
        self.rate_per_s = per_minute / 60.0
        self.capacity = max(1.0, float(per_minute))
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}       # one per configured key (plus the anonymous ""): bounded

    def take(self, key_id: str) -> None:
        """Spend one token of `key_id`'s bucket; ResourceExhausted with the wait until the next token if empty."""
        now = self._clock()
        bucket = self._buckets.setdefault(key_id, _Bucket(self.capacity, now))
        bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.updated) * self.rate_per_s)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return
        wait_s = (1.0 - bucket.tokens) / self.rate_per_s
        raise ResourceExhausted(f"rate limit of {self.rate_per_s * 60:g} requests per minute reached for this API "
                                f"key; retry in {math.ceil(wait_s)}s", retry_after_s=wait_s)


class Gatekeeper:
    """The one check both front doors run before any work: the key (401 / UNAUTHENTICATED), then its rate (429 /
    RESOURCE_EXHAUSTED with Retry-After). Returns the owner that the request's jobs are recorded under."""

    def __init__(self, keys: Iterable[str] = (), rate_limit_per_minute: float | None = None) -> None:
        self.keys = KeyRing(keys)
        self.limiter = RateLimiter(rate_limit_per_minute) if rate_limit_per_minute else None

    def admit(self, authorization: str | None) -> str:
        owner = self.keys.identify(authorization)
        if self.limiter is not None:
            self.limiter.take(owner)
        return owner
