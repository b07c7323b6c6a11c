"""Per-key limits counted in Redis: the Lua script, its batched calls, and leases.

In Redis one Lua script checks and charges every bucket of a request atomically, so N replicas
share one budget without ever exceeding it. The script takes a batch: the settlements and
admissions that arrived while the previous call was in flight go out together in one EVALSHA
(settlements first; the batch is one argument, the answer one string).

Leases: far from its limits a set of buckets is charged for up to LEASE_MAX requests in one call
(at most 1/LEASE_PART of each bucket's requests left, and of its tokens left counting a request
as max(reservation, LEASE_TOKENS) tokens), together with a token allowance (1/LEASE_PART of the
tokens left), and this replica admits the next requests against that lease without a call. The
lease shrinks with the room: under 2 x LEASE_PART requests (or 2 x LEASE_PART requests' tokens)
left it is 1, and every admission is the exact check. Settlements of a leased set of buckets move
its allowance instead of costing a call; a request that used more than the allowance holds is
sent at once, an allowance grown past its grant goes back within FLUSH seconds or with the next
call. The next lease is asked for when a quarter of the last one is left (requests need not
wait for it) and adds to that rest; a lease's rest goes back to Redis when a request finds the
lease short (in the call that asks for the next one) and on close().
Bounds: never more than a limit is admitted (leases are charged atomically within it). A lease
belongs to its window: its unused rest at the window's end is lost, so a window may admit fewer
than its limit, by at most the unused leases the replicas hold then (each at most 1.25 x
min(LEASE_MAX, limit / LEASE_PART) requests); a request is refused only when the admitted
requests and the unused leases fill the limit. While on a lease, x-ratelimit-remaining-* count
Redis's figure when the lease was taken less this replica's use since: other replicas' leases
count as used, their use since is not seen (exact for one replica).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.auth.limits import _Plan

log = logging.getLogger(__name__)

LEASE_MAX = 64  # requests in one lease, at most
LEASE_PART = 16  # a lease takes at most 1/LEASE_PART of a bucket's room (requests and tokens) left
LEASE_TOKENS = 32  # tokens a request counts for, at least, when sizing a lease against a token limit
FLUSH = 0.1  # seconds a lease's token correction may wait for a call to ride along with

# One batch of settlements and admissions, as one argument of NUL-separated fields (so that the
# client encodes four arguments per call however large the batch; counter names are passed in
# this argument, not as KEYS: fine for one Redis server, not for Redis Cluster):
#   ttl, LEASE_PART, LEASE_TOKENS, settlement count, per settlement: counter count, correction,
#   its counters (token counters; request counters for a lease's unused requests given back);
#   admission count, per admission: bucket count n, reservation, requests wanted (1: exact, else
#   a lease of up to that many), n x (rpm, tpm) (-1: none), n x (request counter, token counter).
# Returns, space-separated, per admission: admitted (1/0), requests charged (the lease; 1: exact),
# tokens charged (the reservation, or the lease's allowance), then per bucket requests and tokens
# used (after charging when admitted). A counter whose window has passed is gone: a settlement
# leaves it (INCRBY would recreate it without an expiry).
_BATCH_LUA = """
local field = string.gmatch(ARGV[1], '[^%z]+')
local function num() return tonumber(field()) end
local ttl, part, per = num(), num(), num()
for _ = 1, num() do
  local n, delta = num(), num()
  for _ = 1, n do
    local key = field()
    if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, delta) end
  end
end
local out = {}
for _ = 1, num() do
  local n, reserve, want = num(), num(), num()
  local bounds, names, used = {}, {}, {}
  for i = 1, 2 * n do bounds[i] = num() end
  for i = 1, 2 * n do names[i] = field() end
  local ok, lease, grant, room = 1, want, reserve, nil
  local share = part * math.max(reserve, per)  -- a request's tokens, for sizing a lease
  local got = redis.call('MGET', unpack(names))
  for i = 1, n do
    local r = tonumber(got[2 * i - 1] or '0')
    local t = tonumber(got[2 * i] or '0')
    local rpm, tpm = bounds[2 * i - 1], bounds[2 * i]
    if rpm >= 0 and r + 1 > rpm then ok = 0 end
    if tpm >= 0 and (t >= tpm or t + math.min(reserve, tpm) > tpm) then ok = 0 end
    if rpm >= 0 then lease = math.min(lease, math.floor((rpm - r) / part)) end
    if tpm >= 0 then
      lease = math.min(lease, math.floor((tpm - t) / share))
      room = math.min(room or tpm, math.floor((tpm - t) / part))
    end
    used[2 * i - 1] = r
    used[2 * i] = t
  end
  if room then grant = room end
  if lease < 2 then lease, grant = 1, reserve end  -- near a limit: exact
  if ok == 1 then
    for i = 1, n do
      used[2 * i - 1] = redis.call('INCRBY', names[2 * i - 1], lease)
      used[2 * i] = redis.call('INCRBY', names[2 * i], grant)
      if used[2 * i - 1] == lease then  -- the bucket's first charge this window: both counters are new
        redis.call('EXPIRE', names[2 * i - 1], ttl)
        redis.call('EXPIRE', names[2 * i], ttl)
      end
    end
  else
    lease, grant = 0, 0
  end
  out[#out + 1] = string.format('%d %d %d', ok, lease, grant)
  for i = 1, 2 * n do out[#out + 1] = string.format('%d', used[i]) end
end
return table.concat(out, ' ')
"""
_SEP = "\0"  # between the batch's fields (never in a counter name: names come from key ids and model names)


class _Lease:
    """This replica's lease on one set of buckets in one window (Redis): requests and tokens
    charged there and not yet used here. `granted` is the token allowance taken; settlements move
    `tokens` (down when a request used more than it reserved, up when less): below 0 the debt is
    sent to Redis at once, above `granted` the surplus with the next call (or after FLUSH
    seconds). `seen` are the buckets' counts in Redis right after the lease was taken (for the
    headers)."""

    __slots__ = (
        "leased",
        "asking",
        "size",
        "low",
        "requests",
        "tokens",
        "granted",
        "seen",
        "deferred",
        "rnames",
        "tnames",
    )

    def __init__(self, rnames: list[str], tnames: list[str]) -> None:
        self.leased = False
        self.asking: asyncio.Future[None] | None = None  # done when the call asking for a lease returns
        self.size = 0  # requests in the last lease taken (1: exact, near a limit)
        self.low = (0, 0)  # requests and tokens left at which the next lease is asked for ahead
        self.requests = self.tokens = self.granted = 0
        self.seen: list[int] = []
        self.deferred = False  # a surplus waits for a call (see _Batches.defer)
        self.rnames = rnames  # request counters, to give unused requests back
        self.tnames = tnames  # token counters; empty when no bucket limits tokens

    def take(self, reserve: int) -> bool:
        """Admit one request on the lease, if it has room."""
        if self.leased and self.requests > 0 and (not self.tnames or 0 < self.tokens >= reserve):
            self.requests -= 1
            self.tokens -= reserve
            return True
        return False

    def low_on_room(self) -> bool:
        """Time to ask for the next lease ahead (not near a limit: there each request asks)."""
        return (
            self.size > 1
            and self.asking is None
            and (self.requests <= self.low[0] or (bool(self.tnames) and self.tokens <= self.low[1]))
        )

    def add(self, requests: int, tokens: int, granted: int, seen: list[int]) -> None:
        """A lease taken: added to what is left of the last one (the next request takes from it)."""
        if not self.leased:
            self.requests = self.tokens = 0
        self.leased = True
        self.requests += requests
        self.tokens += tokens
        self.granted = granted
        self.low = (self.size // 4, granted // 4) if self.size > 1 else (0, 0)
        self.seen = seen

    def hold(self, tokens: int) -> int:
        """Keep `tokens` of allowance; returns what Redis's token counts must change by (`seen`
        follows them, so that the headers do not move). A lease answered meanwhile, its counts
        taken before that change reached Redis, reports the change as used until the next lease."""
        delta = tokens - self.tokens
        self.tokens = tokens
        self.seen = [n + delta if i & 1 else n for i, n in enumerate(self.seen)]
        return delta

    def keep(self, requests: int) -> int:
        """Keep `requests`; returns what Redis's request counts must change by (as `hold`)."""
        delta = requests - self.requests
        self.requests = requests
        self.seen = [n if i & 1 else n + delta for i, n in enumerate(self.seen)]
        return delta

    def used(self) -> list[int]:
        """Each bucket's [requests, tokens] as the headers count them: Redis's count at lease time
        less what this lease has not used yet (other replicas' leases count as used)."""
        r, t = self.requests, self.tokens
        return [n - (t if i & 1 else r) for i, n in enumerate(self.seen)]


_Admit = tuple["_Plan", int, int, "asyncio.Future[list[int]]"]  # plan, reservation, lease wanted, answer


class _Batches:
    """Admissions and settlements for Redis, sent as one script call per batch: one call in
    flight at a time; whatever arrives meanwhile goes out together when it returns. Leases'
    corrections (deferred) ride along with the next call, or start one after FLUSH seconds."""

    def __init__(self, redis: Any, window: float) -> None:
        self._script = redis.register_script(_BATCH_LUA)
        self._window = window  # the limits' window (counters expire 5 s after theirs ends)
        self._admits: list[_Admit] = []
        self._settles: list[tuple[list[str], int]] = []
        self._deferred: dict[int, _Lease] = {}
        self._since = 0.0  # when the oldest deferral not yet sent came
        self._timer: asyncio.TimerHandle | None = None
        self._pump: asyncio.Task[None] | None = None

    def admit(self, plan: _Plan, reserve: int, want: int) -> asyncio.Future[list[int]]:
        """A future of the script's answer for this request: {admitted, lease requests, lease
        tokens, used per counter...}."""
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._admits.append((plan, reserve, want, future))
        self._start()
        return future

    def settle(self, counters: list[str], delta: int) -> None:
        self._settles.append((counters, delta))
        self._start()

    def defer(self, lease: _Lease) -> None:
        if not self._deferred:
            self._since = time.monotonic()
        self._deferred[id(lease)] = lease
        lease.deferred = True
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH, self._flush)

    def _flush(self) -> None:
        """Send what waited FLUSH seconds for a call to ride along with (usually none did)."""
        self._timer = None
        if self._deferred:
            wait = self._since + FLUSH - time.monotonic()
            if wait > 0.001:  # collected by a call since, and deferred again later
                self._timer = asyncio.get_running_loop().call_later(wait, self._flush)
                return
            self._collect()
            self._start()

    def _collect(self) -> None:
        """Bring the deferred leases' token allowances back within 0..granted, in Redis."""
        for lease in self._deferred.values():
            lease.deferred = False
            if lease.leased:  # else given back whole meanwhile
                keep = min(max(lease.tokens, 0), lease.granted)
                if keep != lease.tokens:
                    self._settles.append((lease.tnames, lease.hold(keep)))
        self._deferred.clear()

    def _start(self) -> None:
        if self._pump is None:
            self._pump = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._collect()
        if self._settles or self._admits:
            self._start()
        while self._pump is not None:
            await asyncio.shield(self._pump)

    async def _run(self) -> None:
        try:
            while self._admits or self._settles:
                if self._deferred:
                    self._collect()
                admits, self._admits = self._admits, []
                settles, self._settles = self._settles, []
                await self._send(admits, settles)
        finally:
            self._pump = None

    async def _send(self, admits: list[_Admit], settles: list[tuple[list[str], int]]) -> None:
        fields = [str(int(self._window) + 5), str(LEASE_PART), str(LEASE_TOKENS), str(len(settles))]
        for counters, delta in settles:
            fields += (str(len(counters)), str(delta), *counters)
        fields.append(str(len(admits)))
        fields += (
            f"{len(plan.limits)}{_SEP}{reserve}{_SEP}{want}{_SEP}{plan.fields}" for plan, reserve, want, _ in admits
        )
        try:
            result = await self._script(keys=[], args=[_SEP.join(fields)])
        except Exception as exc:  # Redis gone: the admissions are refused by their callers
            for *_, future in admits:
                if not future.done():
                    future.set_exception(ConnectionError(str(exc) or type(exc).__name__))
            if settles:  # the windows' counts stay at the reservations
                log.warning("could not settle %d token counts: %s", len(settles), exc)
            return
        values = result.split()
        at = 0
        for plan, _, _, future in admits:
            end = at + 3 + len(plan.names)
            if not future.done():  # a request cancelled meanwhile stays charged, as if it had run
                future.set_result([int(v) for v in values[at:end]])
            at = end
