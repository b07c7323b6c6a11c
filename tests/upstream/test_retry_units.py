"""The small pure pieces: Retry-After parsing, backoff, the breaker, dialect parsers on bad input."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from gateway.errors import Overloaded, UpstreamError
from gateway.upstream import dialects
from gateway.upstream.breaker import Breaker
from gateway.upstream.retry import MAX_RETRY_AFTER, RetryableFailure, backoff_delay, parse_retry_after


def test_retry_after_seconds_dates_and_garbage() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    # an unreadable, negative, infinite or huge wait is taken as a long one, capped
    for value in ("soon", "-4", "inf", "-inf", "nan", "1e999", "99999999999999999999", "Wed, 21 Oct 9999 07:28:00 GMT"):
        assert parse_retry_after(value) == MAX_RETRY_AFTER, value
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date gone by: now
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 <= parse_retry_after(later) <= 30


def test_backoff_grows_with_jitter_and_a_cap() -> None:
    for retry, low, high in [(1, 0.05, 0.1), (2, 0.1, 0.2), (3, 0.2, 0.4), (10, 0.5, 1.0)]:
        delays = [backoff_delay(retry, 0.1, 1.0) for _ in range(200)]
        assert all(low <= d <= high for d in delays)
        assert len(set(delays)) > 100  # jittered, not one fixed value
    assert backoff_delay(1, 0.1, 1.0, retry_after=7.0) == 7.0


def test_exhausted_failures_keep_the_upstream_status() -> None:
    limited = RetryableFailure("x", status=429, kind="status_429", retry_after=2.2).to_error()
    assert isinstance(limited, Overloaded) and limited.headers == {"Retry-After": "3"}
    down = RetryableFailure("x", status=503, kind="status_5xx").to_error()
    assert isinstance(down, UpstreamError) and down.status_code == 503 and down.headers == {"Retry-After": "1"}
    endless = RetryableFailure("x", status=429, kind="status_429", retry_after=parse_retry_after("inf")).to_error()
    assert endless.headers == {"Retry-After": str(int(MAX_RETRY_AFTER))}
    timeout = RetryableFailure("x", status=504, kind="timeout").to_error()
    assert timeout.status_code == 504 and "Retry-After" not in timeout.headers


def test_breaker_opens_after_consecutive_failures_only() -> None:
    breaker = Breaker(failures=3, seconds=0.05)
    assert not breaker.failure() and not breaker.failure()
    breaker.success()  # a success in between resets the count
    assert not breaker.failure() and not breaker.failure()
    assert breaker.failure() and breaker.open
    opened = breaker.opened_at
    assert opened is not None  # read on the breaker's own clock, so a slow machine cannot pass its time
    assert not breaker.probe_due(now=opened + 0.04) and breaker.retry_after(now=opened + 0.04) == pytest.approx(0.01)
    assert breaker.probe_due(now=opened + 0.05) and breaker.retry_after(now=opened + 0.05) == 0
    time.sleep(0.06)  # and on the real clock: at least 0.06 s later, the probe is due
    assert breaker.probe_due()
    assert breaker.success() and not breaker.open


@pytest.mark.parametrize(
    "data",
    [{}, {"choices": None}, {"choices": [{"message": 5}]}, {"choices": []}, [1, 2], "text"],
)
def test_openai_result_rejects_malformed_bodies(data) -> None:
    with pytest.raises(UpstreamError):
        dialects.openai_result(data, 1)


@pytest.mark.parametrize("data", [{}, {"generated_text": 5}, [], {"details": {}}])
def test_tgi_result_rejects_malformed_bodies(data) -> None:
    with pytest.raises(UpstreamError):
        dialects.tgi_result(data)


def test_stream_parsers_raise_on_error_events_and_bad_chunks() -> None:
    with pytest.raises(UpstreamError, match="boom"):
        dialects.OpenAIStream().feed({"error": {"message": "boom"}})
    with pytest.raises(UpstreamError, match="boom"):
        dialects.TGIStream().feed({"error": "boom", "error_type": "generation"})
    with pytest.raises(UpstreamError):
        dialects.TGIStream().feed({"token": None})
    with pytest.raises(UpstreamError):
        dialects.OpenAIStream().feed({"choices": [{"index": "x", "text": "a"}]})
