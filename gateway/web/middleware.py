"""Request middleware: log context per request, and the outermost error edge.

Every request gets a ``request_id`` bound in the structlog context (taken from ``X-Request-Id``
when a proxy set one). An unexpected exception is logged with its context and answered with a
plain 500 that reveals nothing; USSD routes answer their own errors in the USSD dialect before
they get here.
"""

from __future__ import annotations

import itertools
import secrets
import time

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.logging import get_logger
from gateway.web.keys import METRICS

log = get_logger()

# Request ids: a random prefix per process and a counter (24 hex digits, unique across workers
# and restarts, not secret); a fresh ``secrets.token_hex`` each would be a syscall per request.
_ID_PREFIX = secrets.token_hex(8)
_id_counter = itertools.count(1)


@web.middleware
async def context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind ``request_id`` and the route; count the request; turn crashes into a logged 500."""
    structlog.contextvars.clear_contextvars()
    request_id = (
        request.headers.get("X-Request-Id", "")[:64] or f"{_ID_PREFIX}{next(_id_counter):08x}"
    )
    route = request.match_info.route.resource
    route_name = route.canonical if route is not None else "unmatched"
    structlog.contextvars.bind_contextvars(request_id=request_id, route=route_name)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
    except web.HTTPException as exc:
        status = exc.status
        raise
    except Exception:
        # The route (bound above) names the handler; the raw path may hold a callback secret.
        log.exception("request_failed", method=request.method)
        return web.Response(status=500, text="internal error\n")
    finally:
        elapsed_s = time.perf_counter() - started
        metrics = request.app.get(METRICS)
        if metrics is not None:
            metrics.count_request(route_name, status)
            if route_name.startswith("/ussd/") and not route_name.endswith("/events"):
                metrics.ussd_hop_seconds.observe(elapsed_s)
        log.debug("request_served", status=status, ms=round(elapsed_s * 1e3, 2))
    response.headers["X-Request-Id"] = request_id
    return response
