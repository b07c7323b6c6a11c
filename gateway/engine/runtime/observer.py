"""How the local engines report what they do, without knowing about Prometheus."""

from __future__ import annotations

from typing import Protocol


class EngineObserver(Protocol):
    def queued(self, seconds: float) -> None:
        """A request waited this long before its compute started."""

    def stepped(self, sequences: int, seconds: float) -> None:
        """One forward pass served this many sequences (or encoder inputs) and took this long."""

    def prefix_lookup(self, prompt_tokens: int, cached_tokens: int) -> None:
        """A prompt of this many tokens started with this many from the prefix cache."""


class NoObserver:
    def queued(self, seconds: float) -> None:
        return None

    def stepped(self, sequences: int, seconds: float) -> None:
        return None

    def prefix_lookup(self, prompt_tokens: int, cached_tokens: int) -> None:
        return None
