"""Per-key limits: requests and tokens per minute, per key and optionally per model.

Fixed one-minute windows (the reset is the window's end, as OpenAI's headers say), counted in
this process or in Redis. A request is admitted while its buckets have a request left and their
tokens used plus its reservation (`max_tokens`, capped at the limit) fit; the reservation is
settled to the real count when the answer is done.

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
import math
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.auth.keys import ApiKey, Limit

log = logging.getLogger(__name__)

WINDOW = 60.0
_NONE = -1  # no limit, in the Lua script's arguments
_NEVER = 1 << 62  # no limit, in the in-memory checks: a count never reached
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


@dataclass(slots=True)
class Admission:
    """One admitted request's charge, settled when its token count is known."""

    counters: list[str]  # the token counter of each bucket (Redis); empty when no bucket limits tokens
    reserved: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    cells: list[list[int]] = field(default_factory=list)  # each bucket's [requests, tokens] (in memory)
    lease: _Lease | None = None  # its buckets' lease (Redis), where a settlement may be absorbed
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


class _Plan:
    """A key's limits for one model in one window: bucket limits, counter names, script arguments,
    and (counted in memory) the buckets' [requests, tokens] cells, shared with the other plans of
    the same bucket, or (in Redis) the lease of its set of buckets, shared likewise. Built once per
    key, model and minute (this runs on every request of a limited key)."""

    __slots__ = (
        "key",
        "window",
        "limits",
        "names",
        "counters",
        "checks",
        "cells",
        "kinds",
        "cell_kinds",
        "fields",
        "lease",
    )

    def __init__(
        self,
        key: ApiKey,
        window: int,
        chosen: list[tuple[str, Limit]],
        prefix: str,
        cells: dict[str, list[int]],
        leases: dict[str, _Lease] | None,
    ) -> None:
        self.key = key
        self.window = window
        self.limits = [lim for _, lim in chosen]
        self.names = [f"{prefix}{name}:{window}:{kind}" for name, _ in chosen for kind in ("r", "t")]
        bounds = [_arg(v) for lim in self.limits for v in (lim.rpm, lim.tpm)]  # -1: none
        self.cells = [cells.setdefault(name, [0, 0]) for name in self.names[::2]]
        # (cell, rpm, tpm) per bucket for the in-memory check; an absent limit is one never reached
        self.checks = [
            (cell, _never(lim.rpm), _never(lim.tpm)) for cell, lim in zip(self.cells, self.limits, strict=True)
        ]
        # (index in `used`, limit, its header text) of the buckets with a request or token limit
        rpm = [(2 * i, lim.rpm, b"%d" % lim.rpm) for i, lim in enumerate(self.limits) if lim.rpm is not None]
        tpm = [(2 * i + 1, lim.tpm, b"%d" % lim.tpm) for i, lim in enumerate(self.limits) if lim.tpm is not None]
        self.kinds = [(names, limited) for names, limited in ((_REQUESTS, rpm), (_TOKENS, tpm)) if limited]
        # the same read from the cells (in memory): (cell, 0 requests / 1 tokens, limit, its text)
        self.cell_kinds = [
            (names, [(self.cells[at >> 1], at & 1, limit, text) for at, limit, text in limited])
            for names, limited in self.kinds
        ]
        # Without a token limit nothing reads the token counts: settlements are skipped.
        self.counters = self.names[1::2] if tpm else []
        self.fields = _SEP.join(str(v) for v in (*bounds, *self.names))  # the script's, after the reservation
        self.lease = None if leases is None else leases.get(self.fields)
        if self.lease is None and leases is not None:
            self.lease = leases[self.fields] = _Lease(self.names[::2], self.counters)

    def headers_here(self, reset: float) -> list[tuple[bytes, bytes]]:
        """`headers` from the cells (in memory), as they stand."""
        reset_text = _reset_text(reset)
        out: list[tuple[bytes, bytes]] = []
        for (limit_name, remaining_name, reset_name), limited in self.cell_kinds:
            left, text = _NEVER, b""
            for cell, i, limit, limit_text in limited:
                if limit - cell[i] < left:
                    left, text = limit - cell[i], limit_text
            out += ((limit_name, text), (remaining_name, b"%d" % (left if left > 0 else 0)), (reset_name, reset_text))
        return out

    def headers(self, used: list[int], reset: float) -> list[tuple[bytes, bytes]]:
        """x-ratelimit-* for the tightest bucket of each kind (used: requests, tokens per bucket)."""
        reset_text = _reset_text(reset)
        out: list[tuple[bytes, bytes]] = []
        for (limit_name, remaining_name, reset_name), limited in self.kinds:
            left, text = _NEVER, b""
            for at, limit, limit_text in limited:
                if limit - used[at] < left:
                    left, text = limit - used[at], limit_text
            out += ((limit_name, text), (remaining_name, b"%d" % (left if left > 0 else 0)), (reset_name, reset_text))
        return out


def _arg(value: int | None) -> int:
    return _NONE if value is None else value


def _never(value: int | None) -> int:
    return _NEVER if value is None else value


class Limiter:
    """Counts in memory, or in Redis when `redis` (a redis.asyncio client) is given."""

    def __init__(self, redis: Any = None, prefix: str = "gateway:rl:") -> None:
        self.redis = redis
        self.prefix = prefix
        self._batches = _Batches(redis) if redis is not None else None
        self._cells: dict[str, list[int]] = {}  # in memory: [requests, tokens] per bucket this window
        self._leases: dict[str, _Lease] | None = {} if redis is not None else None  # per set of buckets
        self._plans: dict[tuple[int, str], _Plan] = {}
        self._window = -1

    @property
    def local(self) -> bool:
        """Counted in this process: `admit_here` answers at once."""
        return self._batches is None

    def admit_here(self, key: ApiKey, model: str, reserve: int) -> Admission | None:
        """`admit` when counted in this process (the event loop's thread: no lock), with no await
        and few calls: this runs on every request of a limited key."""
        now = time.time()
        window = int(now // WINDOW)
        plan = self._plans.get((id(key), model))
        if plan is None or plan.key is not key or plan.window != window:
            plan = self._plan(key, model, window)
            if plan is None:
                return None
        elif not plan.names:
            return None
        if reserve < 0:
            reserve = 0
        reset = (window + 1) * WINDOW - now
        for cell, rpm, tpm in plan.checks:
            t = cell[1]
            if cell[0] >= rpm or t >= tpm or t + (reserve if reserve < tpm else tpm) > tpm:
                used = [n for counts in plan.cells for n in counts]
                raise RateLimited(reset, plan.headers_here(reset), _what(plan.limits, used))
        for cell in plan.cells:
            cell[0] += 1
            cell[1] += reserve
        return Admission(plan.counters, reserve, plan.headers_here(reset), plan.cells)

    async def admit(self, key: ApiKey, model: str, reserve: int) -> Admission | None:
        """Charge one request and `reserve` tokens, or raise RateLimited; None when unlimited."""
        if self._batches is None:
            return self.admit_here(key, model, reserve)
        now = time.time()
        window = int(now // WINDOW)
        plan = self._plan(key, model, window)
        if plan is None:
            return None
        reset = (window + 1) * WINDOW - now
        if reserve < 0:
            reserve = 0
        lease = plan.lease
        assert lease is not None  # counted in Redis: every plan has its lease
        if lease.take(reserve):  # no call
            ok, used = True, lease.used()
            if lease.low_on_room():
                self._refill(plan, lease)
        else:
            ok, used = await self._ask(plan, lease, reserve)
        headers = plan.headers(used, reset)
        if not ok:
            raise RateLimited(reset, headers, _what(plan.limits, used))
        return Admission(plan.counters, reserve, headers, plan.cells, lease)

    def _plan(self, key: ApiKey, model: str, window: int) -> _Plan | None:
        plan = self._plans.get((id(key), model))
        if plan is None or plan.key is not key or plan.window != window:
            if window != self._window:  # a new minute: every old counter has expired
                self._cells = {}
                if self._leases is not None:
                    for lease in self._leases.values():
                        lease.leased = False  # what is left of it is lost with its window
                    self._leases = {}
                self._window = window
            if len(self._plans) > 10_000:  # keys replaced by reloads leave stale entries
                self._plans.clear()
            chosen = buckets(key, model)
            plan = _Plan(key, window, chosen, self.prefix, self._cells, self._leases)
            self._plans[(id(key), model)] = plan
        return plan if plan.names else None  # no names: nothing to count

    async def _ask(self, plan: _Plan, lease: _Lease, reserve: int) -> tuple[bool, list[int]]:
        """Admit in Redis, asking for a lease (one call at a time per set of buckets); the old
        lease's rest goes back in the same call. Meanwhile the next requests wait for that lease
        when the last one was a real lease, else (near a limit) they go exact, batched."""
        assert self._batches is not None
        if lease.asking is not None and lease.size > 1:
            await asyncio.shield(lease.asking)
            if lease.take(reserve):
                return True, lease.used()
        if lease.asking is not None:  # another request asks: this one goes exact, in the same batches
            answer = await self._batches.admit(plan, reserve, 1)
            return answer[0] == 1, answer[3:]
        if lease.leased:
            self._give_back(lease)
        future = self._lease(plan, lease, reserve, 1)
        # shielded: a request cancelled meanwhile stays charged, and the lease still arrives
        answer = await asyncio.shield(future)
        return answer[0] == 1, lease.used() if answer[1] > 1 else answer[3:]

    def _refill(self, plan: _Plan, lease: _Lease) -> None:
        """Ask for the next lease while this one still has a quarter left, so that requests need
        not wait for it; the two add up (a replica holds at most 1.25 leases: when tokens ran
        low first, the requests beyond a quarter go back in the same call)."""
        if lease.requests > lease.low[0]:
            assert self._batches is not None
            self._batches.settle(lease.rnames, lease.keep(lease.low[0]))
        self._lease(plan, lease, 0, 0)

    def _lease(self, plan: _Plan, lease: _Lease, reserve: int, own: int) -> asyncio.Future[list[int]]:
        """Ask for a lease (`own`: 1 when the asking request is admitted with it, 0 ahead of
        need); it is added to the lease when the answer comes, before anyone awaiting it runs."""
        assert self._batches is not None
        asking = lease.asking = asyncio.get_running_loop().create_future()
        answer = self._batches.admit(plan, reserve, LEASE_MAX)

        def done(answer: asyncio.Future[list[int]]) -> None:
            lease.asking = None
            asking.set_result(None)
            if answer.cancelled() or answer.exception() is not None:
                return
            ok, got, granted = answer.result()[:3]
            lease.size = got
            if ok == 1 and got > own:
                lease.add(got - own, granted - reserve, granted, answer.result()[3:])
                if lease.tokens > lease.granted and not lease.deferred:  # the last one's rest unused
                    assert self._batches is not None
                    self._batches.defer(lease)

        answer.add_done_callback(done)
        return answer

    def _give_back(self, lease: _Lease) -> None:
        assert self._batches is not None
        lease.leased = False
        if lease.requests:
            self._batches.settle(lease.rnames, -lease.requests)
        if lease.tokens and lease.tnames:
            self._batches.settle(lease.tnames, -lease.tokens)
        lease.requests = lease.tokens = 0

    def settle(self, admission: Admission, tokens: int) -> None:
        """Replace the reservation by the tokens really used (prompt + completion). In Redis the
        correction is absorbed by the buckets' lease when they have one (what it cannot absorb
        follows within FLUSH seconds), else it goes out with the next batch, without waiting for
        it (`close` does)."""
        if admission.settled:
            return
        admission.settled = True
        delta = tokens - admission.reserved
        if delta == 0 or not admission.counters:
            return
        lease = admission.lease
        if lease is None:
            for cell in admission.cells:  # a past window's cells are no longer counted: no effect
                cell[1] += delta
        elif lease.leased:
            assert self._batches is not None
            lease.tokens -= delta
            if lease.tokens < 0:  # more than the lease holds: Redis must count it now
                self._batches.settle(lease.tnames, lease.hold(0))
            elif lease.tokens > lease.granted and not lease.deferred:  # more than given: back soon
                self._batches.defer(lease)
        else:
            assert self._batches is not None
            self._batches.settle(admission.counters, delta)

    async def close(self) -> None:
        """Give the leases' rest back and wait for the settlements still on their way to Redis."""
        if self._batches is not None:
            await self._batches.close()  # leases asked for ahead arrive
            await asyncio.sleep(0)  # (their callbacks run)
            for lease in (self._leases or {}).values():
                if lease.leased:
                    self._give_back(lease)
            await self._batches.close()


_Admit = tuple["_Plan", int, int, "asyncio.Future[list[int]]"]  # plan, reservation, lease wanted, answer


class _Batches:
    """Admissions and settlements for Redis, sent as one script call per batch: one call in
    flight at a time; whatever arrives meanwhile goes out together when it returns. Leases'
    corrections (deferred) ride along with the next call, or start one after FLUSH seconds."""

    def __init__(self, redis: Any) -> None:
        self._script = redis.register_script(_BATCH_LUA)
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
        fields = [str(int(WINDOW) + 5), str(LEASE_PART), str(LEASE_TOKENS), str(len(settles))]
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


def _what(limits: list[Limit], used: list[int]) -> str:
    for i, lim in enumerate(limits):
        if lim.rpm is not None and used[2 * i] + 1 > lim.rpm:
            return f"requests per minute ({lim.rpm})"
    return "tokens per minute"
