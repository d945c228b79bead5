import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.sim.airtel import AirtelAction, AirtelSimulator

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


@dataclass
class Env:
    """An Airtel simulator on loopback, an HTTP client and the callbacks it sent."""

    sim: AirtelSimulator
    http: aiohttp.ClientSession
    base: str
    callbacks: list[dict[str, Any]]

    async def headers(self, **extra: str) -> dict[str, str]:
        """Bearer and wallet headers, plus ``extra``."""
        credentials = {
            "client_id": self.sim.client_id,
            "client_secret": self.sim.client_secret,
            "grant_type": "client_credentials",
        }
        async with self.http.post(f"{self.base}/auth/oauth2/token", json=credentials) as response:
            token = (await response.json())["access_token"]
        return {"Authorization": f"Bearer {token}", "X-Country": "UG", "X-Currency": "UGX", **extra}

    async def pay(self, transaction_id: str = "p-1", **subscriber: Any) -> dict[str, Any]:
        """POST a collection request (documented body); the JSON answer."""
        body = {
            "reference": "Electricity",
            "subscriber": {"country": "UG", "currency": "UGX", "msisdn": "752123456", **subscriber},
            "transaction": {
                "amount": 5000,
                "country": "UG",
                "currency": "UGX",
                "id": transaction_id,
            },
        }
        async with self.http.post(
            f"{self.base}/merchant/v1/payments/", json=body, headers=await self.headers()
        ) as response:
            return dict(await response.json())

    async def status(self, transaction_id: str = "p-1") -> dict[str, Any]:
        """GET the status of ``transaction_id``; the JSON answer."""
        async with self.http.get(
            f"{self.base}/standard/v1/payments/{transaction_id}", headers=await self.headers()
        ) as response:
            return dict(await response.json())


@pytest.fixture
async def env(aiohttp_server: ServerFactory) -> AsyncIterator[Env]:
    """The simulator with its callback URL pointing at a recorder."""
    callbacks: list[dict[str, Any]] = []

    async def receive(request: web.Request) -> web.Response:
        callbacks.append(json.loads(await request.read()))
        return web.json_response({})

    inbox = web.Application()
    inbox.router.add_post("/cb", receive)
    sim = AirtelSimulator(seed=1, callback_url=str((await aiohttp_server(inbox)).make_url("/cb")))
    server = await aiohttp_server(sim.app)
    async with aiohttp.ClientSession() as http:
        yield Env(sim, http, str(server.make_url("")).rstrip("/"), callbacks)


async def test_token_is_short_lived_and_bearer(env: Env) -> None:
    """The token answer says bearer and a short expires_in (180 s)."""
    body = {
        "client_id": env.sim.client_id,
        "client_secret": env.sim.client_secret,
        "grant_type": "client_credentials",
    }
    async with env.http.post(f"{env.base}/auth/oauth2/token", json=body) as response:
        answer = await response.json()
    assert (answer["token_type"], answer["expires_in"]) == ("bearer", "180")


async def test_push_is_in_progress_then_successful(env: Env) -> None:
    """The push answers DP00800001006 (in progress); the status then says TS."""
    env.sim.faults.hold_payers = True
    answer = await env.pay()
    assert answer["status"]["response_code"] == "DP00800001006"
    assert answer["status"]["success"] is True
    assert (await env.status())["data"]["transaction"]["status"] == "TIP"
    await env.sim.answer_payers()
    status = await env.status()
    assert status["data"]["transaction"]["status"] == "TS"
    assert status["status"]["response_code"] == "DP00800001001"


async def test_callback_has_the_documented_shape(env: Env) -> None:
    """The callback is {"transaction": {id, message, status_code, airtel_money_id}}."""
    await env.pay()
    await env.sim.settle()
    [callback] = env.callbacks
    assert set(callback["transaction"]) == {"id", "message", "status_code", "airtel_money_id"}
    assert callback["transaction"]["status_code"] == "TS"


async def test_duplicate_transaction_id_is_refused(env: Env) -> None:
    """A reused transaction.id is refused with ESB000041; one payment, one charge."""
    await env.pay()
    again = await env.pay()
    await env.sim.settle()
    assert again["status"]["result_code"] == "ESB000041"
    assert len(env.sim.ledger()) == 1


@pytest.mark.parametrize("msisdn", ["256752123456", "+256752123456", "75212345"])
async def test_msisdn_must_be_national(env: Env, msisdn: str) -> None:
    """A number with its country code, a "+" or the wrong length is ESB000036."""
    answer = await env.pay(msisdn=msisdn)
    assert answer["status"]["result_code"] == "ESB000036"
    assert env.sim.payments == {}


async def test_wrong_pin_fails_without_money(env: Env) -> None:
    """A payer entering a wrong PIN ends TF DP00800001002 and pays nothing."""
    env.sim.set_payer("752123456", AirtelAction.WRONG_PIN)
    await env.pay()
    await env.sim.settle()
    status = await env.status()
    assert (status["data"]["transaction"]["status"], status["status"]["response_code"]) == (
        "TF",
        "DP00800001002",
    )
    assert env.sim.ledger() == []


async def test_unknown_transaction_is_esb000045(env: Env) -> None:
    """The status of an id never sent is ESB000045."""
    assert (await env.status("nope"))["status"]["result_code"] == "ESB000045"
