"""The per-key limiter alone: CPU time and Redis script calls per request, in memory and in Redis.

    python bench/team_limits.py [--rounds 3] [--requests 8000]

Calls `Limiter.admit` and `settle` (16 tokens reserved, 12 used) for one key with two buckets
(per key and per key and model, limits never reached), from 1 and 16 concurrent tasks, counted
in memory and in a redis-server started here; reports this process's CPU time per request
(median over rounds; redis-server's own CPU not included) and the script calls per request.
No HTTP: this isolates what gateway/auth/limits.py costs from the rest of a request.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio  # noqa: E402

from bench.team_overhead import start_redis  # noqa: E402
from bench.upstream_overhead import free_port, stop_all  # noqa: E402
from gateway.auth.keys import ApiKey, Limit  # noqa: E402
from gateway.auth.limits import Limiter  # noqa: E402

LIMIT = Limit(rpm=10**9, tpm=10**12)
KEY = ApiKey(id="bench", name="bench", digest=b"d", limit=LIMIT, model_limits={"m": LIMIT})


async def run_once(url: str | None, concurrency: int, total: int) -> tuple[float, float]:
    client: Any = redis.asyncio.Redis.from_url(url) if url else None
    limiter = Limiter(client, prefix=f"bench{time.time_ns()}:")
    calls = [0]
    if limiter._batches is not None:
        script = limiter._batches._script

        async def counted(**kwargs: Any) -> Any:
            calls[0] += 1
            return await script(**kwargs)

        limiter._batches._script = counted

    async def worker(count: int) -> None:
        for _ in range(count):
            admission = await limiter.admit(KEY, "m", 16)
            await asyncio.sleep(0)  # the request's work: other tasks run
            assert admission is not None
            limiter.settle(admission, 12)

    await worker(500)  # warm up
    calls[0] = 0
    started = time.process_time()
    await asyncio.gather(*(worker(total // concurrency) for _ in range(concurrency)))
    await limiter.close()
    cpu = (time.process_time() - started) / total * 1e6
    if client is not None:
        await client.aclose()
    return cpu, calls[0] / total


async def run(args: argparse.Namespace, url: str) -> None:
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for concurrency in (1, 16):
            for name, target in (("memory", None), ("redis", url)):
                results.setdefault((name, concurrency), []).append(await run_once(target, concurrency, args.requests))
    for (name, concurrency), values in results.items():
        cpu = statistics.median(v[0] for v in values)
        calls = statistics.median(v[1] for v in values)
        print(f"{name:<7} c={concurrency:<3} {cpu:7.1f} µs CPU/request   {calls:.4f} script calls/request")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8000)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="team-limits-") as tmpdir:
        procs = [start_redis(Path(tmpdir), port)]
        try:
            time.sleep(0.5)
            asyncio.run(run(args, f"redis://127.0.0.1:{port}/0"))
        finally:
            stop_all(procs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
