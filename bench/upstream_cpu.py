"""CPU time per upstream chat request, in process: the gateway app against the aiohttp forwarder.

`python bench/upstream_cpu.py [--rounds 30] [--batch 100] [--concurrency 1] [--profile tottime]`

Starts nginx (as bench/upstream_overhead.py does) and calls the ASGI apps directly, without an
HTTP server in front, so only the apps' own work is timed (process CPU time, all in one process):

* **gateway**: `create_app` with one upstream model pointing at nginx;
* **gateway-framed**: the same app without `DirectRoutes` and with FastAPI's own OpenTelemetry
  middleware on, i.e. every request through the whole framework stack, as before 2026-11-30;
* **forwarder**: the aiohttp forwarder of bench/upstream_overhead.py.

Batches of each are interleaved (`--rounds` of `--batch` requests), so a busy machine slows all
three alike; the ratios of the summed CPU times are printed. Numbers are CPU per request with the
load generator's own small share in it, so compare ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.upstream_overhead import PATH, REQUEST, forwarder_app, free_port, start_nginx  # noqa: E402
from gateway.app import create_app  # noqa: E402
from gateway.config import Settings  # noqa: E402
from gateway.routes.common.direct import DirectRoutes  # noqa: E402


def gateway_app(upstream: str, framed: bool) -> Any:
    settings = Settings.model_validate(
        {
            "server": {"log_level": "warning", "access_log": False},
            "models": [
                {
                    "name": "bench",
                    "task": "text-generation",
                    "backend": {"kind": "upstream", "url": f"{upstream}/v1", "model": "upstream-model"},
                }
            ],
        }
    )
    app = create_app(settings)
    if framed:
        from fastapi.telemetry._asgi import NativeTelemetry

        app.user_middleware = [m for m in app.user_middleware if m.cls is not DirectRoutes]
        app._telemetry.update(tracing=True, metrics=True, logs=True)
        app._native_telemetry = NativeTelemetry(app._telemetry)
    return app


async def call(app: Any, headers: tuple[tuple[bytes, bytes], ...] = ()) -> list[dict[str, Any]]:
    """One chat request to `app` (extra request `headers`, e.g. a key), straight through ASGI; the
    messages it sent back (a status other than 200 ends the benchmark)."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": REQUEST, "more_body": False}
        await asyncio.sleep(3600)  # the client never disconnects
        raise AssertionError

    out: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        out.append(message)

    request_headers = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"), *headers]
    request_headers.append((b"content-length", str(len(REQUEST)).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": request_headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    await app(scope, receive, send)
    if out[0]["status"] != 200:
        raise SystemExit(f"unexpected answer: {out}")
    return out


async def started(app: Any) -> asyncio.Task[None]:
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    task = asyncio.ensure_future(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    message = await outbox.get()
    assert message["type"] == "lifespan.startup.complete", message
    return task


async def cpu_per_request(app: Any, count: int, concurrency: int) -> float:
    async def worker(n: int) -> None:
        for _ in range(n):
            await call(app)

    began = time.process_time()
    await asyncio.gather(*(worker(count // concurrency) for _ in range(concurrency)))
    return (time.process_time() - began) / count * 1e6


async def measure(args: argparse.Namespace, upstream: str) -> None:
    apps = {
        "gateway": gateway_app(upstream, framed=False),
        "gateway-framed": gateway_app(upstream, framed=True),
        "forwarder": forwarder_app("aiohttp", upstream),
    }
    alive = [await started(app) for app in apps.values()]  # kept: a collected lifespan task ends the app
    for app in apps.values():
        await cpu_per_request(app, 300, args.concurrency)  # warm-up
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        await cpu_per_request(apps["gateway"], 1000, args.concurrency)
        profile.disable()
        pstats.Stats(profile).sort_stats(args.profile).print_stats(40)
    totals = dict.fromkeys(apps, 0.0)
    for _ in range(args.rounds):
        for name, app in apps.items():
            totals[name] += await cpu_per_request(app, args.batch, args.concurrency)
    for name, total in totals.items():
        print(f"{name:15} {total / args.rounds:7.0f} us CPU per request")
    print(f"gateway / forwarder:        {totals['gateway'] / totals['forwarder']:.3f}")
    print(f"gateway-framed / forwarder: {totals['gateway-framed'] / totals['forwarder']:.3f}")
    print(f"gateway / gateway-framed:   {totals['gateway'] / totals['gateway-framed']:.3f}")
    del alive


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--profile", help="cProfile the gateway first, sorted by this key (tottime, cumtime)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        nginx = start_nginx(Path(tmp), port)
        try:
            time.sleep(0.5)
            try:
                import uvloop

                uvloop.install()
            except ImportError:
                pass
            asyncio.run(measure(args, f"http://127.0.0.1:{port}"))
        finally:
            nginx.terminate()
            nginx.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
