"""The playground in a real browser against `gateway serve` with the default models and tiny task models."""

from __future__ import annotations

import contextlib
import io
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.ui.conftest import CHAT, EMBED

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.ui]

# Records every text the streaming answer shows, so the test sees the intermediate DOM states.
WATCH_ANSWER = """() => {
  window.__states = [];
  const list = document.getElementById("messages");
  new MutationObserver(() => {
    const answer = list.querySelector(".message.assistant:last-child .content");
    if (answer && answer.textContent !== window.__states.at(-1)) window.__states.push(answer.textContent);
  }).observe(list, {subtree: true, childList: true, characterData: true});
}"""
ANSWER = "#messages .message.assistant:last-child"


def _settings(page: Any, **values: str) -> None:
    for name, value in values.items():
        page.fill(f"#chat-{name}", value)


def _wait_done(page: Any, timeout: float = 60_000) -> None:
    page.wait_for_selector(f"{ANSWER}:not([aria-busy])", timeout=timeout)


def test_chat_streams_token_by_token(ui_server: str, open_page: Any) -> None:
    tab = open_page(ui_server)
    page = tab.page
    page.goto(f"/ui?model={CHAT}")
    page.wait_for_selector("#chat-input")
    _settings(page, temperature="0", max_tokens="40", system="You are a concise assistant.")
    page.evaluate(WATCH_ANSWER)
    page.fill("#chat-input", "What is the capital of Japan?")
    page.click("#send")
    page.wait_for_selector(f"{ANSWER}[aria-busy]")
    _wait_done(page)
    states: list[str] = page.evaluate("window.__states")
    final = page.text_content(f"{ANSWER} .content") or ""
    assert "Tokyo" in final
    seen = [s for s in states if s]
    assert len(seen) >= 4, f"the answer did not stream: {seen}"
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(seen, seen[1:], strict=False)), seen
    assert seen[-1] == final
    status = page.text_content("#chat-status") or ""
    assert re.search(r"\d+ tokens", status) and "finish:" in status
    # the request as code: every setting the page sent
    code = page.text_content("#code") or ""
    assert code.startswith("curl -N ") and '"max_tokens":40' in code and '"temperature":0' in code
    page.click("#tab-openai")
    code = page.text_content("#code") or ""
    assert "client.chat.completions.create(" in code and "max_tokens=40," in code and "capital of Japan" in code
    compile(code, "<openai code>", "exec")  # valid Python as shown
    page.click("#tab-hf")
    code = page.text_content("#code") or ""
    assert "InferenceClient(base_url=" in code and "temperature=0," in code
    compile(code, "<InferenceClient code>", "exec")
    tab.shot("01-chat-streamed")
    tab.axe()


def _running(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf'gateway_running_requests\{{model="{CHAT}"\}} ([0-9.]+)', text)
    return float(match.group(1)) if match else 0.0


def test_stop_then_regenerate(ui_server: str, open_page: Any) -> None:
    tab = open_page(ui_server)
    page = tab.page
    page.goto(f"/ui?model={CHAT}")
    page.wait_for_selector("#chat-input")
    _settings(page, temperature="0", max_tokens="400")
    page.fill("#chat-input", "Write a very long story about a dragon.")
    page.click("#send")
    page.wait_for_function(f"document.querySelector('{ANSWER} .content')?.textContent.length > 10")
    page.click("#stop")
    page.wait_for_selector(f"{ANSWER} [data-stopped]")
    stopped = page.text_content(f"{ANSWER} .content") or ""
    time.sleep(0.5)
    assert page.text_content(f"{ANSWER} .content") == stopped  # nothing more arrives
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    deadline = time.monotonic() + 5
    while _running(ui_server) != 0:  # the server freed the slot: the browser closed the stream
        assert time.monotonic() < deadline, "generation kept running after Stop"
        time.sleep(0.1)
    tab.shot("02-chat-stopped")
    # regenerate replaces the stopped answer with a new one
    _settings(page, max_tokens="6")
    page.click("#regenerate")
    _wait_done(page)
    assert page.locator("#messages .message.assistant").count() == 1
    assert page.locator("#messages .message.user").count() == 1
    assert "finish: length" in (page.text_content("#chat-status") or "")


def test_embedding_and_similarity(ui_server: str, open_page: Any) -> None:
    tab = open_page(ui_server)
    page = tab.page
    page.goto(f"/ui?model={EMBED}")
    page.click("#run")
    page.wait_for_selector("[data-result=dimensions]")
    assert page.text_content("[data-result=dimensions]") == "384"
    values = re.findall(r"-?\d+\.\d{4}", page.text_content("[data-result=vector]") or "")
    assert len(values) == 8
    tab.shot("03-embedding")
    page.click("button[data-mode=sentence-similarity]")
    page.click("#run")
    page.wait_for_selector("[data-result=similarity]")
    scores = [float(s) for s in page.locator("[data-result=similarity] .bignum").all_text_contents()]
    assert len(scores) == 2 and scores[0] > scores[1] + 0.2  # a guitar is closer to an instrument than to stocks
    tab.shot("04-similarity")
    tab.axe()


def _run_shown_code(code: str) -> str:
    """Run the InferenceClient code the page shows, as a user would paste it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<playground code>", "exec"), {})
    return out.getvalue()


def test_classification_bars_and_code(ui_server: str, open_page: Any) -> None:
    tab = open_page(ui_server, width=375, height=800)  # a phone
    page = tab.page
    page.goto("/ui?model=tiny-sentiment")
    page.fill("#task-text", "the game tonight was great")
    page.click("#run")
    page.wait_for_selector("[data-result=scores]")
    names = page.locator("[data-result=scores] .name").all_text_contents()
    percents = [float(p.rstrip("%")) for p in page.locator("[data-result=scores] .value").all_text_contents()]
    assert sorted(names) == ["NEGATIVE", "POSITIVE"]
    assert percents == sorted(percents, reverse=True) and abs(sum(percents) - 100) < 0.2
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # no sideways scrolling on a phone
    tab.shot("05-classification-phone")
    tab.axe()
    page.click("#tab-hf")
    printed = _run_shown_code(page.text_content("#code") or "")
    scores = {label: float(score) for label, score in re.findall(r"label='(\w+)', score=([0-9.e-]+)", printed)}
    assert scores.keys() == set(names), printed
    for name, percent in zip(names, percents, strict=True):  # the code reproduces what the page drew
        assert abs(scores[name] * 100 - percent) <= 0.051, (name, percent, printed)


def test_token_classification_and_qa_spans(ui_server: str, open_page: Any) -> None:
    tab = open_page(ui_server)
    page = tab.page
    page.goto("/ui?model=tiny-ner")
    page.select_option("#task-aggregation_strategy", "none")
    page.click("#run")
    page.wait_for_selector("[data-result=spans]")
    sentence = "My name is Sarah and I live in London"  # the form's example
    answer = httpx.post(
        f"{ui_server}/models/tiny-ner", json={"inputs": sentence, "parameters": {"aggregation_strategy": "none"}}
    ).json()
    marks = page.locator("[data-result=spans] mark")
    assert marks.count() == len(answer)  # one highlight per entity, tagged with its label
    for i, entity in enumerate(answer):
        assert marks.nth(i).text_content() == sentence[entity["start"] : entity["end"]] + entity["entity"]
    page.goto("/ui?model=tiny-qa")
    page.click("#run")
    page.wait_for_selector("[data-result=answer]")
    shown = page.text_content("[data-result=answer]")
    marked = page.text_content("[data-result=spans] mark") or ""
    assert shown and marked.startswith(shown)  # the answer is highlighted in its context
    tab.shot("06-question-answering")


def test_image_classification_upload(ui_server: str, open_page: Any, tmp_path: Path) -> None:
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    tab = open_page(ui_server)
    page = tab.page
    page.goto("/ui?model=tiny-vit")
    page.set_input_files("#task-image", str(image))
    page.wait_for_selector("img.preview")
    page.click("#run")
    page.wait_for_selector("[data-result=scores]")
    assert sorted(page.locator("[data-result=scores] .name").all_text_contents()) == ["bird", "cat", "dog"]
    code = page.text_content("#code") or ""
    assert "--data-binary @'red.png'" in code and "Content-Type: image/png" in code
    tab.axe()


def test_zero_shot_and_fill_mask(ui_server: str, open_page: Any) -> None:
    tab = open_page(ui_server)
    page = tab.page
    page.goto("/ui?model=tiny-nli")
    page.fill("#task-labels", "sports, politics, cooking")
    page.click("#run")
    page.wait_for_selector("[data-result=scores]")
    assert sorted(page.locator("[data-result=scores] .name").all_text_contents()) == ["cooking", "politics", "sports"]
    percents = [float(p.rstrip("%")) for p in page.locator("[data-result=scores] .value").all_text_contents()]
    assert abs(sum(percents) - 100) < 0.2  # one label is true: the scores share 1
    page.goto("/ui?model=tiny-mlm")
    page.click("#run")
    page.wait_for_selector("[data-result=scores]")
    expected = httpx.post(f"{ui_server}/models/tiny-mlm", json={"inputs": "life is [MASK] ."}).json()
    assert page.locator("[data-result=scores] .name").all_text_contents() == [e["token_str"] for e in expected]
    tab.axe()
