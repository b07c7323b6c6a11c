"""Local models at run time on tiny random checkpoints: budget eviction (LRU), keep_alive expiry,
a refusal when nothing idle can go, memory given back across load/unload cycles, and LoRA
adapters served as models (outputs equal to peft's own greedy forward)."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.backends.local.memory import give_back_memory, rss_bytes
from gateway.config import Settings
from tests.engine.test_continuous_batching import busy_device
from tests.helpers import LiveServer, settings_for
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
            time.sleep(0.3)
            refused = use(server.url, "other")
        assert pending.result().status_code == 200
        assert refused.status_code == 503 and refused.headers["retry-after"]
        error = refused.json()["error"]
        assert error["code"] == "insufficient_memory" and "busy" in error["message"], error
        assert use(server.url, "other").status_code == 200  # busy is idle now: evicted


def test_keep_alive_per_model_and_per_request(tiny: str) -> None:
    models = [local("short", tiny, keep_alive="1s"), local("long", tiny)]
    with LiveServer(settings_for(models)) as server:
        url = server.url
        assert use(url, "short").status_code == 200
        assert use(url, "long", keep_alive=0.5).status_code == 200  # the request's own keep_alive
        assert states(url) == {"short": "ready", "long": "ready"}
        deadline = time.monotonic() + 10
        while states(url) != {"short": "pending", "long": "pending"}:
            assert time.monotonic() < deadline, states(url)
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        client.completions.create(model="long", prompt="the", max_tokens=1, extra_body={"keep_alive": "-1"})
        time.sleep(1.0)
        assert states(url)["long"] == "ready"  # negative: kept
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


def test_an_unload_past_its_timeout_answers_the_request_left_with_a_503(tiny: str) -> None:
    """A request still running when `unload_timeout` runs out is failed cleanly (503), never a 500."""
    settings = Settings(models=[local("stuck", tiny)], server={"port": 0}, runtime={"unload_timeout": 0.2})
    with LiveServer(settings) as server, concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert use(server.url, "stuck").status_code == 200
        with busy_device():  # the request waits in the engine's queue
            pending = pool.submit(use, server.url, "stuck", max_tokens=40)
            time.sleep(0.3)
            unloading = pool.submit(
                httpx.post, f"{server.url}/admin/models/stuck/unload", headers=JSON_TYPE, timeout=60
            )
            time.sleep(0.5)
        assert unloading.result().status_code == 200
        answer = pending.result()
        print("left request:", answer.status_code, answer.text[:160])
        assert answer.status_code in (200, 503), answer.text
        assert states(server.url) == {"stuck": "pending"}
