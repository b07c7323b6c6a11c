"""Operational routes: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from gateway.routes.common.deps import StateDep
from gateway.routes.common.families import Family, error_responses
from gateway.routes.common.responses import FastJSONResponse
from gateway.services.gauges import refresh_gauges

router = APIRouter(tags=["ops"])


async def health() -> dict[str, str]:
    """The process is alive and its event loop answers."""
    return {"status": "ok"}


async def ready(state: StateDep) -> FastJSONResponse:
    """Every model marked `preload` is loaded, and none has failed since it loaded."""
    registry = state.registry
    models = {e.spec.name: e.backend.state.value for e in registry.entries}
    if state.drain.draining:  # out of the load balancer at once on SIGTERM
        return FastJSONResponse({"status": "draining", "models": models}, status_code=503)
    if broken := registry.broken():
        return FastJSONResponse({"status": "failed", "models": models, "failed": broken}, status_code=503)
    is_ready = registry.ready()
    return FastJSONResponse(
        {"status": "ready" if is_ready else "loading", "models": models}, status_code=200 if is_ready else 503
    )


async def metrics(state: StateDep) -> Response:
    refresh_gauges(state)
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


router.add_api_route("/health", health, methods=["GET"], responses=error_responses(Family.HF))
router.add_api_route(
    "/ready", ready, methods=["GET"], responses={**error_responses(Family.HF), 503: {"description": "Not ready"}}
)
router.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
