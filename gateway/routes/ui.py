"""The web UI: the playground (/ui), the live dashboard (/ui/dashboard), their static files, and the
dashboard's one data endpoint. The pages are open (middleware.py); the data behind them needs a key
when keys are configured, which the page asks for and keeps in the browser's session storage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse

from gateway.routes.common.deps import StateDep
from gateway.services import dashboard

STATIC = Path(__file__).resolve().parent.parent / "ui" / "static"  # package data (pyproject.toml)
# A fixed set, read once: a name outside it is a 404 however it is spelled (no path to traverse), and
# each file is served by one route, so /metrics counts it under the route template, not "unmatched".
FILES = frozenset(p.name for p in STATIC.iterdir() if p.is_file())
# revalidated on every load (cheap: an ETag), so a page never runs against stale scripts after an upgrade
_NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(tags=["ui"], include_in_schema=False)


async def playground() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers=_NO_CACHE)


async def dashboard_page() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html", headers=_NO_CACHE)


async def static_file(name: str) -> FileResponse:
    if name not in FILES:
        raise HTTPException(404, f"No file '{name}' in the UI.")
    return FileResponse(STATIC / name, headers=_NO_CACHE)


async def dashboard_data(state: StateDep) -> dict[str, Any]:
    """Each model's state and deployments, and rates and latency percentiles over the last seconds."""
    return dashboard.dashboard(state)


router.add_api_route("/ui", playground, methods=["GET"])
router.add_api_route("/ui/dashboard", dashboard_page, methods=["GET"])
router.add_api_route("/ui/api/dashboard", dashboard_data, methods=["GET"])
router.add_api_route("/ui/static/{name}", static_file, methods=["GET"])
