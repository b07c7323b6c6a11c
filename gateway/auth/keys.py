"""API keys: what a key may do, how it is recognised (by its SHA-256 digest only), and the ring of
keys the middleware consults on every request."""

from __future__ import annotations

import enum
import hashlib
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field


class KeyScope(str, enum.Enum):
    INFERENCE = "inference"  # the OpenAI, HF and TGI APIs
    METRICS = "metrics"  # /metrics (unless public) and the UI's data endpoint
    ADMIN = "admin"  # /admin/*: keys, usage, models


ALL_SCOPES = frozenset(KeyScope)
TOKEN_PREFIX = "gw-"


@dataclass(frozen=True, slots=True)
class Limit:
    """Requests and tokens (prompt + completion) per minute; None is unlimited."""

    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str  # stable, public: names the key in the admin API
    name: str  # the owner, in logs, metrics and RequestContext.identity
    digest: bytes  # sha256 of the token; the token itself is never stored
    scopes: frozenset[KeyScope] = ALL_SCOPES
    models: frozenset[str] | None = None  # configured names this key may use; None: every model
    limit: Limit = Limit()
    model_limits: dict[str, Limit] = field(default_factory=dict)  # per configured model name
    expires_at: float | None = None  # unix time
    revoked: bool = False
    created_at: float = 0.0

    def usable(self, now: float) -> bool:
        return not self.revoked and (self.expires_at is None or now < self.expires_at)

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def visibility(self) -> str:
        """Keys with the same visibility may share cached answers (they see the same models)."""
        return "*" if self.models is None else ",".join(sorted(self.models))


def digest(token: str) -> bytes:
    # Keys are random 256-bit tokens, so one fast hash is enough: there is nothing to brute-force
    # (a password hash like bcrypt would cost milliseconds on every request).
    return hashlib.sha256(token.encode()).digest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def config_keys(tokens: Iterable[str]) -> list[ApiKey]:
    """`server.api_keys`: full-power keys, as before scopes existed."""
    return [ApiKey(id=f"config-{i}", name=f"config-{i}", digest=digest(t)) for i, t in enumerate(tokens)]


class KeyRing:
    """Every key the gateway accepts, indexed by digest for the hot path."""

    CACHED = 10_000  # Authorization values remembered (see `from_header`); a bound, not a tuning knob

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self._by_digest: dict[bytes, ApiKey] = {}
        self._by_header: dict[bytes, ApiKey] = {}
        self.replace(keys)

    def replace(self, keys: Iterable[ApiKey]) -> None:
        self._by_digest = {k.digest: k for k in keys}
        self._by_header = {}  # a revoked or changed key must not be found from a remembered header

    def all(self) -> list[ApiKey]:
        return list(self._by_digest.values())

    def __len__(self) -> int:
        return len(self._by_digest)

    def authenticate(self, token: str, now: float | None = None) -> ApiKey | None:
        """The usable key `token` is, or None. The dict lookup is on the digest, which an attacker
        cannot steer toward a stored one; the final comparison is constant-time anyway."""
        d = digest(token)
        key = self._by_digest.get(d)
        if key is None or not secrets.compare_digest(key.digest, d):
            return None
        return key if key.usable(time.time() if now is None else now) else None

    def from_header(self, value: bytes, now: float | None = None) -> ApiKey | None:
        """The usable key an `Authorization: Bearer <token>` header value carries, or None.

        Every request of a client sends the same value, so the key found for it is remembered
        by the value itself and the next request skips the parsing and the hash (measured on the
        team benchmark's hot path). Only values that named a real key are remembered, so a
        stream of wrong tokens cannot grow the table; expiry is still checked each time, and a
        reload forgets them all. The tokens stay in this process's memory, where every request's
        headers already are; they are never written anywhere.
        """
        key = self._by_header.get(value)
        if key is None:
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                return None
            key = self.authenticate(token, now)
            if key is not None and len(self._by_header) < self.CACHED:
                self._by_header[value] = key
            return key
        return key if key.usable(time.time() if now is None else now) else None
