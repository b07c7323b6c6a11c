"""The key store: SQLite, written through the admin API (why SQLite and not a key file:
docs/security.md). Every method blocks; callers run them off the event loop (asyncio.to_thread).

Only digests are stored. Replicas that share the file (a volume) see each other's keys: the
app reloads the ring when the database changed (`PRAGMA data_version`, polled).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

from gateway.auth.keys import ALL_SCOPES, ApiKey, KeyScope, Limit, digest, new_token

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, digest BLOB NOT NULL UNIQUE, scopes TEXT NOT NULL,
    models TEXT, rpm INTEGER, tpm INTEGER, model_limits TEXT NOT NULL DEFAULT '{}',
    expires_at REAL, revoked INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    key_name TEXT NOT NULL, model TEXT NOT NULL, requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_name, model)
);
"""

UsageRow = tuple[str, str, int, int, int]  # key name, model, requests, prompt tokens, completion tokens


def _limits_json(limits: dict[str, Limit]) -> str:
    return json.dumps({m: [lim.rpm, lim.tpm] for m, lim in limits.items()})


def _row_key(row: sqlite3.Row) -> ApiKey:
    model_limits = {m: Limit(rpm, tpm) for m, (rpm, tpm) in json.loads(row["model_limits"]).items()}
    return ApiKey(
        id=row["id"],
        name=row["name"],
        digest=bytes(row["digest"]),
        scopes=frozenset(KeyScope(s) for s in json.loads(row["scopes"])),
        models=None if row["models"] is None else frozenset(json.loads(row["models"])),
        limit=Limit(row["rpm"], row["tpm"]),
        model_limits=model_limits,
        expires_at=row["expires_at"],
        revoked=bool(row["revoked"]),
        created_at=row["created_at"],
    )


class KeyStore:
    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def version(self) -> int:
        """Changes when another connection (another replica) wrote the file."""
        with self._lock:
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def create(
        self,
        name: str,
        *,
        scopes: Iterable[KeyScope] = ALL_SCOPES,
        models: Iterable[str] | None = None,
        limit: Limit = Limit(),
        model_limits: dict[str, Limit] | None = None,
        expires_at: float | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key and its token (shown once: only its digest is kept)."""
        token = new_token()
        key = ApiKey(
            id=uuid.uuid4().hex[:16],
            name=name,
            digest=digest(token),
            scopes=frozenset(scopes),
            models=None if models is None else frozenset(models),
            limit=limit,
            model_limits=dict(model_limits or {}),
            expires_at=expires_at,
            created_at=time.time(),
        )
        with self._lock:
            self._db.execute(
                "INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                (
                    key.id,
                    key.name,
                    key.digest,
                    json.dumps(sorted(s.value for s in key.scopes)),
                    None if key.models is None else json.dumps(sorted(key.models)),
                    limit.rpm,
                    limit.tpm,
                    _limits_json(key.model_limits),
                    expires_at,
                    key.created_at,
                ),
            )
        return key, token

    def all(self) -> list[ApiKey]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM keys ORDER BY created_at").fetchall()
        return [_row_key(r) for r in rows]

    def revoke(self, key_id: str) -> bool:
        with self._lock:
            cursor = self._db.execute("UPDATE keys SET revoked = 1 WHERE id = ?", (key_id,))
        return cursor.rowcount > 0

    def add_usage(self, rows: Iterable[UsageRow]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO usage VALUES (?, ?, ?, ?, ?) ON CONFLICT (key_name, model) DO UPDATE SET "
                    "requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                    "completion_tokens = completion_tokens + excluded.completion_tokens",
                    list(rows),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")  # else the connection stays inside this transaction for good
                raise

    def usage(self) -> list[UsageRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM usage ORDER BY key_name, model").fetchall()
        return [tuple(r) for r in rows]


def describe(key: ApiKey) -> dict[str, Any]:
    """A key as the admin API lists it (never its digest)."""
    return {
        "id": key.id,
        "name": key.name,
        "scopes": sorted(s.value for s in key.scopes),
        "models": None if key.models is None else sorted(key.models),
        "limits": {"rpm": key.limit.rpm, "tpm": key.limit.tpm},
        "model_limits": {m: {"rpm": lim.rpm, "tpm": lim.tpm} for m, lim in key.model_limits.items()},
        "expires_at": key.expires_at,
        "revoked": key.revoked,
        "created_at": key.created_at,
    }
