"""Redis limits in batches (gateway.auth.limits_redis): admissions that arrive together go out in one
script call with the settlements waiting, and the count stays exact: against a real redis-server,
many concurrent requests of one process against one budget, and the counters' expiry."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio

from gateway.auth import limits
from gateway.auth.keys import ApiKey, Limit
from gateway.auth.limits import Admission, Limiter, RateLimited
from tests.team.redis_server import redis_server


def _key(limit: Limit, per_model: Limit | None = None) -> ApiKey:
    return ApiKey(
        id="batch", name="batch", digest=b"d", limit=limit, model_limits={"m": per_model} if per_model else {}
    )


async def _admit(limiter: Limiter, key: ApiKey, reserve: int) -> bool:
    try:
        await limiter.admit(key, "m", reserve)
    except RateLimited:
        return False
    return True


async def _batched(url: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    calls = 0
    limiter = Limiter(client)
    batches = limiter._batches
    assert batches is not None
    script = batches._script

    async def counted(**kwargs: object) -> object:
        nonlocal calls
        calls += 1
        return await script(**kwargs)

    batches._script = counted
    try:
        # requests: 40 at once against 10 per minute (and 25 per minute for the model)
        key = _key(Limit(rpm=10), Limit(rpm=25))
        admitted = await asyncio.gather(*(_admit(limiter, key, 0) for _ in range(40)))
        assert admitted.count(True) == 10 and admitted[:10] == [True] * 10  # in arrival order
        assert calls <= 2  # one batch (the first call may leave alone, the rest wait for it)
        # tokens: 100 per minute, 12 reserved each, settled to 5 each: reservations refused once
        # they do not fit, then room again once the settlements (sent with the next batch) land
        tokens = ApiKey(id="tok", name="tok", digest=b"t", limit=Limit(tpm=100))
        first = await asyncio.gather(*(tokens_admit(limiter, tokens) for _ in range(12)))
        assert [a is not None for a in first].count(True) == 8  # 8 x 12 = 96 <= 100
        for admission in first:
            if admission is not None:
                limiter.settle(admission, 5)  # 8 x 5 = 40 really used
        second = await asyncio.gather(*(tokens_admit(limiter, tokens) for _ in range(12)))
        assert [a is not None for a in second].count(True) == 5  # 40 + 5 x 12 = 100
        assert second[0] is not None
        remaining = dict(second[0].headers)[b"x-ratelimit-remaining-tokens"]
        assert remaining == b"48"  # 100 - 40 - 12: the settlements went first
        await limiter.close()
        names = await client.keys("gateway:rl:*")
        ttls = [await client.ttl(n) for n in names]
        assert len(names) == 6 and all(0 < t <= 65 for t in ttls), ttls  # every counter expires
    finally:
        await client.aclose()


async def tokens_admit(limiter: Limiter, key: ApiKey) -> Admission | None:
    try:
        return await limiter.admit(key, "m", 12)
    except RateLimited:
        return None


def test_concurrent_admissions_batched_and_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One window for the whole test: its rounds of admissions count against one budget, which a
    # minute rolling over between them (real time) would renew. The counters' TTLs are Redis's.
    class Clock:
        def time(self) -> float:
            return 1_000_000 * limits.WINDOW + 10  # 10 s into a window

    monkeypatch.setattr(limits, "time", Clock())
    with redis_server(tmp_path) as url:
        asyncio.run(_batched(url))


def test_redis_gone_fails_every_admission_of_the_batch() -> None:
    async def run() -> None:
        client = redis.asyncio.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
        limiter = Limiter(client)
        results = await asyncio.gather(
            *(limiter.admit(_key(Limit(rpm=5)), "m", 0) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, ConnectionError) for r in results), results
        await limiter.close()
        await client.aclose()

    asyncio.run(run())
