"""Local models at run time on tiny random checkpoints: budget eviction (LRU), keep_alive expiry,
a refusal when nothing idle can go, memory given back across load/unload cycles, and LoRA
adapters served as models (outputs equal to peft's own greedy forward)."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.backends import registry
from gateway.backends.local.memory import give_back_memory, rss_bytes
from gateway.config import Settings
from tests.engine.test_continuous_batching import busy_device
from tests.helpers import LiveServer, settings_for, wait_until
from tests.tiny_models import build_tiny_llama

JSON_TYPE = {"content-type": "application/json"}  # keyless admin POSTs carry it (no simple cross-origin request)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny")))


def local(name: str, source: str, **extra: Any) -> dict[str, Any]:
    backend = {"kind": "local", "source": source, "dtype": "float32", "max_batch_size": 2}
    backend.update(extra.pop("backend", {}))
    return {"name": name, "task": "text-generation", "preload": False, "backend": backend, **extra}


def use(url: str, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def states(url: str) -> dict[str, str]:
    return {m["name"]: m["state"] for m in httpx.get(f"{url}/admin/models").json()["data"]}


def in_flight(url: str, model: str) -> int:
    return int(httpx.get(f"{url}/admin/models/{model}").json()["in_flight"])


class ManualClock:
    """Stands in for the `time` module inside gateway.backends.registry (keep_alive counts on its
    monotonic clock): frozen, moved only by `advance`, so a slow lazy load cannot spend a keep_alive
    and a reaper pass comes after a known clock value. Other modules keep the real clock."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:  # the wall clock of the admin listing's `last_used`
        return time.time()

    def advance(self, seconds: float) -> None:
        self.now += seconds


def measured(tiny: str) -> int:
    """One tiny model's measured memory (parameters, buffers, KV cache reservation)."""
    with LiveServer(settings_for([local("probe", tiny)])) as server:
        assert use(server.url, "probe").status_code == 200
        listing = httpx.get(f"{server.url}/admin/models/probe").json()
        metrics = httpx.get(f"{server.url}/metrics").text
    memory = listing["memory"]
    assert memory["device"] == "cpu" and memory["bytes"] > 0 and memory["rss_delta_bytes"] is not None
    assert 'gateway_model_memory_bytes{device="cpu",kind="measured",model="probe"}' in metrics
    return int(memory["bytes"])


def budgeted(models: list[dict[str, Any]], cpu_memory: int) -> Settings:
    return Settings(models=models, server={"port": 0}, runtime={"cpu_memory": cpu_memory})


def test_loading_past_the_budget_evicts_the_least_recently_used_idle_model(tiny: str) -> None:
    size = measured(tiny)
    models = [local(n, tiny) for n in ("a", "b", "c")]
    with LiveServer(budgeted(models, int(size * 2.5))) as server:
        url = server.url
        for name in ("a", "b"):
            assert use(url, name).status_code == 200
        assert states(url) == {"a": "ready", "b": "ready", "c": "pending"}
        assert use(url, "c").status_code == 200  # a is the least recently used: it goes
        assert states(url) == {"a": "pending", "b": "ready", "c": "ready"}
        assert use(url, "b").status_code == 200  # now c is the least recently used
        assert use(url, "a").status_code == 200
        assert states(url) == {"a": "ready", "b": "ready", "c": "pending"}
        assert httpx.get(f"{url}/ready").status_code == 200  # evicted models do not make it unready
        assert 'gateway_model_unloads_total{model="c",reason="room"} 1.0' in httpx.get(f"{url}/metrics").text


def test_a_model_that_cannot_fit_gets_a_503_naming_why(tiny: str) -> None:
    size = measured(tiny)
    models = [local("busy", tiny), local("other", tiny)]
    with LiveServer(budgeted(models, int(size * 1.5))) as server, concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert use(server.url, "busy").status_code == 200
        with busy_device():  # busy's next request waits in its queue: it is in flight, not idle
            pending = pool.submit(use, server.url, "busy")
            wait_until(lambda: in_flight(server.url, "busy") >= 1, "in flight")  # its lease is held till it ends
            refused = use(server.url, "other")
        assert pending.result().status_code == 200
        assert refused.status_code == 503 and refused.headers["retry-after"]
        error = refused.json()["error"]
        assert error["code"] == "insufficient_memory" and "busy" in error["message"], error
        assert use(server.url, "other").status_code == 200  # busy is idle now: evicted


def test_keep_alive_per_model_and_per_request(tiny: str, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = ManualClock()
    monkeypatch.setattr(registry, "time", clock)
    models = [local("short", tiny, keep_alive="1s"), local("long", tiny)]
    with LiveServer(settings_for(models)) as server:
        url = server.url

        def unloaded(name: str) -> Callable[[], bool]:
            return lambda: states(url)[name] == "pending"

        assert use(url, "short").status_code == 200
        assert use(url, "long", keep_alive=0.5).status_code == 200  # the request's own keep_alive
        assert states(url) == {"short": "ready", "long": "ready"}  # no time has passed on the registry's clock
        clock.advance(0.75)  # past long's 0.5 s, short of short's 1 s
        wait_until(unloaded("long"), "unloaded (idle past the request's keep_alive)")
        # each reaper pass reads the clock once and checks every model: short was checked at 0.75 s too
        assert states(url) == {"short": "ready", "long": "pending"}
        clock.advance(0.5)  # 1.25 s: past short's own keep_alive
        wait_until(unloaded("short"), "unloaded (idle past the model's keep_alive)")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        client.completions.create(model="long", prompt="the", max_tokens=1, extra_body={"keep_alive": "-1"})
        assert use(url, "short").status_code == 200  # a witness that the reaper ran after the next advance
        clock.advance(10**6)
        wait_until(unloaded("short"), "unloaded (idle past the model's keep_alive)")
        assert states(url)["long"] == "ready"  # negative: kept (checked in the pass that unloaded short)
        with pytest.raises(openai.BadRequestError, match="keep_alive"):
            client.completions.create(model="long", prompt="the", max_tokens=1, extra_body={"keep_alive": "soon"})


def test_memory_comes_back_across_load_unload_cycles(tmp_path: Path) -> None:
    """RSS after unloading is back where it was before loading (a leaked copy of the model would show)."""

    folder = str(build_tiny_llama(tmp_path / "m", context=512))
    with LiveServer(settings_for([local("cycled", folder, backend={"max_batch_size": 16})])) as server:
        url = server.url

        def cycle() -> None:
            assert use(url, "cycled").status_code == 200
            assert (
                httpx.post(
                    f"{url}/admin/models/cycled/unload", headers={"content-type": "application/json"}, timeout=60
                ).json()["state"]
                == "pending"
            )

        for _ in range(3):  # imports, allocator pools and thread stacks settle first
            cycle()
        give_back_memory()
        before = rss_bytes()
        for _ in range(20):
            cycle()
        give_back_memory()
        grown = rss_bytes() - before
        print(f"RSS {before / 2**20:.1f} MiB before, {grown / 2**20:+.2f} MiB after 20 cycles")
        assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 20 load/unload cycles"


def test_an_unload_past_its_timeout_answers_the_request_left_with_a_503(
    tiny: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A request still running when `unload_timeout` runs out is failed cleanly (503), never a 500."""
    caplog.set_level(logging.WARNING, logger="gateway.backends.registry")
    settings = Settings(models=[local("stuck", tiny)], server={"port": 0}, runtime={"unload_timeout": 0.2})
    with LiveServer(settings) as server, concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert use(server.url, "stuck").status_code == 200
        with busy_device():  # the request waits in the engine's queue
            pending = pool.submit(use, server.url, "stuck", max_tokens=40)
            wait_until(lambda: in_flight(server.url, "stuck") >= 1, "in flight")  # leased before the unload
            unloading = pool.submit(
                httpx.post, f"{server.url}/admin/models/stuck/unload", headers=JSON_TYPE, timeout=60
            )
            # the device is held until the timeout has run out with the request still queued
            wait_until(lambda: any("still running after" in r.getMessage() for r in caplog.records), "timed out")
        assert unloading.result().status_code == 200
        answer = pending.result()
        print("left request:", answer.status_code, answer.text[:160])
        assert answer.status_code in (200, 503), answer.text
        assert states(server.url) == {"stuck": "pending"}
