"""Models at run time: /admin/models... and /admin/config/reload (behind the API keys; the `admin`
scope once keys have scopes). Bodies use the config file's own schemas (ModelSpec, DeploymentSpec)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gateway.config import DeploymentSpec, ModelSpec
from gateway.routes.common.deps import StateDep
from gateway.routes.common.families import OpenAIBodyRoute
from gateway.services import admin_models as admin

router = APIRouter(tags=["admin"], route_class=OpenAIBodyRoute, prefix="/admin")


async def list_models(state: StateDep) -> dict[str, Any]:
    return admin.list_models(state)


async def get_model(name: str, state: StateDep) -> dict[str, Any]:
    return admin.one(state, name)


async def add_model(spec: ModelSpec, state: StateDep, wait: bool = True) -> dict[str, Any]:
    return await admin.add(state, spec, wait=wait)


async def load_model(name: str, state: StateDep) -> dict[str, Any]:
    return await admin.load(state, name)


async def unload_model(name: str, state: StateDep) -> dict[str, Any]:
    return await admin.unload(state, name)


async def remove_model(name: str, state: StateDep) -> dict[str, Any]:
    return await admin.remove(state, name)


async def add_deployment(name: str, deployment: DeploymentSpec, state: StateDep) -> dict[str, Any]:
    return await admin.add_deployment(state, name, deployment)


async def remove_deployment(name: str, deployment: str, state: StateDep) -> dict[str, Any]:
    return await admin.remove_deployment(state, name, deployment)


async def reload_config(state: StateDep) -> dict[str, Any]:
    return await admin.reload_config(state)


# Model names may hold slashes (`org/name`): the routes with a suffix come before the bare name.
router.add_api_route("/models", list_models, methods=["GET"])
router.add_api_route("/models", add_model, methods=["POST"], status_code=201)
router.add_api_route("/models/{name:path}/load", load_model, methods=["POST"])
router.add_api_route("/models/{name:path}/unload", unload_model, methods=["POST"])
router.add_api_route("/models/{name:path}/deployments", add_deployment, methods=["POST"], status_code=201)
router.add_api_route("/models/{name:path}/deployments/{deployment}", remove_deployment, methods=["DELETE"])
router.add_api_route("/models/{name:path}", get_model, methods=["GET"])
router.add_api_route("/models/{name:path}", remove_model, methods=["DELETE"])
router.add_api_route("/config/reload", reload_config, methods=["POST"])
