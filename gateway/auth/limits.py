"""Per-key limits: requests and tokens per minute, per key and optionally per model.

Fixed one-minute windows (the reset is the window's end, as OpenAI's headers say), counted in
this process or in Redis (one Lua script: every bucket of a request is checked and charged
atomically, so N replicas share one budget exactly). A request is admitted while its buckets have
a request left and their tokens used plus its reservation (`max_tokens`, capped at the limit) fit;
the reservation is settled to the real count when the answer is done (one more script call).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.auth.keys import ApiKey, Limit

WINDOW = 60.0
_NONE = -1  # no limit, in the Lua script's arguments

# KEYS: per bucket its request and token counters; ARGV: reserve, ttl, then per bucket rpm, tpm.
# Returns {admitted, then per bucket requests and tokens used (after charging when admitted)}.
_ADMIT_LUA = """
local reserve = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local n = #KEYS / 2
local used = {}
local ok = 1
for i = 1, n do
  local r = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0')
  local t = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
  local rpm = tonumber(ARGV[1 + 2 * i])
  local tpm = tonumber(ARGV[2 + 2 * i])
  if rpm >= 0 and r + 1 > rpm then ok = 0 end
  if tpm >= 0 and (t >= tpm or t + math.min(reserve, tpm) > tpm) then ok = 0 end
  used[2 * i - 1] = r
  used[2 * i] = t
end
if ok == 1 then
  for i = 1, n do
    used[2 * i - 1] = redis.call('INCR', KEYS[2 * i - 1])
    used[2 * i] = redis.call('INCRBY', KEYS[2 * i], reserve)
    redis.call('EXPIRE', KEYS[2 * i - 1], ttl)
    redis.call('EXPIRE', KEYS[2 * i], ttl)
  end
end
table.insert(used, 1, ok)
return used
"""


# KEYS: the token counters of an admitted request's buckets; ARGV: the correction. A counter whose
# window has passed is gone: nothing to correct (INCRBY would recreate it without an expiry).
_SETTLE_LUA = """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, ARGV[1]) end
end
return 0
"""


@dataclass(slots=True)
class Admission:
    """One admitted request's charge, settled when its token count is known."""

    counters: list[str]  # the token counter of each bucket
    reserved: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    settled: bool = False


class RateLimited(Exception):
    def __init__(self, retry_after: float, headers: list[tuple[bytes, bytes]], what: str) -> None:
        super().__init__(what)
        self.retry_after = retry_after
        self.headers = headers
        self.what = what


def buckets(key: ApiKey, model: str) -> list[tuple[str, Limit]]:
    """The limits a request by `key` for `model` is counted against (unlimited ones left out)."""
    out = []
    if key.limit.rpm is not None or key.limit.tpm is not None:
        out.append((f"k:{key.id}", key.limit))
    per_model = key.model_limits.get(model)
    if per_model is not None and (per_model.rpm is not None or per_model.tpm is not None):
        out.append((f"k:{key.id}:m:{model}", per_model))
    return out


def duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `12s`, `1m5s`."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


_REQUESTS = (b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests")
_TOKENS = (b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens")


def _headers(limits: list[Limit], used: list[int], reset: float) -> list[tuple[bytes, bytes]]:
    """x-ratelimit-* for the tightest bucket of each kind (used: requests, tokens per bucket)."""
    requests: tuple[int, int] | None = None  # (limit, left) of the tightest bucket
    tokens: tuple[int, int] | None = None
    for i, lim in enumerate(limits):
        if lim.rpm is not None and (requests is None or lim.rpm - used[2 * i] < requests[1]):
            requests = (lim.rpm, lim.rpm - used[2 * i])
        if lim.tpm is not None and (tokens is None or lim.tpm - used[2 * i + 1] < tokens[1]):
            tokens = (lim.tpm, lim.tpm - used[2 * i + 1])
    out: list[tuple[bytes, bytes]] = []
    reset_text = duration(reset).encode()
    for names, tightest in ((_REQUESTS, requests), (_TOKENS, tokens)):
        if tightest is not None:
            out += [
                (names[0], str(tightest[0]).encode()),
                (names[1], str(max(0, tightest[1])).encode()),
                (names[2], reset_text),
            ]
    return out


def _arg(value: int | None) -> int:
    return _NONE if value is None else value


class Limiter:
    """Counts in memory, or in Redis when `redis` (a redis.asyncio client) is given."""

    def __init__(self, redis: Any = None, prefix: str = "gateway:rl:") -> None:
        self.redis = redis
        self.prefix = prefix
        self._script = redis.register_script(_ADMIT_LUA) if redis is not None else None
        self._settle = redis.register_script(_SETTLE_LUA) if redis is not None else None
        self._counts: dict[str, int] = {}
        self._plans: dict[tuple[int, str], tuple[ApiKey, int, tuple[list[Limit], list[str]] | None]] = {}
        self._window = -1

    async def admit(self, key: ApiKey, model: str, reserve: int) -> Admission | None:
        """Charge one request and `reserve` tokens, or raise RateLimited; None when unlimited."""
        now = time.time()
        window = int(now // WINDOW)
        plan = self._plan(key, model, window)
        if plan is None:
            return None
        limits, names = plan
        reset = (window + 1) * WINDOW - now
        reserve = max(0, reserve)
        if self._script is not None:
            args = [reserve, int(WINDOW) + 5] + [a for lim in limits for a in (_arg(lim.rpm), _arg(lim.tpm))]
            result = [int(v) for v in await self._script(keys=names, args=args)]
            ok, used = result[0] == 1, result[1:]
        else:
            ok, used = self._admit_here(window, names, limits, reserve)
        headers = _headers(limits, used, reset)
        if not ok:
            raise RateLimited(reset, headers, _what(limits, used))
        return Admission(names[1::2], reserve, headers)

    def _plan(self, key: ApiKey, model: str, window: int) -> tuple[list[Limit], list[str]] | None:
        """The key's limits for `model` and their counter names in `window`, built once per key,
        model and minute (this runs on every request of a limited key)."""
        cached = self._plans.get((id(key), model))
        if cached is not None and cached[0] is key and cached[1] == window:
            return cached[2]
        chosen = buckets(key, model)
        plan = None
        if chosen:
            names = [f"{self.prefix}{name}:{window}:{kind}" for name, _ in chosen for kind in ("r", "t")]
            plan = ([lim for _, lim in chosen], names)
        if len(self._plans) > 10_000:  # keys replaced by reloads leave stale entries
            self._plans.clear()
        self._plans[(id(key), model)] = (key, window, plan)
        return plan

    def _admit_here(self, window: int, names: list[str], limits: list[Limit], reserve: int) -> tuple[bool, list[int]]:
        if window != self._window:  # a new minute: every old counter has expired
            self._counts.clear()
            self._window = window
        counts = self._counts
        used = [counts.get(n, 0) for n in names]
        ok = True
        for i, lim in enumerate(limits):
            r, t = used[2 * i], used[2 * i + 1]
            if lim.rpm is not None and r + 1 > lim.rpm:
                ok = False
            if lim.tpm is not None and (t >= lim.tpm or t + min(reserve, lim.tpm) > lim.tpm):
                ok = False
        if ok:
            for i in range(len(limits)):
                used[2 * i] = counts[names[2 * i]] = used[2 * i] + 1
                used[2 * i + 1] = counts[names[2 * i + 1]] = used[2 * i + 1] + reserve
        return ok, used

    async def settle(self, admission: Admission, tokens: int) -> None:
        """Replace the reservation by the tokens really used (prompt + completion)."""
        if admission.settled:
            return
        admission.settled = True
        delta = tokens - admission.reserved
        if delta == 0:
            return
        if self._settle is not None:
            await self._settle(keys=admission.counters, args=[delta])
        else:
            for name in admission.counters:
                if name in self._counts:  # a counter of a past window is gone with it
                    self._counts[name] += delta


def _what(limits: list[Limit], used: list[int]) -> str:
    for i, lim in enumerate(limits):
        if lim.rpm is not None and used[2 * i] + 1 > lim.rpm:
            return f"requests per minute ({lim.rpm})"
    return "tokens per minute"
