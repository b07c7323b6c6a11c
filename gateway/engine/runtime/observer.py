"""How the local engines report what they do, without knowing about Prometheus."""

from __future__ import annotations

from typing import Protocol


class EngineObserver(Protocol):
    def queued(self, seconds: float) -> None:
        """A request waited this long before its compute started."""

    def stepped(self, sequences: int, seconds: float) -> None:
        """One forward pass served this many sequences (or encoder inputs) and took this long."""


class NoObserver:
    def queued(self, seconds: float) -> None:
        return None

    def stepped(self, sequences: int, seconds: float) -> None:
        return None
