import os
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.config import Config
from gateway.metrics import Metrics
from gateway.web.health import health_routes
from gateway.web.keys import CONFIG, METRICS, READINESS
from gateway.web.middleware import context_middleware

ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


def _app(checks: dict[str, Callable[[], Awaitable[bool]]]) -> web.Application:
    app = web.Application(middlewares=[context_middleware])
    app[CONFIG] = Config.load(env={})
    app[METRICS] = Metrics()
    app[READINESS] = checks
    app.add_routes(health_routes())

    async def boom(_request: web.Request) -> web.Response:
        raise RuntimeError("secret detail")

    app.router.add_get("/boom", boom)
    return app


async def _ok() -> bool:
    return True


async def _down() -> bool:
    raise ConnectionError("db gone")


async def test_healthz_answers(aiohttp_client: ClientFactory) -> None:
    """/healthz answers 200 while the process runs."""
    client = await aiohttp_client(_app({}))
    response = await client.get("/healthz")
    assert response.status == 200
    assert response.headers["X-Request-Id"]
    assert response.headers["X-Gateway-Worker"] == str(os.getpid())
    assert (await response.json())["worker"] == os.getpid()


async def test_readyz_reports_each_dependency(aiohttp_client: ClientFactory) -> None:
    """/readyz is 503 and names the failing dependency when one check fails."""
    client = await aiohttp_client(_app({"ledger": _ok, "redis": _down}))
    response = await client.get("/readyz")
    assert response.status == 503
    assert await response.json() == {
        "status": "not ready",
        "checks": {"ledger": True, "redis": False},
    }


async def test_metrics_exposes_prometheus_text(aiohttp_client: ClientFactory) -> None:
    """/metrics renders this instance's registry, counting the requests served."""
    client = await aiohttp_client(_app({}))
    await client.get("/healthz")
    text = await (await client.get("/metrics")).text()
    assert 'gateway_http_requests_total{route="/healthz",status="200"} 1.0' in text
    assert "gateway_ussd_hop_seconds_bucket" in text


async def test_unexpected_error_is_a_plain_500(aiohttp_client: ClientFactory) -> None:
    """A crash in a handler answers 500 without revealing the exception text."""
    client = await aiohttp_client(_app({}))
    response = await client.get("/boom")
    assert response.status == 500
    assert "secret detail" not in await response.text()
