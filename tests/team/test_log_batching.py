"""JSON log lines are written in batches off the request path (gateway.logs.LineSink): on a real
`gateway serve` under load none is lost, they stay in order, and the lines of requests that
finish during a SIGTERM drain are out by the time the process exits; a stalled sink drops lines
past its bound and says how many."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway.logs import LineSink
from tests.helpers import ROOT, free_port, wait_ready


def _serve(tmp_path: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    config = {
        "server": {"json_logs": True, "access_log": False, "api_keys": ["k-batch"], "drain_timeout": 20},
        "models": [{"name": "slow", "task": "text-generation", "default": True,
                    "backend": {"kind": "fake", "delay_ms": 20}}],
    }  # fmt: skip
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp_path / "batch.log"
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, timeout=60, proc=proc)
    return proc, url, log_path


def test_no_line_lost_under_load_and_all_out_after_a_sigterm_drain(tmp_path: Path) -> None:
    proc, url, log_path = _serve(tmp_path)
    auth = {"Authorization": "Bearer k-batch"}
    body = {"model": "slow", "messages": [{"role": "user", "content": "a b"}], "max_tokens": 2}
    try:
        with httpx.Client(headers=auth, timeout=30) as client:

            def call(_: int) -> str:
                resp = client.post(f"{url}/v1/chat/completions", json=body)
                assert resp.status_code == 200, resp.text
                return resp.headers["x-request-id"]

            with ThreadPoolExecutor(8) as pool:
                loaded = list(pool.map(call, range(240)))
        # streams still running when the signal comes (each has its 200): they finish during the drain
        slow = {**body, "max_tokens": 40, "stream": True}  # ~0.8 s each
        late: list[str] = []
        done: list[int] = []

        def stream() -> None:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=slow, headers=auth, timeout=30) as resp:
                late.append(resp.headers["x-request-id"])
                done.append(sum(1 for line in resp.iter_lines() if line.startswith("data: ")))

        threads = [threading.Thread(target=stream) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while len(late) < 4:
            assert time.monotonic() < deadline, "streams did not start"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=30)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    raw = log_path.read_text().splitlines()
    lines: list[dict[str, Any]] = [json.loads(line) for line in raw]  # every line whole and JSON
    requests = [x["request_id"] for x in lines if x["msg"] == "request" and x["path"] == "/v1/chat/completions"]
    assert len(late) == 4 and len(done) == 4 and min(done) > 40  # every stream ran to its end
    assert sorted(requests) == sorted(loaded + late)  # each request exactly once, none lost
    stamps = [x["ts"] for x in lines]
    assert stamps == sorted(stamps)  # written in the order they were logged
    drained = next(i for i, x in enumerate(lines) if x["msg"].startswith("drained in"))
    after = [x for x in lines[drained:] if x["request_id"] in late]
    assert not after, after  # out before the drain ended
    last = next(x for x in lines if x["msg"] == "request" and x["request_id"] == late[0])
    assert last["completion_tokens"] == 40 and last["key"] == "config-0" and last["status"] == 200, last


class _Stalled:
    """A text stream whose writes block until released (a full pipe, a stuck log collector)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.writing = threading.Event()
        self.text: list[str] = []

    def write(self, text: str) -> None:
        self.writing.set()
        self.release.wait(10)
        self.text.append(text)

    def flush(self) -> None:
        pass


def test_a_stalled_sink_drops_past_its_bound_and_counts() -> None:
    stream = _Stalled()
    sink = LineSink(stream, max_pending=50, interval=0.01)  # type: ignore[arg-type]
    try:
        sink.write(b'{"n":0}')
        assert stream.writing.wait(5)  # the writer holds the first line, stuck in write()
        for n in range(1, 81):
            sink.write(b'{"n":%d}' % n)
        assert sink.dropped == 30  # 50 waited, the rest were dropped and counted
        stream.release.set()
    finally:
        sink.close()
    out = [json.loads(line) for line in "".join(stream.text).splitlines()]
    assert [x["n"] for x in out if "n" in x] == list(range(51))  # in order, the first 50 kept
    assert out[-1]["level"] == "warning" and out[-1]["msg"].startswith("30 log lines dropped")


def test_request_line_is_valid_json_whatever_the_names(tmp_path: Path) -> None:
    """The request line is formatted from a template: every caller-chosen string (the path, and
    key and model names from the config) must still come out as valid, exact JSON."""
    from types import SimpleNamespace

    from gateway import logs

    out = tmp_path / "lines.log"
    stream = out.open("w")
    logs.configure("info", json_lines=True, stream=stream)
    try:
        tricky = 'a "quoted" \\ back\nslash\x01 ünïcode ☃'
        context = SimpleNamespace(prompt_tokens=7, completion_tokens=2, ttft=0.0123456, queue_time=None)
        logs.request_line(b"req-1", "POST", "/models/" + tricky, "/models/{model_id}", 200, tricky, tricky, 0.0042,
                          context, {"deployment": "m/east", "request_body": tricky, "odd": object()})  # fmt: skip
        logs.request_line(b"req-2", "GET", "/v1/models", "unmatched", 404, None, None, 1.5, None, {})
        logs.flush()
    finally:
        logs.configure("info", json_lines=False)
        stream.close()
    first, second = (json.loads(line) for line in out.read_text().splitlines())
    assert first["path"] == "/models/" + tricky and first["key"] == tricky and first["model"] == tricky
    assert first["request_body"] == tricky and first["deployment"] == "m/east" and first["odd"].startswith("<object")
    assert (first["prompt_tokens"], first["completion_tokens"], first["status"]) == (7, 2, 200)
    assert first["total_ms"] == 4.2 and first["ttft_ms"] == 12.346 and first["queue_ms"] is None
    assert first["request_id"] == "req-1" and first["msg"] == "request" and first["ts"].endswith("Z")
    assert second["key"] is None and second["model"] is None and second["deployment"] is None
    assert second["prompt_tokens"] == 0 and second["ttft_ms"] is None and second["total_ms"] == 1500.0


def test_request_lines_follow_the_access_loggers_level(tmp_path: Path) -> None:
    """`gateway.access` set above INFO silences request lines (checked by the writer), not the others."""
    import logging

    from gateway import logs

    out = tmp_path / "lines.log"
    stream = out.open("w")
    logs.configure("info", json_lines=True, stream=stream)
    access = logging.getLogger("gateway.access")
    try:
        logs.request_line(b"req-1", "GET", "/v1/models", "/v1/models", 200, None, None, 0.001, None, {})
        logs.flush()
        access.setLevel(logging.WARNING)
        logs.request_line(b"req-2", "GET", "/v1/models", "/v1/models", 200, None, None, 0.001, None, {})
        logging.getLogger("gateway.other").info("still here")
        logs.flush()
    finally:
        access.setLevel(logging.NOTSET)
        logs.configure("info", json_lines=False)
        stream.close()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x.get("request_id") for x in lines if x["msg"] == "request"] == ["req-1"]
    assert [x["msg"] for x in lines if x["logger"] == "gateway.other"] == ["still here"]
