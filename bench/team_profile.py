"""CPU time per request of the team features, in process (no HTTP server, no load generator).

    python bench/team_profile.py [--rounds 6] [--requests 1000] [--concurrency 16]
        [--targets off,auth,limits,logs,mem,redis] [--profile mem [--dump PREFIX --base off]] [--freeze]

Builds the apps of bench/team_overhead.py (off / mem / redis, and for a breakdown: auth = a
stored key only, limits = + its limits and usage, logs = JSON request lines only) in this
process, starts nginx and a redis-server, and calls each app's ASGI entry directly with
`concurrency` tasks, rounds alternated, reporting the process CPU time per request (median over
rounds), the difference to `off`, and the time in the garbage collector. `--profile NAME` runs
cProfile over one more round of that app and prints the top functions by own time (`--dump`
writes it and the `--base` app's for a diff). Logs (JSON lines) go to a file, as in the bench.
The CPU time is that of this process only (not redis-server's), and noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.team_overhead import start_redis  # noqa: E402
from bench.upstream_cpu import call  # noqa: E402
from bench.upstream_overhead import free_port, start_nginx, stop_all  # noqa: E402
from gateway import logs  # noqa: E402
from gateway.app import create_app  # noqa: E402
from gateway.auth.keys import KeyScope, Limit  # noqa: E402
from gateway.auth.store import KeyStore  # noqa: E402
from gateway.config import Settings  # noqa: E402


def settings(upstream: str, server: dict[str, Any]) -> Settings:
    backend = {"kind": "upstream", "url": f"{upstream}/v1", "model": "upstream-model"}
    model = {"name": "bench", "task": "text-generation", "backend": backend}
    return Settings.model_validate({"server": {"log_level": "info", "access_log": False, **server}, "models": [model]})


async def drive(app: Any, token: str, total: int, concurrency: int) -> float:
    async def worker(n: int) -> None:
        for _ in range(n):
            await call(app, ((b"authorization", f"Bearer {token}".encode()),))

    started = time.process_time()
    before = _gc_seconds[0]
    await asyncio.gather(*(worker(total // concurrency) for _ in range(concurrency)))
    _gc_per_request.append((_gc_seconds[0] - before) / total * 1e6)
    return (time.process_time() - started) / total * 1e6


# Time spent in the garbage collector (gc.callbacks), per request of the last drive.
_gc_seconds = [0.0, 0.0]
_gc_full = [0, 0.0]  # full collections and their time
_gc_per_request: list[float] = []


def _gc_timer(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_seconds[1] = time.perf_counter()
    else:
        _gc_seconds[0] += time.perf_counter() - _gc_seconds[1]
        if info["generation"] == 2:
            _gc_full[0] += 1
            _gc_full[1] += time.perf_counter() - _gc_seconds[1]


gc.callbacks.append(_gc_timer)


async def run(args: argparse.Namespace, upstream: str, redis_url: str, tmp: Path) -> None:
    store = KeyStore(str(tmp / "keys.db"))
    limit = Limit(rpm=10**9, tpm=10**12)
    _, token = store.create("bench", scopes=[KeyScope.INFERENCE], limit=limit, model_limits={"bench": limit})
    _, free = store.create("free", scopes=[KeyScope.INFERENCE])
    store.close()
    keys = {"key_db": str(tmp / "keys.db")}
    team = {**keys, "json_logs": True}
    every: dict[str, tuple[dict[str, Any], str]] = {
        "off": ({}, "bench"),
        "auth": (keys, free),  # the key and its scope, nothing else
        "limits": (keys, token),  # + limits and usage
        "logs": ({"json_logs": True}, "bench"),  # JSON request lines only
        "mem": (team, token),
        "redis": ({**team, "redis_url": redis_url}, token),
    }
    names = ["off", *(n for n in args.targets.split(",") if n != "off")]
    servers = {name: every[name][0] for name in names}
    tokens = {name: every[name][1] for name in names}
    logs.configure("info", json_lines=True, stream=open(tmp / "log.jsonl", "w"))  # noqa: SIM115
    apps = {name: create_app(settings(upstream, server)) for name, server in servers.items()}
    contexts = [app.router.lifespan_context(app) for app in apps.values()]
    for ctx in contexts:
        await ctx.__aenter__()
    if args.freeze:
        gc.freeze()
    if args.gc_threshold:
        gc.set_threshold(args.gc_threshold, *gc.get_threshold()[1:])
    try:
        for name, app in apps.items():
            await drive(app, tokens[name], 200, args.concurrency)  # warm up
        results: dict[str, list[float]] = {name: [] for name in apps}
        in_gc: dict[str, list[float]] = {name: [] for name in apps}
        for number in range(args.rounds):
            names = list(apps)
            names = names[number % len(names) :] + names[: number % len(names)]
            for name in names:
                results[name].append(await drive(apps[name], tokens[name], args.requests, args.concurrency))
                in_gc[name].append(_gc_per_request[-1])
        off = statistics.median(results["off"])
        for name, values in results.items():
            us = statistics.median(values)
            collecting = statistics.median(in_gc[name])
            print(
                f"{name:<6} {us:8.1f} µs CPU/request   added {us - off:7.1f} µs   of which in gc {collecting:5.1f} µs"
                f"   rounds {[round(v) for v in values]}"
            )
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            await drive(apps[args.profile], tokens[args.profile], args.requests, args.concurrency)
            profiler.disable()
            stats = pstats.Stats(profiler).sort_stats(args.sort)
            stats.print_stats(args.top)
            if args.dump:
                profiler.dump_stats(f"{args.dump}.{args.profile}")
                profiler = cProfile.Profile()
                profiler.enable()
                await drive(apps[args.base], tokens[args.base], args.requests, args.concurrency)
                profiler.disable()
                profiler.dump_stats(f"{args.dump}.{args.base}")
    finally:
        for ctx in reversed(contexts):
            await ctx.__aexit__(None, None, None)
        logs.flush()
    print(f"full collections: {_gc_full[0]}, {_gc_full[1] * 1000:.0f} ms")
    lines = (tmp / "log.jsonl").read_text().splitlines()
    print(f"{len(lines)} log lines; last: {lines[-1][:300]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--targets", default="off,mem,redis", help="of off,auth,limits,logs,mem,redis")
    parser.add_argument("--profile", choices=("off", "auth", "limits", "logs", "mem", "redis"))
    parser.add_argument("--freeze", action="store_true", help="gc.freeze() once the apps have started")
    parser.add_argument("--gc-threshold", type=int, help="the collector's first threshold (default 700)")
    parser.add_argument("--base", default="off", help="the app --dump profiles next to --profile's")
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--dump", help="write the profiles of --profile and --base to DUMP.<name>")
    args = parser.parse_args()
    nginx_port, redis_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="team-profile-") as tmpdir:
        tmp = Path(tmpdir)
        procs = [start_nginx(tmp, nginx_port), start_redis(tmp, redis_port)]
        try:
            time.sleep(0.5)
            import uvloop

            uvloop.run(run(args, f"http://127.0.0.1:{nginx_port}", f"redis://127.0.0.1:{redis_port}/0", tmp))
        finally:
            stop_all(procs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
