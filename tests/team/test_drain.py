"""Graceful drain on SIGTERM, on a real `gateway serve` process under load: /ready turns 503 at
once, new requests get 503 in their API's shape, requests that started before the signal finish
(or, past server.drain_timeout, end cleanly: streams with an in-band error and [DONE]), exit 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import ROOT, free_port, wait_ready, wait_until

pytestmark = pytest.mark.e2e


def start(tmp_path: Path, drain_timeout: float, delay_ms: float) -> tuple[subprocess.Popen[bytes], str]:
    config = {
        "server": {"drain_timeout": drain_timeout, "access_log": False},
        "models": [{"name": "slow", "task": "text-generation", "default": True,
                    "backend": {"kind": "fake", "delay_ms": delay_ms}}],
    }  # fmt: skip
    path = tmp_path / "drain.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port)]
    log = open(tmp_path / "drain.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, timeout=60, proc=proc)
    return proc, url


def stream(url: str, tokens: int, out: list[Any], opened: list[int]) -> None:
    body = {"model": "slow", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": tokens, "stream": True}
    events: list[str] = []
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as resp:
            opened.append(resp.status_code)
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        out.append(("stream", resp.status_code, events))
    except Exception as exc:  # an incomplete chunked body would land here
        out.append(("stream", "failed", repr(exc)))


def whole(url: str, tokens: int, out: list[Any]) -> None:
    body = {"model": "slow", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": tokens}
    try:
        resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        out.append(("whole", resp.status_code, resp.json()))
    except Exception as exc:
        out.append(("whole", "failed", repr(exc)))


def load(url: str, tokens: int, streams: int = 6, wholes: int = 3) -> tuple[list[threading.Thread], list[Any]]:
    out: list[Any] = []
    opened: list[int] = []
    threads = [threading.Thread(target=whole, args=(url, tokens, out)) for _ in range(wholes)]
    threads += [threading.Thread(target=stream, args=(url, tokens, out, opened)) for _ in range(streams)]
    for t in threads:
        t.start()
    # every stream has its 200 (the whole requests were sent first)
    wait_until(lambda: len(opened) >= streams, "every stream started", timeout=15)
    # and every whole request reached the gateway too (holds its model, or is already answered)
    wait_until(
        lambda: httpx.get(f"{url}/admin/models/slow").json()["in_flight"] + len(out) >= streams + wholes,
        "every whole request at the gateway",
        timeout=15,
    )
    return threads, out


def refused_at_once(url: str) -> None:
    deadline = time.monotonic() + 2
    while httpx.get(f"{url}/ready").status_code != 503:
        assert time.monotonic() < deadline, "/ready still 200 after SIGTERM"
        time.sleep(0.02)
    new = httpx.post(f"{url}/v1/chat/completions", json={"model": "slow", "messages": []})
    assert new.status_code == 503 and new.json()["error"]["code"] == "shutting_down"
    hf = httpx.post(f"{url}/generate", json={"inputs": "a"})
    assert hf.status_code == 503 and hf.json()["error_type"] == "unavailable"
    assert httpx.get(f"{url}/health").status_code == 200


def test_in_flight_requests_finish(tmp_path: Path) -> None:
    proc, url = start(tmp_path, drain_timeout=20, delay_ms=40)
    threads, out = load(url, tokens=80)  # ~3.2 s each
    proc.send_signal(signal.SIGTERM)
    refused_at_once(url)
    for t in threads:
        t.join(timeout=30)
    assert proc.wait(timeout=30) == 0
    assert len(out) == 9
    for kind, status, payload in out:
        assert status == 200, (kind, status, payload)
        if kind == "stream":
            assert payload[-1] == "[DONE]"
            finish = json.loads(payload[-2])["choices"][0]["finish_reason"]
            assert finish == "length" and len(payload) > 80
        else:
            assert payload["usage"]["completion_tokens"] == 80


def test_past_the_grace_period_requests_end_cleanly(tmp_path: Path) -> None:
    proc, url = start(tmp_path, drain_timeout=1.0, delay_ms=50)
    threads, out = load(url, tokens=400)  # 20 s each: far past the grace period
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    refused_at_once(url)
    for t in threads:
        t.join(timeout=30)
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - signalled < 10
    assert len(out) == 9
    for kind, status, payload in out:
        if kind == "stream":
            assert status == 200 and payload[-1] == "[DONE]", payload
            error = json.loads(payload[-2])["error"]
            assert error["code"] == "shutting_down", error
            assert len(payload) > 5  # the tokens sent before the end
        else:
            assert status == 503 and payload["error"]["code"] == "shutting_down", payload
    assert b"ASGI callable returned without completing response" not in (tmp_path / "drain.log").read_bytes()
