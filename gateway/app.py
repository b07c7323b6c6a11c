"""The app factory. Importing this module has no side effects."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from gateway import __version__, tracing
from gateway.auth.access import Access
from gateway.backends.registry import BackendFactory, Registry, default_backend_factory
from gateway.cache import MemoryCache, RedisCache
from gateway.config import ServerSettings, Settings
from gateway.error_handlers import install_error_handlers
from gateway.metrics import Metrics
from gateway.middleware import GatewayMiddleware
from gateway.routes import (
    admin_keys,
    admin_models,
    hf_tasks,
    openai_chat,
    openai_completions,
    openai_embeddings,
    openai_models,
    ops,
    tgi,
    ui,
)
from gateway.routes.common.direct import DirectRoutes
from gateway.routes.common.responses import FastJSONResponse
from gateway.state import AppState

log = logging.getLogger(__name__)

# gateway/tracing.py makes our spans; FastAPI's own OpenTelemetry would add a second set, and it
# checks its providers on every request even when none is configured.
NO_FASTAPI_TELEMETRY: Any = {"tracing": False, "metrics": False, "logs": False}

ROUTE_MODULES = (
    openai_chat,
    openai_completions,
    openai_embeddings,
    openai_models,
    ops,
    admin_keys,
    admin_models,
    tgi,
    ui,
    hf_tasks,
)


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
    server = settings.server
    if server.otel:
        tracing.enable()
    redis = shared_redis(server.redis_url)
    access = Access(server.api_keys, server.key_db, redis)
    metrics.count_key_usage(lambda: access.usage.totals)
    state = AppState(
        settings=settings, registry=registry, metrics=metrics, access=access, settings_source=settings_source
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        await registry.start()
        await access.start()
        try:
            yield
        finally:
            await access.close()
            await registry.close()
            if redis is not None:
                await redis.aclose()

    app = FastAPI(
        title="gateway",
        version=__version__,
        lifespan=lifespan,
        default_response_class=FastJSONResponse,
        telemetry=NO_FASTAPI_TELEMETRY,
    )
    app.state.gateway = state
    install_error_handlers(app)
    # The router tries routes in order on every request: the hot inference routes go first, ahead
    # of FastAPI's own /openapi.json and /docs; the catch-all `/models/{model_id:path}` routes last.
    # The routes themselves, not include_router: FastAPI matches an included router lazily on
    # every request (twice), which cost a measurable share of the upstream hot path.
    app.router.routes[:0] = [route for module in ROUTE_MODULES for route in module.router.routes]
    app.add_middleware(DirectRoutes, fastapi=app)  # inside GatewayMiddleware: the hot routes, unframed
    app.add_middleware(
        GatewayMiddleware,
        metrics=metrics,
        settings=server,
        access=access,
        drain=state.drain,
        cache=response_cache(server, redis),
        models_digest=registry.models_digest,
    )
    if server.cors_origins:  # outermost: a preflight is answered before any key is asked for
        add_cors(app, server)
    return app


def add_cors(app: FastAPI, server: ServerSettings) -> None:
    app.add_middleware(
        CORSMiddleware,
        allow_origins=server.cors_origins,
        allow_methods=server.cors_methods,
        allow_headers=server.cors_headers,
        expose_headers=CORS_EXPOSED,
        max_age=600,
    )


# Response headers a browser app may read (rate limits, cache, request id).
CORS_EXPOSED = [
    "x-request-id",
    "x-cache",
    "retry-after",
    *(f"x-ratelimit-{what}-{kind}" for what in ("limit", "remaining", "reset") for kind in ("requests", "tokens")),
]


def response_cache(server: ServerSettings, redis: Any) -> MemoryCache | RedisCache | None:
    if not server.response_cache:
        return None
    if redis is not None:
        return RedisCache(redis, server.response_cache_ttl)
    return MemoryCache(server.response_cache_entries, server.response_cache_ttl)


def shared_redis(url: str | None) -> Any:
    """The asyncio Redis client for limits and the cache, or None (everything stays in this process)."""
    if url is None:
        return None
    import redis.asyncio

    return redis.asyncio.Redis.from_url(url)
