"""Models loaded on first use: the default model's routes before it has loaded, the time to first
token counted from the request's arrival, and `estimated_time` from measured load times."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from huggingface_hub import InferenceClient
from openai import OpenAI

from gateway.domain import ModelState
from tests.helpers import LiveServer, settings_for


def _server(models: list[dict[str, object]], cache_dir: Path) -> LiveServer:
    settings = settings_for(models)
    settings.cache_dir = cache_dir
    return LiveServer(settings)


def _local(name: str, source: Path, **extra: object) -> dict[str, object]:
    return {"name": name, "backend": {"kind": "local", "source": str(source), "dtype": "float32"}, **extra}


def _ttft(server: LiveServer, model: str) -> tuple[float, float]:
    """The time-to-first-token histogram's count and sum for `model`."""
    registry = server.state.metrics.registry
    labels = {"model": model}
    count = registry.get_sample_value("gateway_time_to_first_token_seconds_count", labels) or 0.0
    return count, registry.get_sample_value("gateway_time_to_first_token_seconds_sum", labels) or 0.0


def test_lazy_default_model_with_an_inferred_task(tiny: dict[str, Path], tmp_path: Path) -> None:
    """No `task` and `preload: false`: the task is read from the checkpoint's config at start-up,
    so the TGI routes and the placeholder names find the default model before it has loaded."""
    models = [_local("gpt2", tiny["gpt2"], default=True, preload=False), _local("ner", tiny["ner"], preload=False)]
    with _server(models, tmp_path) as server:
        backend = server.state.registry.lookup("gpt2").backend
        info = requests.get(f"{server.url}/info").json()
        assert info["model_id"] == "gpt2" and info["model_pipeline_tag"] == "text-generation"
        assert info["state"] == "pending"
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}, "options": {"wait_for_model": False}}
        for path in ("/", "/generate"):
            r = requests.post(server.url + path, json=body)
            assert r.status_code == 503 and r.json()["error_type"] == "loading", (path, r.text)
        messages = [{"role": "user", "content": "Hello"}]
        for name in ("tgi", "dummy"):
            chat = OpenAI(base_url=f"{server.url}/v1", api_key="unused").chat.completions.create(
                model=name, messages=messages, max_tokens=2
            )
            assert chat.usage.completion_tokens == 2
        assert backend.state == ModelState.READY
        assert InferenceClient(base_url=server.url).text_generation("Hello", max_new_tokens=2)
        assert requests.get(f"{server.url}/models/ner/info").json()["model_pipeline_tag"] == "token-classification"


def test_time_to_first_token_counts_from_arrival(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Non-stream requests are timed too; a TGI stream's first token is timed from the request's
    arrival, so the wait for a lazy model's load is part of it."""
    with _server([_local("gpt2", tiny["gpt2"], default=True, preload=False)], tmp_path) as server:
        body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}
        with requests.post(f"{server.url}/generate_stream", json=body, stream=True) as r:
            assert r.status_code == 200 and len([line for line in r.iter_lines() if line]) == 3
        load = server.state.registry.lookup("gpt2").backend.load_seconds
        count, total = _ttft(server, "gpt2")
        assert count == 1 and total >= load > 0
        for path in ("/generate", "/"):
            assert requests.post(server.url + path, json=body).ok
        assert OpenAI(base_url=f"{server.url}/v1", api_key="x").completions.create(
            model="gpt2", prompt="Hi", max_tokens=2
        )
        count, _ = _ttft(server, "gpt2")
        assert count == 4


def test_estimated_time_comes_from_measured_loads(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The 503's `estimated_time` is the model's last load time kept in the cache dir or, for a model
    never loaded here, its size at the load rate measured on the others."""
    history = tmp_path / "load-times.json"
    with _server([_local("sentiment", tiny["sentiment"]), _local("ner", tiny["ner"], preload=False)], tmp_path) as s:
        s.wait_ready()
        assert requests.post(f"{s.url}/models/ner", json={"inputs": "My name is Sarah"}).ok  # loads it
    records = json.loads(history.read_text())
    assert len(records) == 2 and all(r["seconds"] > 0 and r["bytes"] > 0 for r in records.values())
    ner_key = next(key for key in records if str(tiny["ner"]) in key)
    # As if these loads had been slow: the next start expects the same.
    for record in records.values():
        record["seconds"] = 40.0
    history.write_text(json.dumps(records))
    sizes = {key: r["bytes"] for key, r in records.items()}

    models = [_local("ner", tiny["ner"], preload=False), _local("mlm", tiny["mlm"], preload=False)]
    with _server(models, tmp_path) as s:
        lazy = {"inputs": "My name is Sarah", "options": {"wait_for_model": False}}
        r = requests.post(f"{s.url}/models/ner", json=lazy)
        assert r.status_code == 503 and 35 < r.json()["estimated_time"] <= 40.0
        assert r.headers["retry-after"] == str(round(r.json()["estimated_time"]))
        mlm_bytes = sum(f.stat().st_size for f in tiny["mlm"].rglob("*") if f.is_file())
        rate = sum(sizes.values()) / (40.0 * len(sizes))
        r = requests.post(
            f"{s.url}/models/mlm", json={"inputs": "life is [MASK] .", "options": {"wait_for_model": False}}
        )
        assert r.status_code == 503 and r.json()["estimated_time"] == pytest.approx(mlm_bytes / rate, abs=0.5)
        assert requests.post(f"{s.url}/models/ner", json={"inputs": "My name is Sarah"}).ok
    assert json.loads(history.read_text())[ner_key]["seconds"] < 40.0  # the new measurement replaces it
