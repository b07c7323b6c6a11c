from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FAKE_MODELS
from tests.helpers import LiveServer, settings_for

ADMIN = "admin-token-for-tests"


def team_server(tmp_path: Path, **server: Any) -> LiveServer:
    """A gateway with a bootstrap admin key (config) and a SQLite key store."""
    return LiveServer(settings_for(FAKE_MODELS, api_keys=[ADMIN], key_db=str(tmp_path / "keys.db"), **server))


@pytest.fixture
def team(tmp_path: Path) -> Iterator[LiveServer]:
    with team_server(tmp_path) as server:
        server.wait_ready()
        yield server


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def create_key(url: str, **body: Any) -> dict[str, Any]:
    resp = httpx.post(f"{url}/admin/keys", json=body, headers=bearer(ADMIN), timeout=10)
    assert resp.status_code == 201, resp.text
    data: dict[str, Any] = resp.json()
    return data
