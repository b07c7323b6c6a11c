from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import LiveServer, settings_for

FAKE_MODELS = [
    {
        "name": "fake-chat",
        "aliases": ["fake/chat"],
        "task": "text-generation",
        "default": True,
        "backend": {"kind": "fake"},
    },
    {"name": "fake-embed", "task": "feature-extraction", "backend": {"kind": "fake", "dimensions": 8}},
]


@pytest.fixture(scope="session")
def fake_server() -> Iterator[LiveServer]:
    """The whole HTTP stack over fake backends: no weights, starts instantly."""
    with LiveServer(settings_for(FAKE_MODELS)) as server:
        server.wait_ready()
        yield server


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("gateway-cache"))
