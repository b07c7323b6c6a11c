"""Load times kept across restarts, for `estimated_time` while a model loads."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from gateway.engine import EngineArgs

log = logging.getLogger(__name__)


class LoadHistory:
    """How long each checkpoint took to load here, kept in the cache dir across restarts.

    It gives `estimated_time` while a model loads: its own last load time or, never loaded
    yet, its size at the load rate (bytes per second) measured on the other checkpoints.
    """

    _writing = threading.Lock()  # models finishing their loads together update one file

    def __init__(self, path: Path) -> None:
        self.path = path

    def _records(self) -> dict[str, dict[str, float]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {
            key: r
            for key, r in data.items()
            if isinstance(r, dict) and all(isinstance(r.get(f), (int, float)) for f in ("seconds", "bytes"))
        }

    def expected_seconds(self, key: str, size: int | None) -> float | None:
        records = self._records()
        if key in records:
            return float(records[key]["seconds"])
        measured = [r for r in records.values() if r["bytes"] > 0 and r["seconds"] > 0]
        if size and measured:
            rate = sum(r["bytes"] for r in measured) / sum(r["seconds"] for r in measured)
            return size / rate
        return None

    def record(self, key: str, seconds: float, size: int | None) -> None:
        with self._writing:
            records = self._records()
            records[key] = {"seconds": round(seconds, 3), "bytes": size or 0}
            tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(json.dumps(records, indent=1))
                tmp.replace(self.path)  # atomic: another process never reads half a file
            except OSError as exc:
                log.warning("could not keep the load time of %s (%s)", key, exc)


def history_key(args: EngineArgs) -> str:
    """One checkpoint loaded one way: the same weights on another device or dtype load differently."""
    return f"{args.source}@{args.revision or ''} {args.device}/{args.dtype}"


def checkpoint_bytes(args: EngineArgs) -> int | None:
    """Size of a local checkpoint's files; None for a Hub id."""
    from gateway.engine import resolve_source

    try:
        source = resolve_source(args)
        if not source.is_local:
            return None
        root = Path(source.path)
        if source.gguf_file is not None:
            return (root / source.gguf_file).stat().st_size
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    except OSError:
        return None
