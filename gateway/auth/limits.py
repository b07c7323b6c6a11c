"""Per-key limits: requests and tokens per minute, per key and optionally per model.

Fixed one-minute windows (the reset is the window's end, as OpenAI's headers say), counted in
this process or in Redis. A request is admitted while its buckets have a request left and their
tokens used plus its reservation (`max_tokens`, capped at the limit) fit; the reservation is
settled to the real count when the answer is done.

In Redis, `Limiter` charges through gateway/auth/limits_redis.py: one atomic Lua script whose
calls are batched, and leases (its docstring describes them and the bounds they keep: never more
than a limit admitted, and by how much a window may fall short). Here: the public API, the
per-window plans, the in-memory count, and when a lease is asked for, refilled or given back.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.auth.keys import ApiKey, Limit
from gateway.auth.limits_redis import _SEP, LEASE_MAX, _Batches, _Lease

WINDOW = 60.0
_NONE = -1  # no limit, in the Lua script's arguments
_NEVER = 1 << 62  # no limit, in the in-memory checks: a count never reached


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
        self._batches = _Batches(redis, WINDOW) if redis is not None else None
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


def _what(limits: list[Limit], used: list[int]) -> str:
    for i, lim in enumerate(limits):
        if lim.rpm is not None and used[2 * i] + 1 > lim.rpm:
            return f"requests per minute ({lim.rpm})"
    return "tokens per minute"
