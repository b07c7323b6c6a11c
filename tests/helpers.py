"""Test helpers: a real uvicorn server in a thread, and a `gateway serve` subprocess."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml

from gateway.app import create_app
from gateway.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings_for(models: list[dict[str, Any]], **server: Any) -> Settings:
    return Settings(models=models, server={"port": 0, **server})


class LiveServer:
    """The real app behind real uvicorn on a free loopback port, in a background thread."""

    def __init__(self, settings: Settings, **app_kwargs: Any) -> None:
        self.app = create_app(settings, **app_kwargs)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def wait_ready(self, timeout: float = 300) -> None:
        wait_ready(self.url, timeout)

    @property
    def state(self) -> Any:
        return self.app.state.gateway

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_until(condition: Callable[[], object], what: str, timeout: float = 20, interval: float = 0.02) -> None:
    """Poll `condition` until it holds. The deadline only guards against a hang: tests wait on
    something observable, never on a sleep long enough for the machine at hand."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {timeout:g} s"
        time.sleep(interval)


def wait_ready(url: str, timeout: float = 300, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            resp = httpx.get(f"{url}/ready", timeout=2)
            if resp.status_code == 200:
                return
            failed = [m for m, state in resp.json().get("models", {}).items() if state == "failed"]
            if failed:
                raise RuntimeError(f"models failed to load: {failed}")
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@contextlib.contextmanager
def gateway_process(
    config: dict[str, Any] | None = None, tmp_path: Path | None = None, env: dict[str, str] | None = None
) -> Iterator[str]:
    """`python -m gateway serve` on a free port; yields its base URL. `config=None` uses the default config."""
    port = free_port()
    cmd = [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--host", "127.0.0.1"]
    if config is not None:
        assert tmp_path is not None
        path = tmp_path / f"gateway-{port}.yaml"
        path.write_text(yaml.safe_dump(config))
        cmd += ["--config", str(path)]
    log = open((tmp_path or Path("/tmp")) / f"gateway-{port}.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc=proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def strip_volatile(value: object, volatile: frozenset[str] = frozenset({"id", "created"})) -> object:
    """A JSON value without the fields that change on every call (ids, timestamps), to compare answers."""
    if isinstance(value, dict):
        return {k: strip_volatile(v, volatile) for k, v in value.items() if k not in volatile}
    if isinstance(value, list):
        return [strip_volatile(v, volatile) for v in value]
    return value
