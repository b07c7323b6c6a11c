"""A circuit breaker per deployment: out of rotation after repeated failures, back after a probe."""

from __future__ import annotations

import time


class Breaker:
    """Counts consecutive failures; `failures` in a row open it for at least `seconds`.

    While open the deployment gets no traffic. Once `seconds` have passed the
    router probes it every `probe_interval` until a probe succeeds, which closes it.
    """

    def __init__(self, failures: int, seconds: float) -> None:
        self.threshold = failures
        self.seconds = seconds
        self.consecutive = 0
        self.opened_at: float | None = None

    @property
    def open(self) -> bool:
        return self.opened_at is not None

    def probe_due(self, now: float | None = None) -> bool:
        return self.opened_at is not None and (now or time.monotonic()) >= self.opened_at + self.seconds

    def retry_after(self, now: float | None = None) -> float:
        """Seconds until this deployment may be probed back into rotation."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.seconds - (now or time.monotonic()))

    def success(self) -> bool:
        """Record a success; True when this closed an open breaker."""
        was_open = self.opened_at is not None
        self.consecutive = 0
        self.opened_at = None
        return was_open

    def failure(self) -> bool:
        """Record a failure; True when this one opened the breaker."""
        self.consecutive += 1
        if self.opened_at is None and self.consecutive >= self.threshold:
            self.opened_at = time.monotonic()
            return True
        return False
