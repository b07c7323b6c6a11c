"""SIGHUP reloads the configuration of a real `gateway serve` process, keeping the unchanged models
and the server itself (no restart: the same process keeps answering)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from tests.helpers import ROOT, free_port, wait_ready


def models(*names: str) -> dict[str, object]:
    return {"models": [{"name": n, "task": "text-generation", "backend": {"kind": "fake"}} for n in names]}


def served(url: str) -> list[str]:
    return sorted(m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"])


def test_sighup_reloads_the_config(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(models("kept", "dropped")))
    port = free_port()
    cmd = [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--config", str(config)]
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 60, proc)
        assert served(url) == ["dropped", "kept"]
        config.write_text(yaml.safe_dump(models("kept", "added")))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while served(url) != ["added", "kept"]:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        config.write_text("models: [")  # a broken file: logged, nothing changes, the server stays up
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "configuration not reloaded" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert served(url) == ["added", "kept"] and proc.poll() is None
        assert "configuration applied" in log.read_text()
    finally:
        proc.terminate()
        assert proc.wait(20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
