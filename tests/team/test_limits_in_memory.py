"""The in-memory limiter's answer without an await (`Limiter.admit_here`): the tightest bucket of
each kind in the headers, refusals that charge nothing, settlements, and the window's roll."""

from __future__ import annotations

import asyncio

import pytest

from gateway.auth import limits
from gateway.auth.keys import ApiKey, Limit, digest
from gateway.auth.limits import Limiter, RateLimited


def _key() -> ApiKey:
    return ApiKey("id1", "team", digest("t"), limit=Limit(rpm=10, tpm=100), model_limits={"m": Limit(rpm=3)})


def test_tightest_bucket_of_each_kind_and_refusal_charges_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits.time, "time", lambda: 600.0 + 15)  # 45 s left in the window
    limiter, key = Limiter(), _key()
    assert limiter.local
    seen = []
    for _ in range(3):
        admission = limiter.admit_here(key, "m", 20)
        assert admission is not None
        seen.append(dict(admission.headers))
    # requests: the model's bucket (3) is tighter than the key's (10); tokens: only the key limits them
    assert [h[b"x-ratelimit-remaining-requests"] for h in seen] == [b"2", b"1", b"0"]
    assert {h[b"x-ratelimit-limit-requests"] for h in seen} == {b"3"}
    assert [h[b"x-ratelimit-remaining-tokens"] for h in seen] == [b"80", b"60", b"40"]
    assert seen[0][b"x-ratelimit-limit-tokens"] == b"100" and seen[0][b"x-ratelimit-reset-tokens"] == b"45s"
    with pytest.raises(RateLimited) as over:
        limiter.admit_here(key, "m", 20)
    assert over.value.what == "requests per minute (3)" and round(over.value.retry_after) == 45
    assert dict(over.value.headers)[b"x-ratelimit-remaining-tokens"] == b"40"  # the refusal charged nothing
    # another model: only the key's buckets, which the refusal did not charge either
    other = limiter.admit_here(key, "other", 5)
    assert other is not None and dict(other.headers)[b"x-ratelimit-remaining-requests"] == b"6"
    limiter.settle(other, 25)  # used 20 more than reserved: 85 of 100 tokens
    with pytest.raises(RateLimited) as tokens:
        limiter.admit_here(key, "other", 20)
    assert tokens.value.what == "tokens per minute"
    # the async entry point answers from the same cells: 15 tokens left
    last = asyncio.run(limiter.admit(key, "other", 0))
    assert last is not None and dict(last.headers)[b"x-ratelimit-remaining-tokens"] == b"15"


def test_window_roll_starts_over(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [600.0]
    monkeypatch.setattr(limits.time, "time", lambda: now[0])
    limiter, key = Limiter(), _key()
    for _ in range(3):
        limiter.admit_here(key, "m", 0)
    with pytest.raises(RateLimited):
        limiter.admit_here(key, "m", 0)
    now[0] = 660.5
    admission = limiter.admit_here(key, "m", 0)
    assert admission is not None and dict(admission.headers)[b"x-ratelimit-remaining-requests"] == b"2"


def test_unlimited_key_is_not_counted() -> None:
    assert Limiter().admit_here(ApiKey("id2", "free", digest("f")), "m", 10) is None


def test_reset_header_follows_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole seconds are kept for the rest of their second; the window's last second counts down
    in milliseconds on every request."""
    now = [600.0 + 57.2]
    monkeypatch.setattr(limits.time, "time", lambda: now[0])
    limiter, key = Limiter(), ApiKey("id3", "clock", digest("c"), limit=Limit(rpm=1000))
    seen = []
    for t in (57.2, 57.9, 58.0, 58.6, 59.0, 59.2, 59.7, 60.1):
        now[0] = 600.0 + t
        admission = limiter.admit_here(key, "m", 0)
        assert admission is not None
        seen.append(dict(admission.headers)[b"x-ratelimit-reset-requests"])
    assert seen == [b"3s", b"3s", b"2s", b"2s", b"1s", b"800ms", b"300ms", b"1m0s"]
