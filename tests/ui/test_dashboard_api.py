"""GET /ui/api/dashboard and the pages' auth, through the real HTTP stack over fake backends (no browser)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from gateway.errors import Overloaded
from gateway.services import dashboard
from tests.conftest import FAKE_MODELS
from tests.helpers import LiveServer, settings_for


def test_quantile_interpolates_within_buckets() -> None:
    # 10 observations: 4 up to 0.1, 4 more up to 0.2, 2 more up to 0.4
    buckets = {0.1: 4.0, 0.2: 8.0, 0.4: 10.0, math.inf: 10.0}
    assert dashboard.quantile(0.5, buckets) == pytest.approx(0.125)  # rank 5: a quarter into (0.1, 0.2]
    assert dashboard.quantile(0.2, buckets) == pytest.approx(0.05)  # rank 2: half of (0, 0.1]
    assert dashboard.quantile(0.9, buckets) == pytest.approx(0.3)
    assert dashboard.quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None
    # past the last finite bound, the bound is all that is known (as histogram_quantile answers)
    assert dashboard.quantile(0.99, {0.1: 1.0, 0.2: 1.0, math.inf: 5.0}) == pytest.approx(0.2)


def test_window_is_the_difference_between_readings() -> None:
    then = dashboard.Reading(at=100.0)
    then.counters["requests.2xx"] = 10
    then.histograms["ttft"].update({0.1: 5.0, 1.0: 5.0, math.inf: 5.0})
    now = dashboard.Reading(at=104.0)
    now.counters.update({"requests.2xx": 30, "requests.5xx": 2, "output_tokens": 400})
    now.histograms["ttft"].update({0.1: 5.0, 1.0: 9.0, math.inf: 9.0})  # 4 new, all in (0.1, 1]
    window = dashboard._window(now, then)
    assert window["seconds"] == 4.0
    assert window["rates"]["requests.2xx"] == 5.0 and window["rates"]["requests.5xx"] == 0.5
    assert window["rates"]["output_tokens"] == 100.0
    ttft = window["latency"]["ttft"]
    assert ttft["count"] == 4.0 and 0.1 < ttft["p50"] < ttft["p90"] <= 1.0  # the old 5 are not in the window
    assert dashboard._window(now, None)["rates"]["requests.2xx"] is None


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(settings_for(FAKE_MODELS, api_keys=["k1"])) as live:
        live.wait_ready()
        yield live


def test_pages_are_open_and_data_needs_the_key(server: LiveServer) -> None:
    for path in ("/ui", "/ui/dashboard", "/ui/static/app.css", "/ui/static/playground.js"):
        resp = httpx.get(server.url + path)
        assert resp.status_code == 200, path
        assert resp.headers["cache-control"] == "no-cache"
    assert httpx.get(server.url + "/ui/static/playground.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(server.url + "/ui/static/../../config.py").status_code in (401, 404)
    assert httpx.get(server.url + "/ui/static/nothing.js").status_code == 404
    refused = httpx.get(server.url + "/ui/api/dashboard")
    assert refused.status_code == 401 and "error" in refused.json()
    assert httpx.get(server.url + "/ui/api/dashboard", headers={"Authorization": "Bearer k1"}).status_code == 200


def test_numbers_follow_the_traffic(server: LiveServer) -> None:
    auth = {"Authorization": "Bearer k1"}
    get = lambda: httpx.get(server.url + "/ui/api/dashboard", headers=auth).json()  # noqa: E731
    first = get()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k1", max_retries=0)
    for _ in range(3):
        stream = client.chat.completions.create(
            model="fake-chat", messages=[{"role": "user", "content": "a b c d e"}], max_tokens=5, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="missing", input="x")
    time.sleep(1.05)  # a later reading than the kept one
    body = get()
    assert body["window"]["seconds"] > 0
    rates, totals = body["window"]["rates"], body["totals"]
    assert totals["requests.2xx"] - first["totals"].get("requests.2xx", 0) == 3  # the dashboard's own polls excluded
    assert totals["requests.4xx"] - first["totals"].get("requests.4xx", 0) == 1
    assert rates["requests.2xx"] > 0 and rates["requests.4xx"] > 0 and rates["output_tokens"] > 0
    ttft, itl = body["window"]["latency"]["ttft"], body["window"]["latency"]["itl"]
    assert ttft["count"] == 3 and ttft["p50"] is not None
    assert itl["count"] >= 3 and itl["p50"] is not None and itl["p50"] <= itl["p99"]
    models = {m["name"]: m for m in body["models"]}
    assert models.keys() == {"fake-chat", "fake-embed"} and models["fake-chat"]["state"] == "ready"
    metrics = httpx.get(server.url + "/metrics", headers={"authorization": "Bearer k1"}).text  # what Prometheus scrapes
    assert 'gateway_inter_token_latency_seconds_count{model="fake-chat"}' in metrics


def test_deployments_cooling_down_and_fallbacks() -> None:
    model = {
        "name": "m",
        "task": "text-generation",
        "deployments": [{"name": "a", "backend": {"kind": "fake"}}, {"name": "b", "backend": {"kind": "fake"}}],
        "routing": {"fallback": ["b"], "cooldown": {"failures": 1, "seconds": 60}},
    }
    with LiveServer(settings_for([model])) as live:
        live.wait_ready()
        first = live.state.registry.lookup("m").backend.deployments[0].backend

        async def overloaded(*_args: object, **_kwargs: object):  # noqa: ANN202
            raise Overloaded("queue full", retry_after=1)
            yield  # an async generator, like the real generate_stream

        first.generate_stream = overloaded
        url = f"{live.url}/ui/api/dashboard"
        httpx.get(url)
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0)
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True).close()
        time.sleep(0.05)
        body = httpx.get(url).json()
    (routed,) = body["models"]
    assert routed["backend"] == "routed"
    assert {d["name"]: d["state"] for d in routed["deployments"]} == {"a": "cooling_down", "b": "healthy"}
    assert body["totals"]["upstream_fallbacks"] == 1 and body["window"]["rates"]["upstream_fallbacks"] > 0
