import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.sim.momo import MomoSimulator

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


@dataclass
class Env:
    """A MoMo simulator on loopback and an HTTP client speaking to it."""

    sim: MomoSimulator
    http: aiohttp.ClientSession
    base: str
    callbacks: list[tuple[str, dict[str, Any]]]
    callback_url: str

    async def headers(self, **extra: str) -> dict[str, str]:
        """Bearer, environment and subscription headers, plus ``extra``."""
        basic = base64.b64encode(f"{self.sim.api_user}:{self.sim.api_key}".encode()).decode()
        key = {"Ocp-Apim-Subscription-Key": self.sim.subscription_key}
        async with self.http.post(
            f"{self.base}/collection/token/", headers={"Authorization": f"Basic {basic}", **key}
        ) as response:
            token = (await response.json())["access_token"]
        return {
            "Authorization": f"Bearer {token}",
            "X-Target-Environment": "sandbox",
            **key,
            **extra,
        }

    async def request_to_pay(
        self, reference: str, *, callback: str | None = None, **changes: Any
    ) -> aiohttp.ClientResponse:
        """POST a request-to-pay (documented body, with ``changes``)."""
        body: dict[str, Any] = {
            "amount": "5.0",
            "currency": "EUR",
            "externalId": "p-1",
            "payer": {"partyIdType": "MSISDN", "partyId": "256772123456"},
            "payerMessage": "Electricity",
            "payeeNote": "37012345678",
        }
        body.update(changes)
        extra = {"X-Reference-Id": reference}
        if callback is not None:
            extra["X-Callback-Url"] = callback
        return await self.http.post(
            f"{self.base}/collection/v1_0/requesttopay",
            json=body,
            headers=await self.headers(**extra),
        )


@pytest.fixture
async def env(aiohttp_server: ServerFactory) -> AsyncIterator[Env]:
    """The simulator and a receiver for its callbacks."""
    sim = MomoSimulator(seed=1)
    server = await aiohttp_server(sim.app)
    callbacks: list[tuple[str, dict[str, Any]]] = []

    async def receive(request: web.Request) -> web.Response:
        callbacks.append((request.method, json.loads(await request.read())))
        return web.Response()

    inbox = web.Application()
    inbox.router.add_route("*", "/cb", receive)
    callback_url = str((await aiohttp_server(inbox)).make_url("/cb"))
    async with aiohttp.ClientSession() as http:
        yield Env(sim, http, str(server.make_url("")).rstrip("/"), callbacks, callback_url)


async def test_request_to_pay_is_202_with_an_empty_body(env: Env) -> None:
    """An accepted request-to-pay answers 202 and nothing else."""
    async with await env.request_to_pay(str(uuid.uuid4())) as response:
        assert response.status == 202
        assert await response.read() == b""


async def test_reused_reference_is_409(env: Env) -> None:
    """The same X-Reference-Id twice is 409 RESOURCE_ALREADY_EXIST; one request exists."""
    reference = str(uuid.uuid4())
    async with await env.request_to_pay(reference):
        pass
    async with await env.request_to_pay(reference) as response:
        assert response.status == 409
        assert (await response.json())["code"] == "RESOURCE_ALREADY_EXIST"
    assert len(env.sim.requests) == 1


async def test_one_reference_racing_itself_is_taken_once(env: Env) -> None:
    """Two requests with one X-Reference-Id at once: one 202, one 409, one charge.

    The first one's body arrives slowly (a retry sent while the first is still in flight): the
    simulator must not take the reference twice while it waits for a body.
    """
    reference = str(uuid.uuid4())
    body = {
        "amount": "5.0",
        "currency": "EUR",
        "externalId": "p-1",
        "payer": {"partyIdType": "MSISDN", "partyId": "256772123456"},
        "payerMessage": "Electricity",
        "payeeNote": "37012345678",
    }
    raw = json.dumps(body).encode()
    headers = await env.headers(**{"X-Reference-Id": reference, "Content-Type": "application/json"})
    second_sent = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield raw[:10]
        await second_sent.wait()
        await asyncio.sleep(0.05)
        yield raw[10:]

    url = f"{env.base}/collection/v1_0/requesttopay"

    async def first() -> int:
        async with env.http.post(url, data=slow_body(), headers=headers) as response:
            return response.status

    async def second() -> int:
        await asyncio.sleep(0.05)  # the first is waiting for the rest of its body now
        try:
            async with env.http.post(url, data=raw, headers=headers) as response:
                return response.status
        finally:
            second_sent.set()

    statuses = sorted(await asyncio.gather(first(), second()))
    assert statuses == [202, 409]
    assert list(env.sim.requests) == [reference]
    await env.sim.settle()
    assert len(env.sim.money.charges) == 1


@pytest.mark.parametrize(
    ("reference", "changes"),
    [
        ("not-a-uuid", {}),
        (None, {"currency": "UGX"}),
        (None, {"payerMessage": "x" * 161}),
        (None, {"payeeNote": "O'Neil"}),
        (None, {"payer": {"partyIdType": "MSISDN", "partyId": "+256772123456"}}),
    ],
)
async def test_bad_requests_are_400(
    env: Env, reference: str | None, changes: dict[str, Any]
) -> None:
    """A bad UUID, a foreign currency, long notes, apostrophes or a "+" number are 400."""
    async with await env.request_to_pay(reference or str(uuid.uuid4()), **changes) as response:
        assert response.status == 400
    assert env.sim.requests == {}


async def test_callback_host_must_match_the_provider_callback_host(env: Env) -> None:
    """An X-Callback-Url on another host is refused with 400."""
    async with await env.request_to_pay(
        str(uuid.uuid4()), callback="http://attacker.example/cb"
    ) as response:
        assert response.status == 400
        assert (await response.json())["code"] == "INVALID_CALLBACK_URL_HOST"


async def test_wrong_subscription_key_is_401(env: Env) -> None:
    """Without the subscription key the API answers 401 with MoMo's message."""
    headers = await env.headers(**{"Ocp-Apim-Subscription-Key": "nope"})
    async with env.http.get(
        f"{env.base}/collection/v1_0/requesttopay/{uuid.uuid4()}", headers=headers
    ) as response:
        assert response.status == 401
        assert "subscription key" in (await response.json())["message"]


async def test_status_and_callback_share_one_shape(env: Env) -> None:
    """The PUT callback carries the same body the status GET answers."""
    reference = str(uuid.uuid4())
    async with await env.request_to_pay(reference, callback=env.callback_url):
        pass
    await env.sim.settle()
    async with env.http.get(
        f"{env.base}/collection/v1_0/requesttopay/{reference}", headers=await env.headers()
    ) as response:
        status = await response.json()
    [(method, callback)] = env.callbacks
    assert method == "PUT"
    assert callback == status
    assert status["status"] == "SUCCESSFUL"
    assert status["amount"] == "5.0"
    assert status["financialTransactionId"]


async def test_pending_status_has_no_transaction_id_yet(env: Env) -> None:
    """A request the payer has not answered is PENDING with no financialTransactionId."""
    env.sim.faults.hold_payers = True
    reference = str(uuid.uuid4())
    async with await env.request_to_pay(reference):
        pass
    async with env.http.get(
        f"{env.base}/collection/v1_0/requesttopay/{reference}", headers=await env.headers()
    ) as response:
        body = await response.json()
    assert body["status"] == "PENDING"
    assert "financialTransactionId" not in body


async def test_unknown_reference_is_404(env: Env) -> None:
    """A status GET for an id never sent is 404 RESOURCE_NOT_FOUND."""
    async with env.http.get(
        f"{env.base}/collection/v1_0/requesttopay/{uuid.uuid4()}", headers=await env.headers()
    ) as response:
        assert response.status == 404
        assert (await response.json())["code"] == "RESOURCE_NOT_FOUND"


async def test_failed_request_has_a_reason_and_takes_no_money(env: Env) -> None:
    """The sandbox's FAILED number ends FAILED with a reason; the ledger stays empty."""
    reference = str(uuid.uuid4())
    payer = {"partyIdType": "MSISDN", "partyId": "46733123450"}
    async with await env.request_to_pay(reference, payer=payer):
        pass
    await env.sim.settle()
    async with env.http.get(
        f"{env.base}/collection/v1_0/requesttopay/{reference}", headers=await env.headers()
    ) as response:
        body = await response.json()
    assert (body["status"], body["reason"]) == ("FAILED", "INTERNAL_PROCESSING_ERROR")
    async with env.http.get(f"{env.base}/_sim/ledger") as response:
        assert await response.json() == []


async def test_unanswered_request_fails_when_approval_times_out(
    aiohttp_server: ServerFactory,
) -> None:
    """The TIMEOUT number's request fails COULD_NOT_PERFORM_TRANSACTION on a real timer."""
    sim = MomoSimulator(seed=2, approval_timeout_s=0.05)
    server = await aiohttp_server(sim.app)
    arrived = asyncio.Event()
    callbacks: list[tuple[str, dict[str, Any]]] = []

    async def receive(request: web.Request) -> web.Response:
        callbacks.append((request.method, json.loads(await request.read())))
        arrived.set()
        return web.Response()

    inbox = web.Application()
    inbox.router.add_route("*", "/cb", receive)
    callback_url = str((await aiohttp_server(inbox)).make_url("/cb"))
    async with aiohttp.ClientSession() as http:
        env = Env(sim, http, str(server.make_url("")).rstrip("/"), callbacks, callback_url)
        payer = {"partyIdType": "MSISDN", "partyId": "46733123452"}
        async with await env.request_to_pay(str(uuid.uuid4()), callback=callback_url, payer=payer):
            pass
        async with asyncio.timeout(5):
            await arrived.wait()
    [(_, body)] = callbacks
    assert (body["status"], body["reason"]) == ("FAILED", "COULD_NOT_PERFORM_TRANSACTION")
