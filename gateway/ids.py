"""Unique ids for requests and completions without a system call each (uuid4 reads the OS's
random source every time): a random prefix per process and a counter."""

from __future__ import annotations

import itertools
import secrets

_counter = itertools.count()
_prefix: str | None = None


def unique_hex() -> str:
    """32 hex digits, unique within this process and, by its random prefix, across processes."""
    global _prefix
    if _prefix is None:  # drawn on first use, so a forked worker draws its own
        _prefix = secrets.token_hex(8)
    return f"{_prefix}{next(_counter):016x}"
