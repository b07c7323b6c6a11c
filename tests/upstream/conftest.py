from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.helpers import LiveServer, settings_for
from tests.upstream.fault_server import FaultUpstream

# The HF client refuses every request, localhost included, under HF_HUB_OFFLINE.
os.environ.pop("HF_HUB_OFFLINE", None)


@pytest.fixture
def fault() -> Iterator[FaultUpstream]:
    with FaultUpstream() as server:
        yield server


def upstream(url: str, **extra: Any) -> dict[str, Any]:
    """An upstream backend spec with short timeouts and backoffs, so failure tests run fast."""
    spec: dict[str, Any] = {
        "kind": "upstream",
        "url": url,
        "timeouts": {"connect": 1.0, "per_try": 1.0, "total": 5.0},
        "retry": {"max_retries": 2, "backoff_base": 0.01, "backoff_max": 0.05, "max_retry_after": 2.0},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def front(models: list[dict[str, Any]]) -> LiveServer:
    """Our gateway, in-process on a free port, configured with `models`."""
    return LiveServer(settings_for(models))


def sdk(server: LiveServer, timeout: float = 20) -> openai.OpenAI:
    # max_retries=0: the test sees exactly what the gateway answered, no SDK retries on top.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=timeout)
