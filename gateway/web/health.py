"""``/healthz`` (the process answers), ``/readyz`` (its dependencies answer), ``/metrics``.

A readiness check may be expensive (the ledger's proves a committed write): ``cached`` wraps it
so a balancer scraping many times a second runs it at most once per ``ttl_s``, one run shared by
every request that arrives meanwhile, and logs when the answer changes.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.web.keys import METRICS, METRICS_REFRESH, READINESS

log = structlog.get_logger()

_READINESS_TIMEOUT_S = 2.0


Check = Callable[[], Awaitable[bool]]


def cached(
    name: str,
    check: Check,
    *,
    ttl_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
) -> Check:
    """``check`` run at most once per ``ttl_s``; callers meanwhile share the last answer.

    A failure (an exception) is an answer too: cached for ``ttl_s`` and raised again to each
    caller. A change of answer is logged (``readiness_changed``) with the error.
    """
    state: dict[str, object] = {"at": None, "ok": None, "error": None}
    lock = asyncio.Lock()

    async def run() -> bool:
        async with lock:
            at = state["at"]
            if not (isinstance(at, float) and clock() - at < ttl_s):
                try:
                    ok, error = bool(await check()), None
                except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
                    ok, error = False, exc
                if ok != state["ok"]:
                    reason = None if error is None else f"{type(error).__name__}: {error}"
                    log_method = log.info if ok else log.warning
                    log_method("readiness_changed", check=name, ready=ok, error=reason)
                state.update(at=clock(), ok=ok, error=error)
        failure = state["error"]
        if isinstance(failure, Exception):
            raise failure
        return bool(state["ok"])

    return run


async def healthz(_request: web.Request) -> web.Response:
    """Liveness: the event loop answers; ``worker`` (and ``X-Gateway-Worker``) is its pid.

    With ``gateway serve --workers N`` the workers share one port: the pid tells an operator
    (and a test) which of them answered.
    """
    worker = str(os.getpid())
    return web.json_response(
        {"status": "ok", "worker": int(worker)}, headers={"X-Gateway-Worker": worker}
    )


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
