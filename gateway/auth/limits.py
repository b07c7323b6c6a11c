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
from typing import Any, NoReturn

from gateway.auth.keys import ApiKey, Limit
from gateway.auth.limits_redis import _SEP, LEASE_MAX, _Batches, _Lease

WINDOW = 60.0
_NONE = -1  # no limit, in the Lua script's arguments
_NEVER = 1 << 62  # no limit, in the in-memory checks: a count never reached


class Admission:
    """One admitted request's charge, settled when its token count is known. (A plain class: one
    is made per request of a limited key, and its __init__ does no more than store.)"""

    __slots__ = ("counters", "reserved", "headers", "cells", "lease", "settled")

    def __init__(
        self,
        counters: list[str],  # the token counter of each bucket (Redis); empty when no bucket limits tokens
        reserved: int,
        headers: list[tuple[bytes, bytes]],
        cells: list[list[int]],  # each bucket's [requests, tokens] (in memory)
        lease: _Lease | None = None,  # its buckets' lease (Redis), where a settlement may be absorbed
    ) -> None:
        self.counters = counters
        self.reserved = reserved
        self.headers = headers
        self.cells = cells
        self.lease = lease
        self.settled = False


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
_NO_HEADER = (b"", b"")  # the limit header of a kind no bucket limits: never sent


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
        "cells",
        "kinds",
        "here",
        "ends",
        "requests_limited",
        "tokens_limited",
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
        # (index in `used`, limit, its header text) of the buckets with a request or token limit
        rpm = [(2 * i, lim.rpm, b"%d" % lim.rpm) for i, lim in enumerate(self.limits) if lim.rpm is not None]
        tpm = [(2 * i + 1, lim.tpm, b"%d" % lim.tpm) for i, lim in enumerate(self.limits) if lim.tpm is not None]
        self.kinds = [(names, limited) for names, limited in ((_REQUESTS, rpm), (_TOKENS, tpm)) if limited]
        # In memory, per bucket: (cell, rpm, tpm, rpm text, tpm text), a limit absent as one never
        # reached; the window's end; whether any bucket limits requests, tokens (their headers)
        self.here = []
        for cell, lim in zip(self.cells, self.limits, strict=True):
            most_requests, most_tokens = _never(lim.rpm), _never(lim.tpm)
            limit_headers = (_REQUESTS[0], b"%d" % most_requests), (_TOKENS[0], b"%d" % most_tokens)
            self.here.append((cell, most_requests, most_tokens, *limit_headers))
        self.ends = (window + 1) * WINDOW
        self.requests_limited = bool(rpm)
        self.tokens_limited = bool(tpm)
        # Without a token limit nothing reads the token counts: settlements are skipped.
        self.counters = self.names[1::2] if tpm else []
        self.fields = _SEP.join(str(v) for v in (*bounds, *self.names))  # the script's, after the reservation
        self.lease = None if leases is None else leases.get(self.fields)
        if self.lease is None and leases is not None:
            self.lease = leases[self.fields] = _Lease(self.names[::2], self.counters)

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
        self.local = redis is None  # counted in this process: `admit_here` answers at once
        self._cells: dict[str, list[int]] = {}  # in memory: [requests, tokens] per bucket this window
        self._leases: dict[str, _Lease] | None = {} if redis is not None else None  # per set of buckets
        self._plans: dict[tuple[int, str], _Plan] = {}
        self._window = -1
        self._resets_until = 0.0  # in memory: until when `_resets` hold (one window for all)
        self._resets = ((_REQUESTS[2], b""), (_TOKENS[2], b""))

    def admit_here(self, key: ApiKey, model: str, reserve: int) -> Admission | None:
        """`admit` when counted in this process (the event loop's thread: no lock). This runs on
        every request of a limited key, so it is written for few interpreter steps: no await, one
        loop that charges each bucket and finds the tightest of each kind for the headers."""
        now = time.time()
        plan = self._plans.get((id(key), model))
        if plan is None or plan.key is not key or now >= plan.ends:
            plan = self._plan(key, model, int(now // WINDOW))
            if plan is None:
                return None
        elif not plan.names:
            return None
        if reserve < 0:
            reserve = 0
        left_requests = left_tokens = _NEVER
        requests_limit = tokens_limit = _NO_HEADER
        for cell, rpm, tpm, rpm_header, tpm_header in plan.here:
            requests = cell[0] + 1
            used = cell[1]
            tokens = used + reserve
            # refused: no request left, no token left, or the reservation (capped at the limit:
            # a larger one is admitted into an empty bucket) does not fit
            if requests > rpm or used >= tpm or (tokens > tpm and used):
                self._refuse(plan, cell, reserve, now)
            cell[0] = requests
            cell[1] = tokens
            if rpm - requests < left_requests:
                left_requests, requests_limit = rpm - requests, rpm_header
            if tpm - tokens < left_tokens:
                left_tokens, tokens_limit = tpm - tokens, tpm_header
        resets = self._resets if now < self._resets_until else self._reset(plan.ends - now, now)
        if plan.requests_limited:
            requests_left = (_REQUESTS[1], b"%d" % (left_requests if left_requests > 0 else 0))
            if plan.tokens_limited:
                tokens_left = (_TOKENS[1], b"%d" % (left_tokens if left_tokens > 0 else 0))
                headers = [requests_limit, requests_left, resets[0], tokens_limit, tokens_left, resets[1]]
            else:
                headers = [requests_limit, requests_left, resets[0]]
        else:
            headers = [tokens_limit, (_TOKENS[1], b"%d" % (left_tokens if left_tokens > 0 else 0)), resets[1]]
        return Admission(plan.counters, reserve, headers, plan.cells)

    def _refuse(self, plan: _Plan, full: list[int], reserve: int, now: float) -> NoReturn:
        """Refuse in memory: the buckets charged before `full` (the first without room) are
        uncharged, and the headers say what the buckets hold without this request."""
        for cell in plan.cells:
            if cell is full:
                break
            cell[0] -= 1
            cell[1] -= reserve
        used = [n for counts in plan.cells for n in counts]
        reset = plan.ends - now
        raise RateLimited(reset, plan.headers(used, reset), _what(plan.limits, used))

    def _reset(self, left: float, now: float) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
        """The reset headers (requests, tokens) for `left` seconds, kept for the rest of this
        second (whole seconds: they change once a second, except in a window's last second, in
        milliseconds, where they are made anew each time)."""
        text = _reset_text(left)
        self._resets_until = math.floor(now) + 1.0 if left > 1 else 0.0
        self._resets = ((_REQUESTS[2], text), (_TOKENS[2], text))
        return self._resets

    async def admit(self, key: ApiKey, model: str, reserve: int) -> Admission | None:
        """Charge one request and `reserve` tokens, or raise RateLimited; None when unlimited."""
        if self.local:
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
        if not delta or not admission.counters:
            return
        lease = admission.lease
        if lease is None:
            for cell in admission.cells:  # a past window's cells are no longer counted: no effect
                cell[1] += delta
            return
        if lease.leased:
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
