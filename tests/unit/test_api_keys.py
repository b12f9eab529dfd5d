"""API keys: held as SHA-256 digests, several at once, each with its own id and token bucket."""

from __future__ import annotations

import hashlib

import pytest

from services.common.errors import ResourceExhausted, Unauthenticated
from services.gateway.auth import Gatekeeper, KeyRing, RateLimiter


def test_no_keys_means_anonymous():
    ring = KeyRing([])
    assert not ring.enabled
    assert ring.identify(None) == "" and ring.identify("Bearer anything") == ""


def test_several_keys_each_have_their_own_non_secret_id():
    ring = KeyRing(["alpha-key", "beta-key"])
    a, b = ring.identify("Bearer alpha-key"), ring.identify("bearer beta-key")
    assert a != b and len(a) == 12
    assert a == hashlib.sha256(b"alpha-key").hexdigest()[:12]
    assert "alpha" not in a


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic alpha-key", "alpha-key", "Bearer alpha",
                                    "Bearer alpha-key-and-more"])
def test_missing_malformed_or_wrong_keys_are_unauthenticated(header):
    with pytest.raises(Unauthenticated):
        KeyRing(["alpha-key"]).identify(header)


def test_keys_are_held_only_as_digests_and_may_be_given_so():
    digest = hashlib.sha256(b"secret-key").hexdigest()
    ring = KeyRing([f"sha256:{digest}"])
    assert ring.identify("Bearer secret-key") == digest[:12]
    with pytest.raises(Unauthenticated):
        ring.identify(f"Bearer sha256:{digest}")   # the digest itself is not a key
    plain = KeyRing(["secret-key"])
    assert "secret-key" not in repr(vars(plain))


def test_a_bad_digest_is_refused_at_start():
    with pytest.raises(ValueError, match="64 hex digits"):
        KeyRing(["sha256:abc"])


def test_token_bucket_allows_bursts_then_asks_to_wait():
    now = [1000.0]
    limiter = RateLimiter(per_minute=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.take("a")
    with pytest.raises(ResourceExhausted) as refused:
        limiter.take("a")
    assert refused.value.retry_after_s == pytest.approx(20.0)      # one token per 20 s at 3 a minute
    limiter.take("b")                                              # another key has its own bucket
    now[0] += 10.0
    with pytest.raises(ResourceExhausted) as again:
        limiter.take("a")
    assert again.value.retry_after_s == pytest.approx(10.0)
    now[0] += 10.0
    limiter.take("a")


def test_gatekeeper_checks_the_key_before_the_rate():
    gate = Gatekeeper(["k"], rate_limit_per_minute=1)
    for _ in range(3):
        with pytest.raises(Unauthenticated):   # wrong keys do not spend the real key's tokens
            gate.admit("Bearer wrong")
    assert gate.admit("Bearer k") == hashlib.sha256(b"k").hexdigest()[:12]
    with pytest.raises(ResourceExhausted):
        gate.admit("Bearer k")
