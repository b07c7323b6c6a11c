"""Gateway overhead in front of a very fast upstream: one command, one table.

    python bench/upstream_overhead.py [--rounds 5] [--requests 2000]

Starts nginx on loopback answering a canned chat completion, then, on loopback too:
  * `gateway serve` with one upstream model pointing at nginx,
  * two minimal forwarding apps (FastAPI + httpx, FastAPI + aiohttp) defined in this file,
and drives each target, plus nginx directly, with a lean keep-alive HTTP/1.1 load
generator at concurrency 1 and 16. Rounds are interleaved and the medians of the
rounds are reported, so noise from other work on the machine hits every target alike.
Prints a table and writes JSON. Targets (the issue): added p50 at c=1 <= 1.5 ms over
direct; req/s at c=16 >= 0.8x the minimal forwarder's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

ROOT = Path(__file__).resolve().parent.parent
CANNED = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "upstream-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there!"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
}
REQUEST = json.dumps(
    {"model": "bench", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 16}
).encode()
PATH = "/v1/chat/completions"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the minimal forwarders (the baseline) ---------------------------------------------------------


def forwarder_app(client: str, upstream: str) -> FastAPI:
    """The least a forwarding app can do: read the body, POST it upstream, return the answer."""
    state: dict[str, Any] = {}
    headers = {"content-type": "application/json"}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if client == "httpx":
            import httpx

            state["c"] = httpx.AsyncClient(limits=httpx.Limits(max_connections=100, max_keepalive_connections=100))
        else:
            import aiohttp

            state["c"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
        yield
        await (state["c"].aclose() if client == "httpx" else state["c"].close())

    app = FastAPI(lifespan=lifespan)

    async def forward_httpx(request: Request) -> Response:
        r = await state["c"].post(upstream + PATH, content=await request.body(), headers=headers)
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    async def forward_aiohttp(request: Request) -> Response:
        body = await request.body()
        async with state["c"].post(upstream + PATH, data=body, headers=headers) as r:
            return Response(await r.read(), status_code=r.status, media_type="application/json")

    app.add_api_route(PATH, forward_httpx if client == "httpx" else forward_aiohttp, methods=["POST"])
    return app


def run_forwarder(client: str, port: int, upstream: str) -> None:
    import uvicorn

    uvicorn.run(forwarder_app(client, upstream), host="127.0.0.1", port=port, log_level="warning")


# --- processes -------------------------------------------------------------------------------------


def start_nginx(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        sys.exit("nginx not found: install it (Debian/Ubuntu: apt-get install -y nginx) and run again.")
    body = json.dumps(CANNED).replace("'", "\\'")
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"""daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  keepalive_requests 1000000; keepalive_timeout 120s;
  server {{
    listen 127.0.0.1:{port};
    location = {PATH} {{ default_type application/json; return 200 '{body}'; }}
  }}
}}
"""
    )
    return subprocess.Popen([nginx, "-p", str(tmp), "-c", str(conf), "-e", f"{tmp}/nginx-error.log"])


def start_gateway(tmp: Path, port: int, upstream: str, access_log: bool) -> subprocess.Popen[bytes]:
    config = tmp / "gateway.yaml"
    config.write_text(
        f"""server:
  log_level: info
  access_log: {str(access_log).lower()}  # off by default, as in the forwarders: no log line per request
models:
  - name: bench
    task: text-generation
    backend:
      kind: upstream
      url: {upstream}/v1
      model: upstream-model
"""
    )
    log = open(tmp / "gateway.log", "wb")  # noqa: SIM115 - lives as long as the process
    cmd = [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(config),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
    ]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def start_forwarder(client: str, port: int, upstream: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, __file__, "--serve-forwarder", client, "--port", str(port), "--upstream", upstream]
    return subprocess.Popen(cmd, cwd=ROOT)


def wait_answering(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, body = asyncio.run(one_request(port))
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"nothing answers on port {port}")


# --- the load generator ----------------------------------------------------------------------------


def http_request(port: int, token: str = "bench") -> bytes:
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {len(REQUEST)}\r\n\r\n"
    )
    return head.encode() + REQUEST


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    # One search in C, not a Python loop per header line: the load generator shares the CPUs with
    # the servers it measures, so its cost per header would count against servers that send more.
    at = head.lower().find(b"\r\ncontent-length:")
    if at < 0:
        raise RuntimeError("the load generator needs a Content-Length response")
    length = int(head[at + 17 : head.index(b"\r\n", at + 17)])
    return status, await reader.readexactly(length)


async def one_request(port: int, token: str = "bench") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(http_request(port, token))
        return await read_response(reader)
    finally:
        writer.close()


async def drive(port: int, concurrency: int, total: int, warmup: int, token: str = "bench") -> dict[str, float]:
    """Closed loop: `concurrency` keep-alive connections, each sending its next request on the last answer."""
    payload = http_request(port, token)
    latencies: list[float] = []
    failures = 0

    async def connection(count: int, record: bool) -> None:
        nonlocal failures
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        clock = time.perf_counter
        try:
            for _ in range(count):
                started = clock()
                writer.write(payload)
                status, _ = await read_response(reader)
                if record:
                    latencies.append(clock() - started)
                    failures += status != 200
        finally:
            writer.close()

    await asyncio.gather(*(connection(warmup // concurrency, False) for _ in range(concurrency)))
    started = time.perf_counter()
    await asyncio.gather(*(connection(total // concurrency, True) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "failures": failures,
    }


# --- the run ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000, help="Measured requests per target, level and round.")
    parser.add_argument("--warmup", type=int, default=320)
    parser.add_argument("--out", default=str(ROOT / "bench" / "upstream_overhead.json"))
    parser.add_argument(
        "--gateway-access-log", action="store_true", help="Run the gateway with uvicorn's access log line per request."
    )
    parser.add_argument("--serve-forwarder", choices=["httpx", "aiohttp"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_forwarder:
        run_forwarder(args.serve_forwarder, args.port, args.upstream)
        return 0

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    ports = {name: free_port() for name in ("direct", "gateway", "forwarder-httpx", "forwarder-aiohttp")}
    upstream = f"http://127.0.0.1:{ports['direct']}"
    with tempfile.TemporaryDirectory(prefix="bench-upstream-") as tmpdir:
        tmp = Path(tmpdir)
        procs = [start_nginx(tmp, ports["direct"])]
        try:
            procs.append(start_gateway(tmp, ports["gateway"], upstream, args.gateway_access_log))
            procs.append(start_forwarder("httpx", ports["forwarder-httpx"], upstream))
            procs.append(start_forwarder("aiohttp", ports["forwarder-aiohttp"], upstream))
            for port in ports.values():
                wait_answering(port)
            status, body = asyncio.run(one_request(ports["gateway"]))
            answer = json.loads(body)
            assert status == 200 and answer["choices"][0]["message"]["content"] == "Hello there!", body
            results = measure(ports, args)
        finally:
            stop_all(procs)
    report(results, args)
    return 0


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Terminate the started processes, last first; kill any that does not exit within 10 s."""
    for proc in reversed(procs):
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def measure(ports: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    raw: dict[str, dict[int, list[dict[str, float]]]] = {name: {1: [], 16: []} for name in ports}
    names = list(ports)
    for number in range(args.rounds):
        # The order rotates from round to round, so no target always runs first or right after another.
        order = names[number % len(names) :] + names[: number % len(names)]
        for concurrency in (1, 16):
            for name in order:
                raw[name][concurrency].append(asyncio.run(drive(ports[name], concurrency, args.requests, args.warmup)))
        print(f"round {number + 1}/{args.rounds} done", file=sys.stderr)
    medians = {
        name: {
            c: {key: statistics.median(r[key] for r in runs) for key in ("rps", "p50_ms", "p99_ms", "failures")}
            for c, runs in levels.items()
        }
        for name, levels in raw.items()
    }
    # Added latency per round, then the median: both numbers of a pair saw the same machine state.
    added = [g["p50_ms"] - d["p50_ms"] for g, d in zip(raw["gateway"][1], raw["direct"][1], strict=True)]
    ratios = {
        fwd: statistics.median(g["rps"] / f["rps"] for g, f in zip(raw["gateway"][16], raw[fwd][16], strict=True))
        for fwd in ("forwarder-httpx", "forwarder-aiohttp")
    }
    return {"medians": medians, "raw": raw, "added_p50_ms_c1": statistics.median(added), "rps_ratio_c16": ratios}


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    medians = results["medians"]
    print(f"\n{'target':<20}{'c':>4}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'fail':>6}")
    for name, levels in medians.items():
        for c, m in levels.items():
            print(f"{name:<20}{c:>4}{m['rps']:>10.0f}{m['p50_ms']:>9.2f}{m['p99_ms']:>9.2f}{m['failures']:>6.0f}")
    added = results["added_p50_ms_c1"]
    ratio = results["rps_ratio_c16"]
    print(f"\ngateway added p50 latency at c=1: {added:.2f} ms (target <= 1.5 ms)")
    for fwd, value in ratio.items():
        print(f"gateway req/s at c=16 vs {fwd}: {value:.2f}x (target >= 0.8x)")
    out = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": {
            "rounds": args.rounds,
            "requests": args.requests,
            "warmup": args.warmup,
            "gateway_access_log": args.gateway_access_log,
        },
        **results,
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
