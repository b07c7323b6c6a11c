"""The hot routes dispatched without the framework's per-request layers.

Behind our own middleware, every request to a FastAPI app still passes Starlette's
ExceptionMiddleware (a Request object and an exception wrapper), FastAPI's
AsyncExitStackMiddleware (an AsyncExitStack per request) and the router, which tries the
routes in order. For a route with a fixed path whose endpoint takes the bare Request
(`RawRequestRoute`: no dependencies, so no exit stack is needed) that is pure cost on the
upstream hot path (docs/benchmarks-upstream.md). `DirectRoutes` sits inside the gateway's
middleware and hands such a request straight to its route: the scope gets what the router
would have put there (the route, for the metrics label; the endpoint; the path parameters) and
the app's exception handlers, which the route's own wrapper applies exactly as before. Every
other request goes through the framework unchanged.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.routes.common.body import RawRequestRoute


class DirectRoutes:
    def __init__(self, app: ASGIApp, *, fastapi: FastAPI) -> None:
        self.app = app
        self.fastapi = fastapi
        self._table: dict[tuple[str, str], tuple[RawRequestRoute, dict[str, Any]]] | None = None
        self._handlers: tuple[Any, Any] = ({}, {})

    def _build(self) -> dict[tuple[str, str], tuple[RawRequestRoute, dict[str, Any]]]:
        """(method, path) -> (route, what its match puts in the scope), for the raw routes with
        fixed paths that come first in the router's order for that path (so a request goes where
        the router would send it). A fixed path's match is the same for every request, so it is
        taken once here instead of matching (a regular expression) per request."""
        table: dict[tuple[str, str], tuple[RawRequestRoute, dict[str, Any]]] = {}
        routes = self.fastapi.router.routes
        for route in routes:
            path = getattr(route, "path", None)
            if not isinstance(route, RawRequestRoute) or not isinstance(path, str) or "{" in path:
                continue
            for method in route.methods or ():
                probe = {"type": "http", "method": method, "path": path, "root_path": ""}
                first = next((r for r in routes if r.matches(probe)[0] is Match.FULL), None)
                if first is route:
                    child = dict(route.matches(probe)[1])
                    child.pop("path_params", None)  # a fresh dict per request (empty: no parameters)
                    table[(method, path)] = (route, child)
        # The same handlers the app's ExceptionMiddleware holds (500/Exception stay outermost).
        handlers = {k: v for k, v in self.fastapi.exception_handlers.items() if k not in (500, Exception)}
        middleware = ExceptionMiddleware(self.app, handlers=handlers)
        self._handlers = (middleware._exception_handlers, middleware._status_handlers)
        return table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        table = self._table
        if table is None:
            table = self._table = self._build()
        found = table.get((scope.get("method", ""), scope.get("path", ""))) if scope["type"] == "http" else None
        if found is None or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        route, child = found
        scope.update(child)
        scope["path_params"] = {}
        scope["router"] = self.fastapi.router
        scope["starlette.exception_handlers"] = self._handlers
        await route.app(scope, receive, send)
