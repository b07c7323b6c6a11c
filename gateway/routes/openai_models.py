"""GET /v1/models and /v1/models/{id}: every configured model with its state."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from gateway.protocol import openai_responses as wire
from gateway.routes.common.deps import StateDep, context
from gateway.routes.common.families import OpenAIBodyRoute
from gateway.services import models

router = APIRouter(tags=["openai"], route_class=OpenAIBodyRoute)


async def list_models(request: Request, state: StateDep) -> dict[str, Any]:
    return wire.model_list(models.all_models(state, context(request)), created=state.started_at)


async def retrieve_model(model_id: str, request: Request, state: StateDep) -> dict[str, Any]:
    return wire.model_card(models.one_model(state, model_id, context(request)), created=state.started_at)


router.add_api_route("/v1/models", list_models, methods=["GET"])
router.add_api_route("/v1/models/{model_id:path}", retrieve_model, methods=["GET"])
