"""Usage as OpenAI reports it (prompt_tokens_details), and refused requests counted under their model."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import LiveServer


def client_for(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0)


def test_prompt_tokens_details_on_every_usage(fake_server: LiveServer) -> None:
    """OpenAI always sends usage.prompt_tokens_details; the SDK parses it into a typed object."""
    client = client_for(fake_server)
    msgs = [{"role": "user", "content": "one two three"}]
    chat = client.chat.completions.create(model="fake-chat", messages=msgs, max_tokens=2)  # type: ignore[arg-type]
    completion = client.completions.create(model="fake-chat", prompt=["a b", "c d e"], max_tokens=2)
    chat_chunks = list(
        client.chat.completions.create(
            model="fake-chat",
            messages=msgs,
            max_tokens=2,
            stream=True,
            stream_options={"include_usage": True},  # type: ignore[arg-type]
        )
    )
    completion_chunks = list(
        client.completions.create(
            model="fake-chat",
            prompt=["a b", "c d e"],
            max_tokens=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usages = [chat.usage, completion.usage, chat_chunks[-1].usage, completion_chunks[-1].usage]
    for usage in usages:
        assert usage is not None
        assert isinstance(usage.prompt_tokens_details, openai.types.completion_usage.PromptTokensDetails)
        assert usage.prompt_tokens_details.cached_tokens == 0
    assert chat.usage.prompt_tokens == chat_chunks[-1].usage.prompt_tokens  # type: ignore[union-attr]
    assert completion.usage.prompt_tokens == completion_chunks[-1].usage.prompt_tokens == 5  # type: ignore[union-attr]
    # only the usage chunk carries usage
    assert all(c.usage is None for c in chat_chunks[:-1])


def _requests_by_model(url: str, route: str, status: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "gateway_requests_total" and labels["route"] == route and labels["status"] == status:
                counts[labels["model"]] = sample.value
    return counts


@pytest.mark.parametrize(
    "route, body, model",
    [
        # fails pydantic validation (parse_body)
        ("/v1/chat/completions", {"model": "fake-chat", "messages": [], "max_tokens": 1}, "fake-chat"),
        (
            "/v1/chat/completions",
            {"model": "fake/chat", "messages": [{"role": "user", "content": "x"}], "temperature": 9},
            "fake-chat",
        ),  # an alias counts under the model's name
        ("/v1/completions", {"model": "fake-chat", "prompt": "x", "n": 0}, "fake-chat"),
        ("/v1/embeddings", {"model": "fake-embed", "input": {"not": "valid"}}, "fake-embed"),
        # refused by the extra-field policy, before the model is resolved
        (
            "/v1/chat/completions",
            {"model": "fake-chat", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            "fake-chat",
        ),
        (
            "/v1/completions",
            {"model": "fake-chat", "prompt": "x", "stream_options": {"include_usage": True}},
            "fake-chat",
        ),
        ("/v1/embeddings", {"model": "fake-embed", "input": "x", "frobnicate": 1}, "fake-embed"),
        # the HF client's placeholder name counts under the model it stands for
        ("/v1/chat/completions", {"model": "dummy", "messages": [], "stream": False}, "fake-chat"),
        # a name that is not configured: a bounded label, not the name sent
        ("/v1/chat/completions", {"model": "no-such-model", "messages": []}, "unknown"),
    ],
)
def test_refused_requests_are_counted_under_the_model_they_named(
    fake_server: LiveServer, route: str, body: dict, model: str
) -> None:
    before = _requests_by_model(fake_server.url, route, "400")
    r = httpx.post(f"{fake_server.url}{route}", json=body)
    assert r.status_code == 400, r.text
    after = _requests_by_model(fake_server.url, route, "400")
    assert after.get(model, 0) - before.get(model, 0) == 1
    assert after.get("none", 0) == before.get("none", 0)
    assert "no-such-model" not in after


def test_unknown_model_404_and_bad_json_keep_bounded_labels(fake_server: LiveServer) -> None:
    route = "/v1/chat/completions"
    r = httpx.post(f"{fake_server.url}{route}", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404
    assert _requests_by_model(fake_server.url, route, "404").get("unknown", 0) >= 1
    before = _requests_by_model(fake_server.url, route, "400").get("none", 0)
    r = httpx.post(f"{fake_server.url}{route}", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert _requests_by_model(fake_server.url, route, "400").get("none", 0) == before + 1  # it named no model


@pytest.mark.parametrize(
    "path, route, body",
    [
        # the URL names the model; the body fails validation
        ("/models/fake-chat", "/models/{model_id:path}", {"inputs": "x", "parameters": {"max_new_tokens": -1}}),
        ("/models/fake-chat", "/models/{model_id:path}", {"inputs": "x", "parameters": {"seed": 2**64}}),
        ("/models/fake-chat", "/models/{model_id:path}", b"{not json"),
        ("/models/fake-chat", "/models/{model_id:path}", {"parameters": 5}),
        # TGI routes serve the default text-generation model
        ("/generate", "/generate", {"inputs": "x", "parameters": {"max_new_tokens": -1}}),
        ("/generate", "/generate", b"{not json"),
        ("/generate_stream", "/generate_stream", {"parameters": {}}),
    ],
)
def test_refused_hf_and_tgi_requests_count_under_their_model(
    fake_server: LiveServer, path: str, route: str, body: dict | bytes
) -> None:
    before = _requests_by_model(fake_server.url, route, "422")
    if isinstance(body, bytes):
        r = httpx.post(f"{fake_server.url}{path}", content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(f"{fake_server.url}{path}", json=body)
    assert r.status_code == 422, r.text
    after = _requests_by_model(fake_server.url, route, "422")
    assert after.get("fake-chat", 0) - before.get("fake-chat", 0) == 1, after
    assert after.get("none", 0) == before.get("none", 0)
