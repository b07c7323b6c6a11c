"""Embeddings through the openai SDK: float and base64 (the SDK's default) must agree."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from tests.helpers import LiveServer


@pytest.fixture()
def client(fake_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fake_server.url}/v1", api_key="sk-test", max_retries=0)


def test_float_and_base64_agree(client: openai.OpenAI, fake_server: LiveServer) -> None:
    texts = ["first sentence", "second one"]
    floats = client.embeddings.create(model="fake-embed", input=texts, encoding_format="float")
    default = client.embeddings.create(model="fake-embed", input=texts)  # SDK sends base64 and decodes it
    assert [d.index for d in floats.data] == [0, 1]
    for a, b in zip(floats.data, default.data, strict=False):
        assert len(a.embedding) == 8
        np.testing.assert_allclose(a.embedding, b.embedding, rtol=1e-6)
    raw = httpx.post(
        f"{fake_server.url}/v1/embeddings", json={"model": "fake-embed", "input": "x", "encoding_format": "base64"}
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert decoded.shape == (8,)
    assert raw["usage"] == {"prompt_tokens": 1, "total_tokens": 1}


def test_dimensions_and_validation(client: openai.OpenAI) -> None:
    resp = client.embeddings.create(model="fake-embed", input="abc", dimensions=4, encoding_format="float")
    assert len(resp.data[0].embedding) == 4
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="fake-embed", input="")
    assert info.value.param == "input"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="fake-chat", input="x")
