"""Which upstream failures are worth another attempt, and how long to wait before it."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from gateway.errors import GatewayError, Overloaded, UpstreamError

# Statuses an upstream answers when a later attempt may well succeed.
RETRY_STATUSES = frozenset({429, 502, 503, 504})

# The loop time by which the current request must be answered, set by the router around
# each deployment it tries, so retries and fallbacks share one deadline instead of each
# upstream starting its own. A context variable keeps it off the Backend interface.
_request_deadline: ContextVar[float | None] = ContextVar("upstream_request_deadline", default=None)


@contextmanager
def request_deadline(deadline: float | None) -> Iterator[None]:
    """Within this block, upstream calls end by `deadline` (loop time) at the latest."""
    token = _request_deadline.set(deadline)
    try:
        yield
    finally:
        _request_deadline.reset(token)


def call_deadline(now: float, total: float) -> float:
    """When a call starting `now` must end: its own `total`, cut short by the request's deadline."""
    outer = _request_deadline.get()
    return now + total if outer is None else min(now + total, outer)


class RetryableFailure(Exception):
    """One attempt failed in a way the next attempt may not (connect error, timeout, 429, 502-504).

    `status` is what the client gets if no attempt is left; `kind` labels the metrics.
    """

    def __init__(self, message: str, *, status: int, kind: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind
        self.retry_after = retry_after

    def to_error(self) -> GatewayError:
        """The error the client sees once retries are exhausted: the upstream's status and Retry-After."""
        if self.status == 429:
            # Rounded up: a client told to come back sooner than the upstream said would be refused again.
            return Overloaded(self.message, retry_after=math.ceil(self.retry_after or 1.0))
        headers = {}
        if self.retry_after is not None or self.status == 503:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after or 1.0)))
        return UpstreamError(self.message, status_code=self.status, headers=headers)


# The longest wait a Retry-After is taken to ask for. An upstream that asks for longer, for
# an unreadable time ("inf", "soon") or a negative one is treated as asking for a long wait:
# not retried here, and its client is told to come back after this long.
MAX_RETRY_AFTER = 3600.0


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), at most MAX_RETRY_AFTER;
    None when absent."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return MAX_RETRY_AFTER
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = max(0.0, (when - datetime.now(timezone.utc)).total_seconds())  # a past date: now
    if not 0 <= seconds <= MAX_RETRY_AFTER:  # also NaN and inf
        return MAX_RETRY_AFTER
    return seconds


def backoff_delay(retry: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Seconds to wait before retry number `retry` (1-based).

    The upstream's Retry-After wins when it gave one. Otherwise exponential with
    "equal jitter": half the step is fixed, half random, so clients that failed
    together do not come back together, yet the wait still grows.
    """
    if retry_after is not None:
        return retry_after
    step = min(cap, base * (2 ** (retry - 1)))
    return step / 2 + random.uniform(0, step / 2)
