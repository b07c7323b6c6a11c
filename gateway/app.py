"""The app factory. Importing this module has no side effects."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway import __version__
from gateway.backends.registry import BackendFactory, Registry, default_backend_factory
from gateway.config import Settings
from gateway.error_handlers import install_error_handlers
from gateway.metrics import Metrics
from gateway.middleware import GatewayMiddleware
from gateway.routes import (
    admin,
    hf_tasks,
    openai_chat,
    openai_completions,
    openai_embeddings,
    openai_models,
    ops,
    tgi,
    ui,
)
from gateway.routes.common.responses import FastJSONResponse
from gateway.state import AppState

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    backend_factory: BackendFactory = default_backend_factory,
    settings_source: Callable[[], Settings] | None = None,
) -> FastAPI:
    """`settings_source` reads the configuration again, for POST /admin/config/reload and SIGHUP."""
    metrics = Metrics()
    registry = Registry(settings, backend_factory)
    registry.attach_metrics(metrics)
    state = AppState(settings=settings, registry=registry, metrics=metrics, settings_source=settings_source)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        await registry.start()
        try:
            yield
        finally:
            await registry.close()

    app = FastAPI(
        title="gateway",
        version=__version__,
        lifespan=lifespan,
        default_response_class=FastJSONResponse,
    )
    app.state.gateway = state
    install_error_handlers(app)
    # The router tries routes in order on every request: the hot inference routes go first, ahead
    # of FastAPI's own /openapi.json and /docs; the catch-all `/models/{model_id:path}` routes last.
    # The routes themselves, not include_router: FastAPI matches an included router lazily on
    # every request (twice), which cost a measurable share of the upstream hot path.
    modules = (openai_chat, openai_completions, openai_embeddings, openai_models, ops, tgi, admin, ui, hf_tasks)
    app.router.routes[:0] = [route for module in modules for route in module.router.routes]
    app.add_middleware(
        GatewayMiddleware,
        metrics=metrics,
        api_keys=settings.server.api_keys,
        max_body_bytes=settings.server.max_body_bytes,
    )
    return app
