from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app import RUNTIME, build_app
from gateway.config import Config
from gateway.ledger import MeterNumber

ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]

HOP = {
    "sessionId": "ATUid_app_test",
    "serviceCode": "*384*123#",
    "phoneNumber": "+254712000999",
    "networkCode": "63902",
    "text": "",
}


async def test_built_app_is_ready_and_counts_ussd_hops(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """The composed app answers /readyz and records each USSD hop's latency in /metrics."""
    client = await aiohttp_client(
        await build_app(Config.load(env={}, overrides={"data_dir": tmp_path}))
    )
    ready = await client.get("/readyz")
    assert ready.status == 200
    for _ in range(3):
        reply = await client.post("/ussd/africastalking", data=HOP)
        assert (await reply.text()).startswith("CON ")
    metrics = await (await client.get("/metrics")).text()
    assert "gateway_ussd_hop_seconds_count 3.0" in metrics


async def test_demo_mode_seeds_meters_and_a_vending_key(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """With nothing configured the ledger holds the demo meters, the tariff and a sealed key."""
    app = await build_app(Config.load(env={}, overrides={"data_dir": tmp_path}))
    await aiohttp_client(app)
    ledger = app[RUNTIME].ledger
    assert await ledger.lookup_meter(MeterNumber("04000000010")) is not None
    assert len(await ledger.vending_keys()) == 1
    assert (tmp_path / "master.key").stat().st_mode & 0o777 == 0o600


async def test_wrong_callback_secret_is_counted_as_a_security_event(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """A callback to a guessed secret path gets 404 and shows in the security-event counter."""
    client = await aiohttp_client(
        await build_app(Config.load(env={}, overrides={"data_dir": tmp_path}))
    )
    response = await client.post("/payments/daraja/guessed-secret/stk", data=b"{}")
    assert response.status == 404
    metrics = await (await client.get("/metrics")).text()
    assert 'gateway_security_events_total{kind="payment_callback_wrong_secret"} 1.0' in metrics
