"""The admin flows: keys created, listed and revoked in the SQLite store; usage per key and model."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gateway.auth.keys import Limit
from gateway.auth.store import describe
from gateway.errors import GatewayError, InvalidRequest
from gateway.protocol.admin import CreateKey
from gateway.state import AppState


class KeyNotFound(GatewayError):
    status_code = 404
    openai_type = "invalid_request_error"
    hf_error_type = "not_found"
    code = "key_not_found"


class NoKeyStore(InvalidRequest):
    status_code = 409
    code = "no_key_store"


def _store(state: AppState) -> Any:
    if state.access.store is None:
        raise NoKeyStore("Keys are managed only with a key store: set server.key_db (GATEWAY_SERVER__KEY_DB).")
    return state.access.store


async def create_key(state: AppState, body: CreateKey) -> dict[str, Any]:
    """A new key: its token is in this answer only."""
    store = _store(state)
    # names and aliases, each to the configured name a key's list holds
    canonical = {n: e.spec.name for e in state.registry.entries for n in (e.spec.name, *e.spec.aliases)}
    unknown = sorted(set(body.models or ()) - set(canonical)) + sorted(set(body.model_limits) - set(canonical))
    if unknown:
        raise InvalidRequest(f"Unknown models: {', '.join(unknown)}.", param="models")
    expires = body.expires_at if body.expires_in is None else time.time() + body.expires_in
    key, token = await asyncio.to_thread(
        store.create,
        body.name,
        scopes=body.scopes,
        models=None if body.models is None else [canonical[m] for m in body.models],
        limit=Limit(body.limits.rpm, body.limits.tpm),
        model_limits={canonical[m]: Limit(lim.rpm, lim.tpm) for m, lim in body.model_limits.items()},
        expires_at=expires,
    )
    await state.access.reload()
    return {**describe(key), "key": token}


async def list_keys(state: AppState) -> dict[str, Any]:
    return {"object": "list", "data": [describe(k) for k in state.access.keys()]}


async def revoke_key(state: AppState, key_id: str) -> dict[str, Any]:
    store = _store(state)
    if not await asyncio.to_thread(store.revoke, key_id):
        raise KeyNotFound(f"No key with id '{key_id}' in the key store.")
    await state.access.reload()
    return {"id": key_id, "revoked": True}
