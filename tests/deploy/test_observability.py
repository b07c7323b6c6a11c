"""The dashboard, the alert rules and the autoscaling query against reality: a real Prometheus (Debian's
package) scrapes a real gateway under a short load, and every panel query, every alert's signal and
KEDA's query must return data. A renamed metric breaks this test, not the dashboard."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.helpers import ROOT, LiveServer, free_port, settings_for
from tests.tiny_models import build_tiny_llama
from tests.upstream.conftest import upstream

DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "gateway.json"
SCALEDOBJECT = DEPLOY / "kubernetes" / "base" / "scaledobject.yaml"
# What Grafana puts in for its variables when it sends a panel's query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".*"}
# An alert's expression is `<signal> <comparison> <threshold>`.
COMPARISON = re.compile(r"^(?P<signal>.+?)\s*(?:>|<|==|!=|>=|<=)\s*[0-9.]+\s*$", re.S)
CHAT = [{"role": "user", "content": "hello world"}]


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} not installed (.ci/run installs Debian's prometheus package)")
        pytest.skip(f"{name} not installed: apt-get install prometheus")
    return path


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([tool("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, cache_dir: str, fake_server: LiveServer) -> Iterator[LiveServer]:
    """A local model (queue, batch, TTFT, ITL), a model relayed to a working upstream, a routed model
    whose upstream is down (retries, a fallback, a cooldown) and an upstream-only model that fails (5xx)."""
    tiny = str(build_tiny_llama(tmp_path_factory.mktemp("obs") / "llama"))
    local = {"kind": "local", "source": tiny, "dtype": "float32"}
    dead = upstream(f"http://127.0.0.1:{free_port()}/v1")  # nothing listens there: connection refused
    models = [
        {"name": "tiny", "task": "text-generation", "default": True, "backend": local},
        {
            "name": "routed",
            "task": "text-generation",
            "deployments": [{"name": "remote", "backend": dead}, {"name": "local", "backend": local}],
            # Never cooled down: every request tries the dead upstream (retries), then falls back.
            "routing": {"fallback": ["local"], "cooldown": {"failures": 1000}},
        },
        {"name": "down", "task": "text-generation", "backend": dead},
        {"name": "relay", "task": "text-generation", "backend": upstream(f"{fake_server.url}/v1", model="fake-chat")},
    ]
    with LiveServer(settings_for(models, access_log=False).model_copy(update={"cache_dir": Path(cache_dir)})) as gw:
        gw.wait_ready(120)
        yield gw


@pytest.fixture(scope="module")
def prometheus(gateway: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = tool("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": "gateway",
                # `namespace` as the Prometheus operator labels a pod's series (KEDA's query filters on it).
                "static_configs": [{"targets": [f"127.0.0.1:{gateway.port}"], "labels": {"namespace": "gateway"}}],
            }
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address={url.removeprefix('http://')}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "prometheus.log", "wb"),
    )
    try:
        wait_for(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 30, proc)
        wait_for(lambda: bool(query(url, 'up{job="gateway"} == 1')), 30, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def wait_for(check: Any, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "prometheus exited"
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("prometheus did not get there")


def query(url: str, expr: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "success", f"{expr}: {body.get('error')}"
    return list(body["data"]["result"])


def has_numbers(result: list[dict[str, Any]], nonzero: bool = False) -> bool:
    """Some series has a number (not NaN), and with `nonzero` one that is not 0 (a counter that moved)."""
    values = [float(series["value"][1]) for series in result]
    return any(not math.isnan(v) and (v != 0 or not nonzero) for v in values)


def load(gateway: LiveServer) -> None:
    """A short mixed load: concurrent streams and whole answers, fallbacks and failures."""
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def chat(model: str, stream: bool) -> None:
        try:
            answer = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, stream=stream)
            if stream:
                list(answer)
        except openai.APIStatusError:
            assert model == "down"

    calls = (
        [("tiny", i % 2 == 0) for i in range(16)]
        + [("routed", True)] * 3
        + [("down", False)] * 3
        + [("relay", True)] * 3
    )
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda call: chat(*call), calls))


def scrapes_after(prometheus: str, count: int) -> None:
    def scrapes() -> float:
        return float(query(prometheus, 'count_over_time(up{job="gateway"}[1h])')[0]["value"][1])

    target, deadline = scrapes() + count, time.monotonic() + 30
    while scrapes() < target:
        assert time.monotonic() < deadline, "prometheus stopped scraping"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def loaded(gateway: LiveServer, prometheus: str) -> str:
    # Two waves with scrapes between: a series is born with its first value, so rate() sees only
    # the increases after a scrape has seen it.
    for _ in range(2):
        load(gateway)
        scrapes_after(prometheus, 2)
    return prometheus


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            found.append((f"{panel['title']} [{target['refId']}]", expr))
    return found


def test_every_dashboard_panel_has_data(loaded: str) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 15
    # Rates must have moved; gauges (queue depth, cooldowns, model state) may read 0 at rest.
    empty = [title for title, expr in queries if not has_numbers(query(loaded, expr), nonzero="rate(" in expr)]
    assert not empty, f"panels without data: {empty}"
    # The dashboard's model picker.
    resp = httpx.get(f"{loaded}/api/v1/label/model/values", params={"match[]": "gateway_model_state"})
    assert set(resp.json()["data"]) == {"tiny", "routed", "down", "relay"}


def test_every_alert_is_sound(loaded: str) -> None:
    rules = [r for group in yaml.safe_load(ALERTS.read_text())["groups"] for r in group["rules"]]
    names = {r["alert"] for r in rules}
    assert {"GatewayHighErrorRate", "GatewaySlowTimeToFirstToken", "GatewayQueueSaturated"} <= names
    for rule in rules:
        match = COMPARISON.match(rule["expr"])
        assert match, f"{rule['alert']}: not `<signal> <comparison> <threshold>`"
        signal = match["signal"]
        assert has_numbers(query(loaded, signal), "rate(" in signal), f"{rule['alert']}: its signal has no data"
        query(loaded, rule["expr"])  # the whole expression evaluates (empty while all is well)
    # Prometheus itself evaluates the loaded rules without error.
    groups = httpx.get(f"{loaded}/api/v1/rules").json()["data"]["groups"]
    evaluated = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(evaluated) == names
    assert all(r["health"] == "ok" for r in evaluated.values()), evaluated
    # The load made the always-failing model's error rate fire (pending: `for` has not elapsed).
    errors = query(loaded, rules[0]["expr"])
    assert [s["metric"]["model"] for s in errors] == ["down"]


def test_autoscaling_query_has_data(loaded: str) -> None:
    scaled = yaml.safe_load(SCALEDOBJECT.read_text())
    expr = scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert has_numbers(query(loaded, expr))
