"""The admin API (scope `admin`): keys (create, list, revoke) and usage per key and model."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gateway.protocol.admin import CreateKey, usage_body
from gateway.routes.common.deps import StateDep
from gateway.routes.common.families import OpenAIBodyRoute
from gateway.services import admin_keys as admin

router = APIRouter(tags=["admin"], route_class=OpenAIBodyRoute)


async def create_key(body: CreateKey, state: StateDep) -> dict[str, Any]:
    """Create a key; the answer's `key` is the token, shown this once (only its hash is kept)."""
    return await admin.create_key(state, body)


async def list_keys(state: StateDep) -> dict[str, Any]:
    return await admin.list_keys(state)


async def revoke_key(key_id: str, state: StateDep) -> dict[str, Any]:
    return await admin.revoke_key(state, key_id)


async def usage(state: StateDep) -> dict[str, Any]:
    """Requests and tokens per key and model (stored totals plus what this process has not flushed)."""
    return usage_body(await state.access.usage_rows())


router.add_api_route("/admin/keys", create_key, methods=["POST"], status_code=201)
router.add_api_route("/admin/keys", list_keys, methods=["GET"])
router.add_api_route("/admin/keys/{key_id}", revoke_key, methods=["DELETE"])
router.add_api_route("/admin/usage", usage, methods=["GET"])
