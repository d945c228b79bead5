"""``/healthz`` (the process answers), ``/readyz`` (its dependencies answer), ``/metrics``."""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.web.keys import METRICS, METRICS_REFRESH, READINESS

log = structlog.get_logger()

_READINESS_TIMEOUT_S = 2.0


async def healthz(_request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: every registered dependency check answers True within two seconds."""
    checks = request.app.get(READINESS, {})
    results: dict[str, bool] = {}
    for name, check in checks.items():
        try:
            async with asyncio.timeout(_READINESS_TIMEOUT_S):
                results[name] = bool(await check())
        except Exception:  # noqa: BLE001 - any failure of a dependency means "not ready"
            results[name] = False
    ready = all(results.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": results},
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this instance's registry."""
    for refresh in request.app.get(METRICS_REFRESH, []):
        try:
            async with asyncio.timeout(_READINESS_TIMEOUT_S):
                await refresh()
        except Exception as exc:  # noqa: BLE001 - stale gauges beat a failed scrape
            log.warning("metrics_refresh_failed", error=f"{type(exc).__name__}: {exc}")
    registry = request.app[METRICS].registry
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def health_routes() -> list[web.RouteDef]:
    """The health and metrics routes."""
    return [
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics),
    ]
