"""The live dashboard in a real browser, and the pages behind an API key."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from tests.conftest import FAKE_MODELS
from tests.helpers import LiveServer, settings_for
from tests.ui.conftest import CHAT, EMBED

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.ui]


def _tile(page: Any, key: str) -> str:
    return page.text_content(f"[data-tile={key}]") or ""


def _load(url: str, stop: threading.Event) -> None:
    """Streamed chats and embeddings until told to stop: what the dashboard should show moving."""
    body = {
        "model": CHAT,
        "messages": [{"role": "user", "content": "Count to twenty."}],
        "max_tokens": 6,
        "stream": True,
    }
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                for _ in resp.iter_lines():
                    pass
            client.post("/v1/embeddings", json={"model": EMBED, "input": "hello"})
            client.post("/v1/embeddings", json={"model": "no-such-model", "input": "hello"})  # a 4xx


def test_dashboard_numbers_move(ui_server: str, open_page: Any) -> None:
    tab = open_page(ui_server)
    page = tab.page
    page.goto("/ui/dashboard?every=1")
    page.wait_for_selector("#models tbody tr")
    rows = page.locator("#models tbody tr")
    assert rows.count() == 8
    assert page.text_content(f"tr[data-model='{CHAT}'] .badge") == "ready"
    page.wait_for_function("document.querySelector('[data-tile=requests]').textContent !== '–'")
    before = int(_tile(page, "total"))
    stop = threading.Event()
    workers = [threading.Thread(target=_load, args=(ui_server, stop)) for _ in range(2)]  # a batch of two
    for w in workers:
        w.start()
    try:
        # requests, output tokens and both latencies show numbers taken from the load
        for key in ("tokens", "ttft", "itl"):
            page.wait_for_function(f"/[1-9]/.test(document.querySelector('[data-tile={key}]').textContent)")
        page.wait_for_function("/[1-9]/.test(document.querySelector('[data-series=\"4xx\"].legend-value').textContent)")
        assert int(_tile(page, "total")) > before
        # the charts drew lines through the readings (a window without a first token leaves a gap)
        # (readings arrive each second: wait for three under load rather than catch the chart at two)
        drawn = "(document.querySelector(\"#chart-requests path[data-series='2xx']\")?.getAttribute('d') || '')"
        page.wait_for_function(f"{drawn}.split('L').length > 2", timeout=15_000)
        path = page.get_attribute("#chart-requests path[data-series='2xx']", "d") or ""
        assert path.count("L") >= 2
        assert page.get_attribute("#chart-ttft path[data-series='p50']", "d") not in ("", "M0,0")  # M0,0: no point yet
        tab.shot("07-dashboard-under-load")
        phone = open_page(ui_server, width=375, height=800)
        phone.page.goto("/ui/dashboard?every=1")
        phone.page.wait_for_selector("#models tbody tr")
        assert phone.page.evaluate("document.documentElement.scrollWidth") <= 375
        phone.shot("08-dashboard-phone")
    finally:
        stop.set()
        for w in workers:
            w.join()
    tab.axe()


ROUTED = {
    "name": "fake-routed",
    "task": "text-generation",
    "deployments": [{"name": "east", "backend": {"kind": "fake"}}, {"name": "west", "backend": {"kind": "fake"}}],
}


@pytest.fixture(scope="module")
def keyed_server() -> Any:
    with LiveServer(settings_for([*FAKE_MODELS, ROUTED], api_keys=["sekrit"])) as server:
        server.wait_ready()
        yield server


# Chromium logs every refused fetch ("Failed to load resource ... 401"): the page's own way to learn
# that a key is needed, so that one line is allowed in this test and nothing else is.
REFUSED = "the server responded with a status of 401"


def test_pages_ask_for_a_key(keyed_server: LiveServer, open_page: Any) -> None:
    url = keyed_server.url
    assert httpx.get(f"{url}/ui").status_code == 200  # the pages are open...
    assert httpx.get(f"{url}/ui/static/playground.js").status_code == 200
    assert httpx.get(f"{url}/ui/api/dashboard").status_code == 401  # ...the data is not
    tab = open_page(url, allowed=(REFUSED,))
    page = tab.page
    page.goto("/ui")
    page.wait_for_selector("#api-key")
    tab.shot("09-key-asked")
    tab.axe()
    page.fill("#api-key", "wrong")
    page.click("form.keybox button")
    page.wait_for_selector("form.keybox >> text=The key was refused.")
    page.fill("#api-key", "sekrit")
    page.click("form.keybox button")
    page.wait_for_selector("#model:not([disabled])")
    assert page.locator("#model option").count() == len(FAKE_MODELS) + 1
    assert page.evaluate("sessionStorage.getItem('gateway.apiKey')") == "sekrit"
    assert page.evaluate("localStorage.length") == 0  # never kept beyond the tab's session
    # a chat with the key: the code shown reads the key from the environment, never prints it
    page.fill("#chat-input", "hello")
    page.click("#send")
    page.wait_for_selector("#messages .message.assistant:not([aria-busy])")
    code = page.text_content("#code") or ""
    assert "$GATEWAY_API_KEY" in code and "sekrit" not in code
    # the dashboard in the same tab uses the key it holds
    page.goto("/ui/dashboard?every=1")
    page.wait_for_selector("#models tbody tr")
    assert page.locator("#api-key").count() == 0
    deployments = page.locator("tr[data-model='fake-routed'] [data-deployment]")
    assert deployments.all_text_contents() == ["east (fake) healthy", "west (fake) healthy"]
    tab.shot("10-dashboard-with-key")
