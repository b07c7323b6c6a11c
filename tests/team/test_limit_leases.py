"""Leases on Redis limits (gateway.auth.limits_redis): far from a limit a replica charges Redis for up to
64 requests (1/16 of the room left) in one call and admits the next ones itself; near the limit
every admission is exact. Against a real redis-server: the calls saved, two replicas (two
Limiters, two connections) leasing concurrently right up to one budget (requests, and tokens
reserved and settled), the headers, a window roll, and settlements absorbed by the lease yet
counted in Redis after close()."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from gateway.auth import limits, limits_redis
from gateway.auth.keys import ApiKey, Limit
from gateway.auth.limits import Admission, Limiter, RateLimited
from gateway.auth.limits_redis import FLUSH, LEASE_MAX, LEASE_PART
from tests.team.redis_server import redis_server


def _key(name: str, limit: Limit, per_model: Limit | None = None) -> ApiKey:
    return ApiKey(id=name, name=name, digest=b"d", limit=limit, model_limits={"m": per_model} if per_model else {})


class Counted:
    """A Limiter on its own connection whose script calls are counted."""

    def __init__(self, url: str) -> None:
        self.client = redis.asyncio.Redis.from_url(url)
        self.limiter = Limiter(self.client)
        self.calls = 0
        batches = self.limiter._batches
        assert batches is not None
        script = batches._script

        async def counted(**kwargs: Any) -> Any:
            self.calls += 1
            return await script(**kwargs)

        batches._script = counted

    async def admit(self, key: ApiKey, reserve: int = 0) -> Admission | None:
        try:
            return await self.limiter.admit(key, "m", reserve)
        except RateLimited:
            return None

    def unused(self) -> int:
        """Requests leased by this replica and not used yet."""
        return sum(lease.requests for lease in (self.limiter._leases or {}).values() if lease.leased)

    async def close(self) -> None:
        await self.limiter.close()
        await self.client.aclose()


def _with_redis(tmp_path: Path, test: Callable[[str, redis.asyncio.Redis], Awaitable[None]]) -> None:
    """Run `test` against a fresh redis-server, within one one-minute window (each takes ~1 s)."""

    async def run(url: str) -> None:
        left = limits.WINDOW - time.time() % limits.WINDOW
        if left < 5:
            await asyncio.sleep(left + 0.05)
        client = redis.asyncio.Redis.from_url(url)
        try:
            await test(url, client)
        finally:
            await client.aclose()

    with redis_server(tmp_path) as url:
        asyncio.run(run(url))


async def _idle(one: Counted) -> None:
    """Until no script call is in flight and every answer has been handled: what a sleep only
    guessed at (a Redis round trip on a loaded CI machine may take longer than any guess)."""
    batches = one.limiter._batches
    assert batches is not None

    async def drained() -> None:
        while batches._pump is not None:
            await asyncio.shield(batches._pump)  # its answers' callbacks run before this resumes

    await asyncio.wait_for(drained(), 20)


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` (a guard against hangs, not a time bound: the deadline is generous)."""
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def _count(client: redis.asyncio.Redis, key: ApiKey, kind: str, model: bool = False) -> int:
    window = int(limits.time.time() // limits.WINDOW)
    name = f"gateway:rl:k:{key.id}{':m:m' if model else ''}:{window}:{kind}"
    return int(await client.get(name) or 0)


def _remaining(admission: Admission, kind: str) -> int:
    return int(dict(admission.headers)[f"x-ratelimit-remaining-{kind}".encode()])


def test_many_admissions_few_calls_and_exact_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The calls are counted exactly, so no flush timer may add one: each lease's unused rest is
    # deferred, and a stall of ~0.1 s on a busy machine (measured: 20-24 calls instead of 16) let
    # FLUSH send it alone. Here it rides along with the next lease, as it does on a quiet machine;
    # the timed flush has its own test below.
    monkeypatch.setattr(limits_redis, "FLUSH", 3600.0)

    async def test(url: str, client: redis.asyncio.Redis) -> None:
        one = Counted(url)
        key = _key("big", Limit(rpm=100_000, tpm=10**8), Limit(rpm=50_000))
        for i in range(1, 1001):  # one replica alone: its headers count exactly
            admission = await one.admit(key, 10)
            assert admission is not None
            assert _remaining(admission, "requests") == 50_000 - i  # the model's bucket is the tighter
            assert _remaining(admission, "tokens") == 10**8 - 7 * (i - 1) - 10
            one.limiter.settle(admission, 7)  # less than reserved: absorbed by the lease
            if i % 100 == 0:
                await asyncio.sleep(0.03)  # the lease asked for ahead comes while requests use the rest
        # a lease of 64 per call; surpluses ride along with the next call
        assert one.calls <= 1000 // LEASE_MAX + 1, one.calls
        # concurrent admissions: one lease asked at a time, the others exact meanwhile, batched
        before = one.calls
        await asyncio.gather(*(one.admit(key, 10) for _ in range(16 * 64)))
        assert one.calls - before <= 2 * 16 + 2, one.calls - before
        await _idle(one)  # no lease on its way: Redis and unused() count the same leases
        # Redis holds what was admitted plus this replica's unused lease, given back on close
        assert await _count(client, key, "r") == 2024 + one.unused()
        await one.close()
        assert await _count(client, key, "r") == 2024 and await _count(client, key, "r", model=True) == 2024
        assert await _count(client, key, "t") == 7000 + 10240

    _with_redis(tmp_path, test)


@pytest.mark.parametrize("rpm", [1000, 40])
def test_two_replicas_lease_up_to_one_budget(tmp_path: Path, rpm: int) -> None:
    """1.5 x the budget attempted at once, split over two replicas: never more than the budget;
    what is not admitted is at most the replicas' unused leases, which close() gives back."""

    async def test(url: str, client: redis.asyncio.Redis) -> None:
        replicas = [Counted(url), Counted(url)]
        key = _key(f"shared{rpm}", Limit(rpm=rpm))
        attempts = rpm * 3 // 2

        async def worker(replica: Counted, count: int) -> int:
            return sum([await replica.admit(key) is not None for _ in range(count)])

        per_worker = attempts // 16
        admitted = sum(await asyncio.gather(*(worker(replicas[i % 2], per_worker) for i in range(16))))
        for replica in replicas:  # a lease asked for ahead may still be on its way (timing-dependent)
            await _idle(replica)
        unused = [r.unused() for r in replicas]
        assert admitted <= rpm
        assert await _count(client, key, "r") == admitted + sum(unused) == rpm  # filled, every charge accounted
        largest = max(1, min(LEASE_MAX, rpm // LEASE_PART))  # the largest lease this limit allows
        held = largest + largest // 4  # a lease and the quarter left of the last one
        assert all(u <= held for u in unused) and admitted >= rpm - 2 * held, (admitted, unused)
        if rpm < 2 * LEASE_PART:  # too small to lease: exact, every admission a call
            assert unused == [0, 0] and admitted == rpm
        assert sum(r.calls for r in replicas) < attempts
        for replica in replicas:
            await replica.close()
        assert await _count(client, key, "r") == admitted  # the unused leases given back

    _with_redis(tmp_path, test)


def test_two_replicas_tokens_counted_exactly_after_close(tmp_path: Path) -> None:
    """Reservations and settlements (over and under the reservation) on two leasing replicas:
    once both have closed, Redis holds exactly the tokens really used, and while they ran the
    reservations admitted never exceeded the limit."""

    async def test(url: str, client: redis.asyncio.Redis) -> None:
        replicas = [Counted(url), Counted(url)]
        tpm = 400_000
        key = _key("tokens2", Limit(tpm=tpm))
        rng = random.Random(13)
        used = 0

        async def worker(replica: Counted, count: int) -> None:
            nonlocal used
            for _ in range(count):
                admission = await replica.admit(key, 200)
                if admission is not None:
                    await asyncio.sleep(0)
                    real = rng.randrange(0, 400)
                    used += real
                    replica.limiter.settle(admission, real)

        await asyncio.gather(*(worker(replicas[i % 2], 150) for i in range(16)))
        assert await _count(client, key, "t") <= tpm + 16 * 200  # over only by answers longer than reserved
        assert sum(r.calls for r in replicas) < 16 * 150 // 4
        for replica in replicas:
            await replica.close()
        assert await _count(client, key, "t") == used

    _with_redis(tmp_path, test)


def test_window_roll_ends_the_lease(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Clock:
        now = 1_000_000 * limits.WINDOW + 10  # 10 s into a window

        def time(self) -> float:
            return self.now

    clock = Clock()
    monkeypatch.setattr(limits, "time", clock)

    async def test(url: str, client: redis.asyncio.Redis) -> None:
        one = Counted(url)
        key = _key("roll", Limit(rpm=10_000))
        for _ in range(3):
            assert await one.admit(key) is not None
        assert one.calls == 1 and one.unused() == LEASE_MAX - 3
        leases = list((one.limiter._leases or {}).values())
        clock.now += limits.WINDOW  # the next window: the lease is gone, its rest lost
        admission = await one.admit(key)
        assert admission is not None and _remaining(admission, "requests") == 10_000 - 1
        assert one.calls == 2 and not any(lease.leased for lease in leases)
        assert await _count(client, key, "r") == LEASE_MAX  # a fresh lease in the new window
        await one.close()
        assert await _count(client, key, "r") == 1
        clock.now -= limits.WINDOW
        assert await _count(client, key, "r") == LEASE_MAX  # the old window's charge, as it was

    _with_redis(tmp_path, test)


def test_refill_when_tokens_run_low_gives_requests_back(tmp_path: Path) -> None:
    """Larger reservations drain a lease's tokens before its requests: the next lease is asked
    for ahead, and the requests beyond a quarter go back in that call, so that a replica never
    holds more than 1.25 leases."""

    async def test(url: str, client: redis.asyncio.Redis) -> None:
        one = Counted(url)
        key = _key("drain", Limit(rpm=100_000, tpm=10**6))
        assert await one.admit(key, 100) is not None  # a lease sized for small requests: 64
        for _ in range(10):
            assert await one.admit(key, 5000) is not None
        # no await has yielded yet: the next lease is on its way, the requests given back with it
        admission = await one.admit(key, 100)
        assert admission is not None and _remaining(admission, "requests") == 100_000 - 12
        await _idle(one)  # the lease asked for ahead has come
        assert one.calls == 2
        assert one.unused() <= LEASE_MAX + LEASE_MAX // 4
        assert await _count(client, key, "r") == 12 + one.unused()
        admission = await one.admit(key, 100)
        assert admission is not None and one.calls == 2
        assert _remaining(admission, "requests") == 100_000 - 13
        await one.close()
        assert await _count(client, key, "r") == 13

    _with_redis(tmp_path, test)


def test_cancelled_request_keeps_its_lease(tmp_path: Path) -> None:
    """A client gone while its admission asks for a lease: the request stays charged (as if it
    had run), and the lease still serves the next requests rather than being lost."""

    async def test(url: str, client: redis.asyncio.Redis) -> None:
        one = Counted(url)
        key = _key("cancel", Limit(rpm=10_000))
        asking = asyncio.ensure_future(one.admit(key))
        await asyncio.sleep(0)  # the admission is queued, its call not answered yet
        asking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asking
        await _idle(one)  # the call answered: the lease arrived (or, on the bug, was dropped)
        assert one.calls == 1 and one.unused() == LEASE_MAX - 1
        admission = await one.admit(key)
        assert admission is not None and one.calls == 1
        assert _remaining(admission, "requests") == 10_000 - 2
        await one.close()
        assert await _count(client, key, "r") == 2

    _with_redis(tmp_path, test)


def test_settlements_absorbed_by_the_lease_and_in_redis_after_close(tmp_path: Path) -> None:
    async def test(url: str, client: redis.asyncio.Redis) -> None:
        one = Counted(url)
        key = _key("tokens", Limit(tpm=1_000_000))
        admissions = [await one.admit(key, 100) for _ in range(40)]
        assert one.calls == 1  # 40 x 100 tokens, well within a lease of 1/16 of a million
        for admission in admissions:
            assert admission is not None
            one.limiter.settle(admission, 30)  # each used less than it reserved
        await asyncio.sleep(0.3)  # a deferred flush would start its call FLUSH (0.1 s) in, before this ends: none may
        assert one.calls == 1  # absorbed by the lease: no call
        lease = next(iter((one.limiter._leases or {}).values()))
        assert lease.tokens == lease.granted - 40 * 30
        assert await _count(client, key, "t") == 40 * 30 + lease.tokens  # the lease's rest counts as used
        admission = await one.admit(key, 100)
        assert admission is not None and _remaining(admission, "tokens") == 1_000_000 - 40 * 30 - 100
        held = lease.tokens
        one.limiter.settle(admission, 100 + held + 7)  # more than the lease holds: sent at once
        await _idle(one)
        assert one.calls == 2 and lease.tokens == 0
        used = 40 * 30 + 100 + held + 7
        assert await _count(client, key, "t") == used
        await one.close()
        assert await _count(client, key, "t") == used and one.calls == 3  # close gave the requests back

        # Settlements of a previous lease's admissions land in the current one; what it then
        # holds over its grant goes back to Redis after FLUSH seconds, without a request.
        two = Counted(url)
        other = _key("surplus", Limit(tpm=1_000_000))
        admitted = [await two.admit(other, 100) for _ in range(LEASE_MAX + 1)]
        assert two.calls == 2
        for admission in admitted:
            assert admission is not None
            two.limiter.settle(admission, 0)
        lease = next(iter((two.limiter._leases or {}).values()))
        assert lease.tokens > lease.granted and two.calls == 2
        batches = two.limiter._batches
        assert batches is not None and batches._timer is not None  # a flush armed for FLUSH seconds on
        assert batches._timer.when() <= asyncio.get_running_loop().time() + FLUSH
        await _until(lambda: two.calls == 3, "the surplus did not go back without a request")
        await _idle(two)
        assert two.calls == 3 and lease.tokens == lease.granted
        assert await _count(client, other, "t") == lease.granted  # nothing used; the grant held
        last = await two.admit(other, 100)  # on the lease, its headers still exact
        assert last is not None and _remaining(last, "tokens") == 1_000_000 - 100 and two.calls == 3
        two.limiter.settle(last, 0)
        await two.close()
        assert await _count(client, other, "t") == 0 and await _count(client, other, "r") == LEASE_MAX + 2

    _with_redis(tmp_path, test)
