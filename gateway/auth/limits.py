"""Per-key limits: requests and tokens per minute, per key and optionally per model.

Fixed one-minute windows (the reset is the window's end, as OpenAI's headers say), counted in
this process or in Redis. A request is admitted while its buckets have a request left and their
tokens used plus its reservation (`max_tokens`, capped at the limit) fit; the reservation is
settled to the real count when the answer is done.

In Redis one Lua script checks and charges every bucket of a request atomically, so N replicas
share one budget exactly. The script takes a batch: the settlements and admissions that arrived
while the previous call was in flight go out together in one EVALSHA (settlements first), so
under load a request costs a fraction of a round trip instead of two (and the client's work per
call does not grow with the batch: the batch is one argument, the answer one string).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.auth.keys import ApiKey, Limit

log = logging.getLogger(__name__)

WINDOW = 60.0
_NONE = -1  # no limit, in the Lua script's arguments

# One batch of settlements and admissions, as one argument of NUL-separated fields (so that the
# client encodes four arguments per call however large the batch; counter names are passed in
# this argument, not as KEYS: fine for one Redis server, not for Redis Cluster):
#   ttl, settlement count, per settlement: counter count, correction, its token counters;
#   admission count, per admission: bucket count n, reservation, n x (rpm, tpm) (-1: none),
#   n x (request counter, token counter).
# Returns, space-separated, per admission: admitted (1/0), then per bucket requests and tokens
# used (after charging when admitted). A token counter whose window has passed is gone: a
# settlement leaves it (INCRBY would recreate it without an expiry).
_BATCH_LUA = """
local field = string.gmatch(ARGV[1], '[^%z]+')
local function num() return tonumber(field()) end
local ttl = num()
for _ = 1, num() do
  local n, delta = num(), num()
  for _ = 1, n do
    local key = field()
    if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, delta) end
  end
end
local out = {}
for _ = 1, num() do
  local n, reserve = num(), num()
  local bounds, names, used = {}, {}, {}
  for i = 1, 2 * n do bounds[i] = num() end
  for i = 1, 2 * n do names[i] = field() end
  local ok = 1
  local got = redis.call('MGET', unpack(names))
  for i = 1, n do
    local r = tonumber(got[2 * i - 1] or '0')
    local t = tonumber(got[2 * i] or '0')
    local rpm, tpm = bounds[2 * i - 1], bounds[2 * i]
    if rpm >= 0 and r + 1 > rpm then ok = 0 end
    if tpm >= 0 and (t >= tpm or t + math.min(reserve, tpm) > tpm) then ok = 0 end
    used[2 * i - 1] = r
    used[2 * i] = t
  end
  if ok == 1 then
    for i = 1, n do
      used[2 * i - 1] = redis.call('INCR', names[2 * i - 1])
      used[2 * i] = redis.call('INCRBY', names[2 * i], reserve)
      if used[2 * i - 1] == 1 then  -- the bucket's first request this window: both counters are new
        redis.call('EXPIRE', names[2 * i - 1], ttl)
        redis.call('EXPIRE', names[2 * i], ttl)
      end
    end
  end
  out[#out + 1] = ok
  for i = 1, 2 * n do out[#out + 1] = string.format('%d', used[i]) end
end
return table.concat(out, ' ')
"""
_SEP = "\0"  # between the batch's fields (never in a counter name: names come from key ids and model names)


@dataclass(slots=True)
class Admission:
    """One admitted request's charge, settled when its token count is known."""

    counters: list[str]  # the token counter of each bucket (Redis)
    reserved: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    cells: list[list[int]] = field(default_factory=list)  # each bucket's [requests, tokens] (in memory)
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


_RESET_TEXT: dict[int, bytes] = {}  # duration() by whole second (ms below one): at most ~1,060 entries


def _reset_text(seconds: float) -> bytes:
    slot = math.ceil(seconds) if seconds >= 1 else -max(1, round(seconds * 1000))
    text = _RESET_TEXT.get(slot)
    if text is None:
        text = _RESET_TEXT[slot] = duration(seconds).encode()
    return text


_REQUESTS = (b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests")
_TOKENS = (b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens")


class _Plan:
    """A key's limits for one model in one window: bucket limits, counter names, script arguments,
    and (counted in memory) the buckets' [requests, tokens] cells, shared with the other plans of
    the same bucket. Built once per key, model and minute (this runs on every request of a
    limited key)."""

    __slots__ = ("key", "window", "limits", "names", "counters", "bounds", "cells", "rpm", "tpm", "fields")

    def __init__(
        self, key: ApiKey, window: int, chosen: list[tuple[str, Limit]], prefix: str, cells: dict[str, list[int]]
    ) -> None:
        self.key = key
        self.window = window
        self.limits = [lim for _, lim in chosen]
        self.names = [f"{prefix}{name}:{window}:{kind}" for name, _ in chosen for kind in ("r", "t")]
        self.counters = self.names[1::2]
        self.bounds = [_arg(v) for lim in self.limits for v in (lim.rpm, lim.tpm)]  # -1: none
        self.cells = [cells.setdefault(name, [0, 0]) for name in self.names[::2]]
        # (index in `used`, limit, its header text) of the buckets with a request or token limit
        self.rpm = [(2 * i, lim.rpm, b"%d" % lim.rpm) for i, lim in enumerate(self.limits) if lim.rpm is not None]
        self.tpm = [(2 * i + 1, lim.tpm, b"%d" % lim.tpm) for i, lim in enumerate(self.limits) if lim.tpm is not None]
        self.fields = _SEP.join(str(v) for v in (*self.bounds, *self.names))  # the script's, after the reservation

    def headers(self, used: list[int], reset: float) -> list[tuple[bytes, bytes]]:
        """x-ratelimit-* for the tightest bucket of each kind (used: requests, tokens per bucket)."""
        reset_text = _reset_text(reset)
        out: list[tuple[bytes, bytes]] = []
        for names, limited in ((_REQUESTS, self.rpm), (_TOKENS, self.tpm)):
            if limited:
                at, limit, text = limited[0]
                left = limit - used[at]
                for at, other, other_text in limited[1:]:
                    if other - used[at] < left:
                        left, text = other - used[at], other_text
                out += ((names[0], text), (names[1], b"%d" % (left if left > 0 else 0)), (names[2], reset_text))
        return out


def _arg(value: int | None) -> int:
    return _NONE if value is None else value


class Limiter:
    """Counts in memory, or in Redis when `redis` (a redis.asyncio client) is given."""

    def __init__(self, redis: Any = None, prefix: str = "gateway:rl:") -> None:
        self.redis = redis
        self.prefix = prefix
        self._batches = _Batches(redis) if redis is not None else None
        self._cells: dict[str, list[int]] = {}  # in memory: [requests, tokens] per bucket this window
        self._plans: dict[tuple[int, str], _Plan] = {}
        self._window = -1

    async def admit(self, key: ApiKey, model: str, reserve: int) -> Admission | None:
        """Charge one request and `reserve` tokens, or raise RateLimited; None when unlimited."""
        now = time.time()
        window = int(now // WINDOW)
        plan = self._plan(key, model, window)
        if plan is None:
            return None
        reset = (window + 1) * WINDOW - now
        reserve = max(0, reserve)
        if self._batches is not None:
            used = await self._batches.admit(plan, reserve)
            ok = used.pop(0) == 1
        else:
            ok, used = self._admit_here(plan, reserve)
        headers = plan.headers(used, reset)
        if not ok:
            raise RateLimited(reset, headers, _what(plan.limits, used))
        return Admission(plan.counters, reserve, headers, plan.cells)

    def _plan(self, key: ApiKey, model: str, window: int) -> _Plan | None:
        plan = self._plans.get((id(key), model))
        if plan is None or plan.key is not key or plan.window != window:
            if window != self._window:  # a new minute: every old counter has expired
                self._cells = {}
                self._window = window
            if len(self._plans) > 10_000:  # keys replaced by reloads leave stale entries
                self._plans.clear()
            chosen = buckets(key, model)
            plan = self._plans[(id(key), model)] = _Plan(key, window, chosen, self.prefix, self._cells)
        return plan if plan.names else None  # no names: nothing to count

    @staticmethod
    def _admit_here(plan: _Plan, reserve: int) -> tuple[bool, list[int]]:
        cells = plan.cells
        bounds = plan.bounds
        used = [n for cell in cells for n in cell]
        for i in range(0, len(bounds), 2):
            rpm, tpm = bounds[i], bounds[i + 1]
            t = used[i + 1]
            if (rpm >= 0 and used[i] >= rpm) or (tpm >= 0 and (t >= tpm or t + min(reserve, tpm) > tpm)):
                return False, used
        for i, cell in enumerate(cells):
            used[2 * i] = cell[0] = cell[0] + 1
            used[2 * i + 1] = cell[1] = cell[1] + reserve
        return True, used

    def settle(self, admission: Admission, tokens: int) -> None:
        """Replace the reservation by the tokens really used (prompt + completion). In Redis the
        correction goes out with the next batch, without waiting for it (`close` does)."""
        if admission.settled:
            return
        admission.settled = True
        delta = tokens - admission.reserved
        if delta == 0:
            return
        if self._batches is not None:
            self._batches.settle(admission.counters, delta)
        else:
            for cell in admission.cells:  # a past window's cells are no longer counted: no effect
                cell[1] += delta

    async def close(self) -> None:
        """Wait for the settlements still on their way to Redis."""
        if self._batches is not None:
            await self._batches.close()


class _Batches:
    """Admissions and settlements for Redis, sent as one script call per batch: one call in
    flight at a time; whatever arrives meanwhile goes out together when it returns."""

    def __init__(self, redis: Any) -> None:
        self._script = redis.register_script(_BATCH_LUA)
        self._admits: list[tuple[_Plan, int, asyncio.Future[list[int]]]] = []
        self._settles: list[tuple[list[str], int]] = []
        self._pump: asyncio.Task[None] | None = None

    def admit(self, plan: _Plan, reserve: int) -> asyncio.Future[list[int]]:
        """A future of the script's answer for this request: {admitted, used per counter...}."""
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._admits.append((plan, reserve, future))
        self._start()
        return future

    def settle(self, counters: list[str], delta: int) -> None:
        self._settles.append((counters, delta))
        self._start()

    def _start(self) -> None:
        if self._pump is None:
            self._pump = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        while self._pump is not None:
            await asyncio.shield(self._pump)

    async def _run(self) -> None:
        try:
            while self._admits or self._settles:
                admits, self._admits = self._admits, []
                settles, self._settles = self._settles, []
                await self._send(admits, settles)
        finally:
            self._pump = None

    async def _send(
        self, admits: list[tuple[_Plan, int, asyncio.Future[list[int]]]], settles: list[tuple[list[str], int]]
    ) -> None:
        fields = [str(int(WINDOW) + 5), str(len(settles))]
        for counters, delta in settles:
            fields += (str(len(counters)), str(delta), *counters)
        fields.append(str(len(admits)))
        fields += (f"{len(plan.limits)}{_SEP}{reserve}{_SEP}{plan.fields}" for plan, reserve, _ in admits)
        try:
            result = await self._script(keys=[], args=[_SEP.join(fields)])
        except Exception as exc:  # Redis gone: the admissions are refused by their callers
            for _, _, future in admits:
                if not future.done():
                    future.set_exception(ConnectionError(str(exc) or type(exc).__name__))
            if settles:  # the windows' counts stay at the reservations
                log.warning("could not settle %d token counts: %s", len(settles), exc)
            return
        values = result.split()
        at = 0
        for plan, _, future in admits:
            end = at + 1 + len(plan.names)
            if not future.done():  # a request cancelled meanwhile stays charged, as if it had run
                future.set_result([int(v) for v in values[at:end]])
            at = end


def _what(limits: list[Limit], used: list[int]) -> str:
    for i, lim in enumerate(limits):
        if lim.rpm is not None and used[2 * i] + 1 > lim.rpm:
            return f"requests per minute ({lim.rpm})"
    return "tokens per minute"
