"""GET /v1/models and /v1/models/{id}: every configured model with its state."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gateway.backends.registry import Entry
from gateway.routes.common.deps import StateDep

router = APIRouter(tags=["openai"])


def model_card(entry: Entry, created: int) -> dict[str, Any]:
    backend = entry.backend
    info = backend.info()
    card: dict[str, Any] = {
        "id": entry.spec.name,
        "object": "model",
        "created": created,
        "owned_by": "gateway",
        "aliases": entry.spec.aliases,
        "task": entry.task.value if entry.task else None,
        # A model with several deployments has no single backend kind: list them instead.
        "backend": entry.spec.backend.kind if entry.spec.backend is not None else "routed",
        "state": backend.state.value,
    }
    if entry.spec.deployments is not None:
        card["deployments"] = [{"name": d.name, "backend": d.backend.kind} for d in entry.spec.deployments]
    if info.max_total_tokens:
        card["max_model_len"] = info.max_total_tokens
    if backend.error:
        card["error"] = backend.error
    return card


async def list_models(state: StateDep) -> dict[str, Any]:
    created = state.started_at
    return {"object": "list", "data": [model_card(e, created) for e in state.registry.entries]}


async def retrieve_model(model_id: str, state: StateDep) -> dict[str, Any]:
    return model_card(state.registry.lookup(model_id), state.started_at)


router.add_api_route("/v1/models", list_models, methods=["GET"])
router.add_api_route("/v1/models/{model_id:path}", retrieve_model, methods=["GET"])
