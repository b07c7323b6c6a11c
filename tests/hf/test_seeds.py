"""The seed documents' code (../shared/seeds/) with only the URL changed, against the gateway.

Where the seeds give `model="gpt2"` to an InferenceClient method, the model argument becomes
the model's URL on this server: that is the only change.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from huggingface_hub import AsyncInferenceClient, InferenceClient
from openai import OpenAI

from tests.helpers import LiveServer, settings_for

token = "hf_unused"


def test_requests_text_generation(hf_server: LiveServer) -> None:
    API_URL = f"{hf_server.url}/models/gpt2"
    headers = {"Authorization": f"Bearer {token}"}

    def query(payload: object) -> object:
        response = requests.post(API_URL, headers=headers, json=payload)
        return response.json()

    result = query(
        {
            "inputs": "The future of AI is",
            "parameters": {"max_new_tokens": 50, "temperature": 0.7, "top_p": 0.95, "do_sample": True},
        }
    )
    # A str, maybe empty: the tiny random model samples its end token (or bytes of no whole
    # character, then the end) first in about 2 runs of 300. Non-empty answers are checked where
    # decoding is greedy (tests/hf/test_text_generation.py).
    assert isinstance(result, list) and isinstance(result[0]["generated_text"], str)

    data = query("Can you please let us know more details about your ")  # a bare JSON string
    assert isinstance(data, list) and isinstance(data[0]["generated_text"], str)


def test_curl_style_form_body(hf_server: LiveServer) -> None:
    # curl -X POST -d '"Can you please ..."' sends application/x-www-form-urlencoded
    r = requests.post(
        f"{hf_server.url}/models/gpt2",
        data='"Can you please let us know more details about your "',
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200 and isinstance(r.json()[0]["generated_text"], str)


def test_inference_client_text_generation(hf_server: LiveServer) -> None:
    client = InferenceClient(token=token)
    response = client.text_generation(
        "The meaning of life is",
        model=f"{hf_server.url}/models/gpt2",
        max_new_tokens=100,
        temperature=0.7,
        return_full_text=True,
    )
    assert response.startswith("The meaning of life is")

    response = client.text_generation(
        "Write a poem about Python programming",
        model=f"{hf_server.url}/models/gpt2",
        max_new_tokens=200,
        temperature=0.8,
        top_p=0.9,
        top_k=50,
        repetition_penalty=1.2,
        do_sample=True,
        seed=42,  # For reproducibility
    )
    again = client.text_generation(
        "Write a poem about Python programming",
        model=f"{hf_server.url}/models/gpt2",
        max_new_tokens=200,
        temperature=0.8,
        top_p=0.9,
        top_k=50,
        repetition_penalty=1.2,
        do_sample=True,
        seed=42,
    )
    assert response == again


def test_task_examples(hf_server: LiveServer) -> None:
    from PIL import Image

    client = InferenceClient(token=token)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 120, 200)).save(buf, "JPEG")
    # Stands in for the downloaded cats.jpg. The seed passes a PIL image; huggingface_hub 2.4 refuses
    # those client-side for URL models ("Expected binary inputs"), so the bytes are passed instead.
    image = buf.getvalue()
    assert Image.open(io.BytesIO(image)).size == (64, 48)
    results = client.image_classification(image, model=f"{hf_server.url}/models/vit")
    lines = [f"{result['label']}: {result['score']:.2%}" for result in results[:5]]
    assert len(lines) == 3

    result = client.text_classification(
        "I love using Hugging Face models!", model=f"{hf_server.url}/models/acme/sentiment"
    )
    line = f"Sentiment: {result[0]['label']} ({result[0]['score']:.2%})"
    assert re.fullmatch(r"Sentiment: (NEGATIVE|POSITIVE) \(\d+\.\d\d%\)", line), line
    assert result[0]["score"] == max(r["score"] for r in result)  # the first label is the best one

    text = "My name is John and I work at Microsoft in Seattle."
    entities = client.token_classification(text, model=f"{hf_server.url}/models/ner")
    lines = [f"{entity['word']}: {entity['entity_group']} ({entity['score']:.2f})" for entity in entities]
    assert lines, "a random 5-label model still tags some words"
    for entity, line in zip(entities, lines, strict=True):
        assert re.fullmatch(r"\S.*: (PER|LOC) \([01]\.\d\d\)", line), line
        assert text[entity["start"] : entity["end"]].lower() == entity["word"].replace(" ##", "").replace("##", "")

    result = client.zero_shot_classification(
        "This is a great movie with excellent acting and cinematography",
        candidate_labels=["positive", "negative", "neutral"],
        model=f"{hf_server.url}/models/nli",
    )
    # The seed reads result['labels'] / result['scores'] (the old hosted shape); huggingface_hub
    # 2.4 only parses the flat list, which is what the server sends.
    assert sorted(r["label"] for r in result) == ["negative", "neutral", "positive"]


def test_streaming_examples(hf_server: LiveServer) -> None:
    client = InferenceClient(token=token)
    stream = client.text_generation(
        "Write a comprehensive guide to machine learning",
        model=f"{hf_server.url}/models/gpt2",
        max_new_tokens=50,
        stream=True,
    )
    printed = "".join(chunk for chunk in stream)
    assert printed

    async def stream_generation() -> str:
        async_client = AsyncInferenceClient(token=token)
        stream = await async_client.text_generation(
            "Explain quantum computing", model=f"{hf_server.url}/models/gpt2", max_new_tokens=20, stream=True
        )
        return "".join([chunk async for chunk in stream])

    assert asyncio.run(stream_generation())


def test_batch_and_parallel_examples(hf_server: LiveServer) -> None:
    API_URL = f"{hf_server.url}/models/gpt2"
    headers = {"Authorization": f"Bearer {token}"}
    inputs = ["The capital of France is", "The speed of light is", "The largest planet is"]
    payload = {"inputs": inputs, "parameters": {"max_new_tokens": 20}}
    response = requests.post(API_URL, headers=headers, json=payload)
    results = response.json()
    assert len(results) == 3
    for i, result in enumerate(results):
        alone = requests.post(API_URL, json={"inputs": inputs[i], "parameters": {"max_new_tokens": 20}}).json()
        assert result["generated_text"] == alone[0]["generated_text"]  # same order, same (greedy) answer

    client = InferenceClient(token=token)

    def process_single(text: str) -> str:
        return client.text_generation(text, model=API_URL, max_new_tokens=50)

    texts = ["Tell me about " + topic for topic in ["AI", "space", "oceans", "history"]]
    start = time.time()
    with ThreadPoolExecutor(max_workers=4) as executor:
        parallel = list(executor.map(process_single, texts))
    assert time.time() - start < 60
    assert parallel == [process_single(t) for t in texts]


def test_dedicated_endpoint_openai_examples(hf_server: LiveServer) -> None:
    client = OpenAI(base_url=f"{hf_server.url}/v1/", api_key=token)
    response = client.chat.completions.create(
        model="tgi",
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Explain machine learning in simple terms"},
        ],
        temperature=0.7,
        max_tokens=200,
    )
    assert isinstance(response.choices[0].message.content, str)
    stream = client.chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": "Write a story"}], stream=True, max_tokens=30
    )
    assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content) > 0


def test_model_loading_example(hf_server: LiveServer) -> None:
    """`options.wait_for_model` false answers 503 with estimated_time while a lazy model loads."""
    API_URL = f"{hf_server.url}/models/lazy-sentiment"
    payload = {"inputs": "I love it"}
    response = requests.post(API_URL, json={**payload, "options": {"wait_for_model": False, "use_cache": True}})
    assert response.status_code == 503
    body = response.json()
    assert body["estimated_time"] > 0 and "loading" in body["error"] and response.headers["retry-after"]

    def query_with_wait(payload: dict, wait_for_model: bool = True) -> object:
        payload_with_options = {**payload, "options": {"wait_for_model": wait_for_model, "use_cache": True}}
        response = requests.post(API_URL, json=payload_with_options)
        if response.status_code == 503:  # Model loading
            time.sleep(min(response.json().get("estimated_time", 20), 0.2))
            return query_with_wait(payload, wait_for_model)
        return response.json()

    result = query_with_wait(payload)
    assert isinstance(result, list) and len(result[0]) == 2
    assert requests.post(API_URL, json={**payload, "options": {"wait_for_model": False}}).status_code == 200


def test_js_fetch_example_body(hf_server: LiveServer) -> None:
    """node-fetch sends `JSON.stringify(data)` as text/plain: still a JSON value, here a bare string."""
    data = "Can you please let us know more details about your "
    response = requests.post(
        f"{hf_server.url}/models/gpt2",
        data=json.dumps(data).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "text/plain;charset=UTF-8"},
    )
    result = response.json()
    assert response.status_code == 200 and isinstance(result[0]["generated_text"], str) and result[0]["generated_text"]
    expected = requests.post(f"{hf_server.url}/models/gpt2", json={"inputs": data}).json()
    assert result == expected


@pytest.fixture
def one_slot_server(tiny: dict[str, Path], tmp_path: Path) -> Iterator[LiveServer]:
    """gpt2 with one batch slot and one waiting place: a third request at once gets 429."""
    backend = {"kind": "local", "source": str(tiny["gpt2"]), "dtype": "float32", "max_batch_size": 1, "max_queue": 1}
    settings = settings_for([{"name": "gpt2", "backend": backend}])
    settings.cache_dir = tmp_path
    with LiveServer(settings) as server:
        server.wait_ready()
        yield server


def test_rate_limiting_example(one_slot_server: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    """The seed's robust_inference: a full queue answers 429 with Retry-After; waiting that long, it succeeds."""
    from requests.exceptions import HTTPError

    API_URL = f"{one_slot_server.url}/models/gpt2"
    headers = {"Authorization": f"Bearer {token}"}

    def robust_inference(payload, max_retries=3):  # noqa: ANN001, ANN202  (the seed's code as written)
        """Handle rate limits with exponential backoff"""
        for attempt in range(max_retries):
            try:
                response = requests.post(API_URL, headers=headers, json=payload)
                response.raise_for_status()
                return response.json()

            except HTTPError as e:
                if e.response.status_code == 429:  # Rate limited
                    retry_after = int(e.response.headers.get("Retry-After", 2**attempt))
                    print(f"Rate limited. Waiting {retry_after}s...")
                    time.sleep(retry_after)
                else:
                    raise

        raise Exception("Max retries exceeded")

    # Quick requests first: Retry-After is the measured time a request holds the slot (10 s before any).
    for _ in range(20):
        assert requests.post(API_URL, json={"inputs": "Hello", "parameters": {"max_new_tokens": 1}}).ok
    engine = one_slot_server.state.registry.lookup("gpt2").backend.engine
    # A long stream holds the slot and a short request waits: the queue is full.
    running = requests.post(
        API_URL, json={"inputs": "Hello", "parameters": {"max_new_tokens": 480}, "stream": True}, stream=True
    )
    assert running.status_code == 200
    with ThreadPoolExecutor(max_workers=2) as pool:
        waiting = pool.submit(requests.post, API_URL, json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
        deadline = time.monotonic() + 30
        while engine.queue_depth() < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.005)
        answer = pool.submit(
            robust_inference, {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 5}}
        )
        printed = ""
        while "Rate limited" not in printed:  # the first attempt found the queue full
            assert time.monotonic() < deadline and not answer.done(), printed
            printed += capsys.readouterr().out
            time.sleep(0.005)
        running.close()  # the client goes away: its slot frees, the waiting request runs, the retry gets in
        result = answer.result(timeout=60)
        assert waiting.result(timeout=60).ok
    assert re.fullmatch(r"Rate limited\. Waiting [1-9]s\.\.\.\n", printed)
    assert isinstance(result, list) and isinstance(result[0]["generated_text"], str)
