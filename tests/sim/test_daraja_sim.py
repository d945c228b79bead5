import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.sim.courier import Courier
from gateway.sim.daraja import CustomerAction, DarajaSimulator

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


@dataclass
class Inbox:
    """Our side of the wire: records what the simulator posts, answers per path."""

    url: str = ""
    bodies: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    answers: dict[str, Callable[[], Awaitable[web.Response]]] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.Response:
        """Record the JSON body; answer with the path's handler or a plain 200."""
        self.bodies.setdefault(request.path, []).append(json.loads(await request.read()))
        self.arrived.set()
        answer = self.answers.get(request.path)
        return await answer() if answer else web.json_response({"ResultCode": 0})


@dataclass
class Env:
    """A Daraja simulator on loopback, an HTTP client and the inbox for its callbacks."""

    sim: DarajaSimulator
    http: aiohttp.ClientSession
    base: str
    inbox: Inbox
    now: list[float]

    async def token(self) -> str:
        """A fresh access token."""
        auth = base64.b64encode(f"{self.sim.consumer_key}:{self.sim.consumer_secret}".encode())
        async with self.http.get(
            f"{self.base}/oauth/v1/generate?grant_type=client_credentials",
            headers={"Authorization": f"Basic {auth.decode()}"},
        ) as response:
            return str((await response.json())["access_token"])

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST JSON with a bearer token; the status and the JSON answer."""
        headers = {"Authorization": f"Bearer {await self.token()}"}
        async with self.http.post(f"{self.base}{path}", json=body, headers=headers) as response:
            return response.status, await response.json()

    def push(self, **changes: Any) -> dict[str, Any]:
        """A valid STK push body, with ``changes``."""
        timestamp = "20240101120000"
        password = base64.b64encode(f"600638{self.sim.passkey}{timestamp}".encode()).decode()
        body = {
            "BusinessShortCode": "600638",
            "Password": password,
            "Timestamp": timestamp,
            "TransactionType": "CustomerPayBillOnline",
            "Amount": 10,
            "PartyA": "254708374149",
            "PartyB": "600638",
            "PhoneNumber": "254708374149",
            "CallBackURL": f"{self.inbox.url}/stk",
            "AccountReference": "37012345678",
            "TransactionDesc": "Electricity",
        }
        body.update(changes)
        return body


@pytest.fixture
async def env(aiohttp_server: ServerFactory) -> AsyncIterator[Env]:
    """The simulator with a movable clock, and an inbox for its callbacks."""
    now = [0.0]
    sim = DarajaSimulator(shortcode="600638", seed=1, prompt_timeout_s=None, clock=lambda: now[0])
    server = await aiohttp_server(sim.app)
    inbox = Inbox()
    inbox_app = web.Application()
    inbox_app.router.add_post("/{tail:.*}", inbox.handle)
    inbox.url = str((await aiohttp_server(inbox_app)).make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as http:
        yield Env(sim, http, str(server.make_url("")).rstrip("/"), inbox, now)


async def test_oauth_answers_expires_in_as_a_string(env: Env) -> None:
    """The token answer carries expires_in as the string "3599", as Daraja sends it."""
    auth = base64.b64encode(b"sim-consumer-key:sim-consumer-secret").decode()
    async with env.http.get(
        f"{env.base}/oauth/v1/generate?grant_type=client_credentials",
        headers={"Authorization": f"Basic {auth}"},
    ) as response:
        body = await response.json()
    assert body["expires_in"] == "3599"
    assert isinstance(body["access_token"], str)


@pytest.mark.parametrize(
    ("query", "auth", "code"),
    [
        ("grant_type=password", "sim-consumer-key:sim-consumer-secret", "400.008.02"),
        ("grant_type=client_credentials", "sim-consumer-key:wrong", "400.008.01"),
    ],
)
async def test_oauth_refusals_use_darajas_codes(env: Env, query: str, auth: str, code: str) -> None:
    """A wrong grant type or wrong credentials get Daraja's error codes."""
    header = "Basic " + base64.b64encode(auth.encode()).decode()
    async with env.http.get(
        f"{env.base}/oauth/v1/generate?{query}", headers={"Authorization": header}
    ) as response:
        assert response.status == 400
        assert (await response.json())["errorCode"] == code


async def test_tokens_expire_on_the_simulators_clock(env: Env) -> None:
    """A token used after its lifetime gets 404.001.03 Invalid Access Token."""
    token = await env.token()
    env.now[0] += 3600
    async with env.http.post(
        f"{env.base}/mpesa/stkpush/v1/processrequest",
        json=env.push(),
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        assert response.status == 404
        assert (await response.json())["errorCode"] == "404.001.03"


async def test_push_acknowledgement_has_darajas_shape(env: Env) -> None:
    """An accepted push answers MerchantRequestID, a ws_CO_ CheckoutRequestID and "0"."""
    status, body = await env.post("/mpesa/stkpush/v1/processrequest", env.push())
    assert status == 200
    assert body["ResponseCode"] == "0"
    assert body["CheckoutRequestID"].startswith("ws_CO_")
    assert set(body) == {
        "MerchantRequestID",
        "CheckoutRequestID",
        "ResponseCode",
        "ResponseDescription",
        "CustomerMessage",
    }


@pytest.mark.parametrize(
    ("changes", "status", "code"),
    [
        ({"Password": "d3Jvbmc="}, 500, "500.001.1001"),
        ({"BusinessShortCode": "174379"}, 500, "500.001.1001"),
        ({"Amount": 10.5}, 400, "400.002.02"),
        ({"Amount": 250_001}, 400, "400.002.02"),
        ({"PhoneNumber": "0708374149"}, 400, "400.002.02"),
        ({"Timestamp": "2024-01-01"}, 500, "500.001.1001"),
        ({"CallBackURL": "not a url"}, 400, "400.002.02"),
    ],
)
async def test_push_refusals(env: Env, changes: dict[str, Any], status: int, code: str) -> None:
    """Wrong password, shortcode, amount, number, timestamp or URL are refused as Daraja does."""
    answer_status, body = await env.post("/mpesa/stkpush/v1/processrequest", env.push(**changes))
    assert (answer_status, body["errorCode"]) == (status, code)
    assert env.sim.ledger() == []


async def test_push_needs_the_json_content_type(env: Env) -> None:
    """A push sent as a form is refused with Daraja's famously misleading message."""
    headers = {"Authorization": f"Bearer {await env.token()}"}
    async with env.http.post(
        f"{env.base}/mpesa/stkpush/v1/processrequest", data={"a": "b"}, headers=headers
    ) as response:
        assert response.status == 400
        assert "Invalid BusinessShortCode" in (await response.json())["errorMessage"]


async def test_long_account_reference_fails_with_1025(env: Env) -> None:
    """An AccountReference over 12 characters is accepted, then fails with ResultCode 1025."""
    status, _ = await env.post(
        "/mpesa/stkpush/v1/processrequest", env.push(AccountReference="0123456789012")
    )
    await env.sim.settle()
    assert status == 200
    [callback] = env.inbox.bodies["/stk"]
    assert callback["Body"]["stkCallback"]["ResultCode"] == 1025
    assert env.sim.ledger() == []


async def test_success_callback_types_are_darajas(env: Env) -> None:
    """The success callback has int ResultCode, number Amount, TransactionDate and PhoneNumber."""
    await env.post("/mpesa/stkpush/v1/processrequest", env.push())
    await env.sim.settle()
    [callback] = env.inbox.bodies["/stk"]
    stk = callback["Body"]["stkCallback"]
    items = {item["Name"]: item.get("Value") for item in stk["CallbackMetadata"]["Item"]}
    assert stk["ResultCode"] == 0
    assert isinstance(items["Amount"], float)
    assert items["Amount"] == 10
    assert isinstance(items["TransactionDate"], int)
    assert items["PhoneNumber"] == 254708374149
    assert len(items["MpesaReceiptNumber"]) == 10


async def test_query_is_being_processed_then_final_as_a_string(env: Env) -> None:
    """While the prompt is open the query is an error; after, ResultCode is a string."""
    env.sim.faults.hold_prompts = True
    _, ack = await env.post("/mpesa/stkpush/v1/processrequest", env.push())
    query = env.push()
    query = {k: query[k] for k in ("BusinessShortCode", "Password", "Timestamp")}
    query["CheckoutRequestID"] = ack["CheckoutRequestID"]
    status, pending = await env.post("/mpesa/stkpushquery/v1/query", query)
    assert (status, pending["errorCode"]) == (500, "500.001.1001")
    assert "being processed" in pending["errorMessage"]
    await env.sim.answer_prompts()
    status, final = await env.post("/mpesa/stkpushquery/v1/query", query)
    assert (status, final["ResultCode"]) == (200, "0")


async def test_one_open_prompt_per_subscriber(env: Env) -> None:
    """A second push to a phone with an open prompt cannot lock the subscriber."""
    env.sim.set_customer("254708374149", CustomerAction.IGNORE)
    await env.post("/mpesa/stkpush/v1/processrequest", env.push())
    status, body = await env.post("/mpesa/stkpush/v1/processrequest", env.push())
    assert status == 500
    assert "Unable to lock subscriber" in body["errorMessage"]


async def test_ignored_prompt_times_out_on_a_real_timer(aiohttp_server: ServerFactory) -> None:
    """With a prompt timeout set, an ignored prompt ends in 1037 without anyone calling expire."""
    sim = DarajaSimulator(shortcode="600638", seed=2, prompt_timeout_s=0.05)
    sim.set_customer("254708374149", CustomerAction.IGNORE)
    server = await aiohttp_server(sim.app)
    inbox = Inbox()
    inbox_app = web.Application()
    inbox_app.router.add_post("/{tail:.*}", inbox.handle)
    inbox.url = str((await aiohttp_server(inbox_app)).make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as http:
        env = Env(sim, http, str(server.make_url("")).rstrip("/"), inbox, [0.0])
        await env.post("/mpesa/stkpush/v1/processrequest", env.push())
        async with asyncio.timeout(5):
            await inbox.arrived.wait()
        await sim.settle()
    [callback] = inbox.bodies["/stk"]
    assert callback["Body"]["stkCallback"]["ResultCode"] == 1037


async def test_register_url_answers_with_safaricoms_spelling(env: Env) -> None:
    """Registerurl answers OriginatorCoversationID (sic) and refuses a lower-case ResponseType."""
    body = {
        "ShortCode": "600638",
        "ResponseType": "Completed",
        "ConfirmationURL": f"{env.inbox.url}/confirmation",
        "ValidationURL": f"{env.inbox.url}/validation",
    }
    status, answer = await env.post("/mpesa/c2b/v2/registerurl", body)
    assert status == 200
    assert "OriginatorCoversationID" in answer
    status, _ = await env.post("/mpesa/c2b/v1/registerurl", {**body, "ResponseType": "completed"})
    assert status == 400


async def test_c2b_payload_masks_the_msisdn(env: Env) -> None:
    """C2B payloads show the payer masked (25470****149) and the amount as a string."""
    env.sim.register_urls(
        validation_url=f"{env.inbox.url}/validation",
        confirmation_url=f"{env.inbox.url}/confirmation",
    )
    await env.sim.pay_bill("254708374149", "37012345678", 150)
    await env.sim.settle()
    [validation] = env.inbox.bodies["/validation"]
    [confirmation] = env.inbox.bodies["/confirmation"]
    assert validation["MSISDN"] == "25470****149"
    assert validation["TransAmount"] == "150"
    assert validation["OrgAccountBalance"] == ""
    assert confirmation["OrgAccountBalance"] != ""
    assert confirmation["TransID"] == validation["TransID"]


async def test_c2b_msisdn_can_be_hashed(env: Env) -> None:
    """Set to hash, the C2B MSISDN is the SHA-256 hex of the number."""
    env.sim.c2b_msisdn = "hashed"
    env.sim.register_urls(validation_url="", confirmation_url=f"{env.inbox.url}/confirmation")
    await env.sim.pay_bill("254708374149", "37012345678", 150)
    await env.sim.settle()
    [confirmation] = env.inbox.bodies["/confirmation"]
    assert confirmation["MSISDN"] == hashlib.sha256(b"254708374149").hexdigest()


async def test_slow_validation_falls_back_to_the_registered_default(env: Env) -> None:
    """Validation slower than its timeout: M-Pesa applies ResponseType (Completed: money taken)."""
    env.sim.validation_timeout_s = 0.05
    release = asyncio.Event()

    async def slow() -> web.Response:
        await release.wait()
        return web.json_response({"ResultCode": "C2B00012", "ResultDesc": "Rejected"})

    env.inbox.answers["/validation"] = slow
    env.sim.register_urls(
        validation_url=f"{env.inbox.url}/validation",
        confirmation_url=f"{env.inbox.url}/confirmation",
    )
    outcome = await env.sim.pay_bill("254708374149", "37012345678", 150)
    release.set()
    await env.sim.settle()
    assert outcome.accepted
    assert [c.amount_minor for c in env.sim.ledger()] == [15000]


async def test_ledger_and_callbacks_endpoints(env: Env) -> None:
    """/_sim/ledger lists money taken; /_sim/callbacks lists deliveries and our answers."""
    await env.post("/mpesa/stkpush/v1/processrequest", env.push())
    await env.sim.settle()
    async with env.http.get(f"{env.base}/_sim/ledger") as response:
        [charge] = await response.json()
    async with env.http.get(f"{env.base}/_sim/callbacks") as response:
        [delivery] = await response.json()
    assert (charge["amount_minor"], charge["currency"], charge["msisdn"]) == (
        1000,
        "KES",
        "254708374149",
    )
    assert delivery["status"] == 200
    assert delivery["url"] == f"{env.inbox.url}/stk"


async def test_demo_controls_hold_release_and_reorder_over_http(env: Env) -> None:
    """Knobs set through /_sim/faults hold callbacks; /_sim/callbacks/release delivers them."""
    async with env.http.post(
        f"{env.base}/_sim/faults", json={"callbacks": {"hold": True}}
    ) as response:
        assert (await response.json())["callbacks"]["hold"] is True
    await env.post("/mpesa/stkpush/v1/processrequest", env.push())
    await env.post(
        "/mpesa/stkpush/v1/processrequest",
        env.push(PartyA="254711000001", PhoneNumber="254711000001"),
    )
    await env.sim.settle()
    assert "/stk" not in env.inbox.bodies
    async with env.http.post(
        f"{env.base}/_sim/callbacks/release", json={"reverse": True}
    ) as response:
        assert await response.json() == {"released": 2}
    phones = [
        next(
            i["Value"]
            for i in b["Body"]["stkCallback"]["CallbackMetadata"]["Item"]
            if i["Name"] == "PhoneNumber"
        )
        for b in env.inbox.bodies["/stk"]
    ]
    assert phones == [254711000001, 254708374149]


async def test_demo_controls_refuse_unknown_knobs(env: Env) -> None:
    """An unknown knob is a 400 that names it."""
    async with env.http.post(f"{env.base}/_sim/faults", json={"lose_everything": True}) as r:
        assert r.status == 400
        assert "lose_everything" in await r.text()


async def test_demo_controls_customer_and_sim_menu(env: Env) -> None:
    """/_sim/customers sets behaviour; /_sim/c2b/pay pays from the SIM menu, telling the outcome."""
    async with env.http.post(
        f"{env.base}/_sim/customers", json={"msisdn": "254708374149", "action": "cancel"}
    ) as response:
        assert response.status == 200
    await env.post("/mpesa/stkpush/v1/processrequest", env.push())
    await env.sim.settle()
    assert env.inbox.bodies["/stk"][0]["Body"]["stkCallback"]["ResultCode"] == 1032
    env.sim.register_urls(validation_url="", confirmation_url=f"{env.inbox.url}/confirmation")
    async with env.http.post(
        f"{env.base}/_sim/c2b/pay",
        json={"msisdn": "254708374149", "bill_ref": "37012345678", "amount": 20},
    ) as response:
        outcome = await response.json()
    assert outcome["accepted"] is True
    assert [c.receipt for c in env.sim.ledger()] == [outcome["trans_id"]]


async def test_confirmation_is_retried_until_answered_200(env: Env) -> None:
    """A C2B confirmation our side answers 500 is sent again, up to two more times."""
    answers = iter([500, 200])

    async def flaky() -> web.Response:
        return web.json_response({}, status=next(answers))

    env.inbox.answers["/confirmation"] = flaky
    env.sim.register_urls(validation_url="", confirmation_url=f"{env.inbox.url}/confirmation")
    await env.sim.pay_bill("254708374149", "37012345678", 150)
    await env.sim.settle()
    assert [d.status for d in env.sim.courier.deliveries] == [500, 200]
    assert len(env.sim.ledger()) == 1


async def test_paybill_push_to_another_party_b_fails_with_2028(env: Env) -> None:
    """A paybill push whose PartyB is not the shortcode fails with 2028 and takes no money."""
    status, _ = await env.post("/mpesa/stkpush/v1/processrequest", env.push(PartyB="123456"))
    await env.sim.settle()
    assert status == 200
    assert env.inbox.bodies["/stk"][0]["Body"]["stkCallback"]["ResultCode"] == 2028
    assert env.sim.ledger() == []


async def test_slow_customer_who_ignores_the_prompt_still_times_out(
    aiohttp_server: ServerFactory,
) -> None:
    """With an answer delay, an ignored prompt still ends in 1037 once the prompt expires."""
    sim = DarajaSimulator(shortcode="600638", seed=3, answer_delay_s=0.01, prompt_timeout_s=0.02)
    sim.set_customer("254708374149", CustomerAction.IGNORE)
    server = await aiohttp_server(sim.app)
    inbox = Inbox()
    inbox_app = web.Application()
    inbox_app.router.add_post("/{tail:.*}", inbox.handle)
    inbox.url = str((await aiohttp_server(inbox_app)).make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as http:
        env = Env(sim, http, str(server.make_url("")).rstrip("/"), inbox, [0.0])
        await env.post("/mpesa/stkpush/v1/processrequest", env.push())
        async with asyncio.timeout(5):
            await inbox.arrived.wait()
        await sim.settle()
    [callback] = inbox.bodies["/stk"]
    assert callback["Body"]["stkCallback"]["ResultCode"] == 1037


async def test_control_routes_follow_a_swapped_courier(env: Env) -> None:
    """A courier installed after start-up is the one the /_sim/callbacks routes use."""
    await env.sim.courier.close()  # the one opened at start-up
    env.sim.courier = Courier(env.sim.faults.callbacks, env.sim.tasks, provider="swapped")
    env.sim.faults.callbacks.hold = True
    await env.post("/mpesa/stkpush/v1/processrequest", env.push())
    await env.sim.settle()
    async with env.http.post(f"{env.base}/_sim/callbacks/release") as response:
        assert await response.json() == {"released": 1}
    async with env.http.get(f"{env.base}/_sim/callbacks") as response:
        assert len(await response.json()) == 1
    assert len(env.inbox.bodies["/stk"]) == 1


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        ({"ShortCode": "999999"}, "Invalid ShortCode"),
        ({"RequestType": "Incremental"}, "Invalid RequestType"),
        ({"NominatedNumber": "0722000000"}, "Invalid NominatedNumber"),
        ({"CallBackURL": ""}, "Invalid CallBackURL"),
    ],
)
async def test_pull_registration_checks_its_fields(
    env: Env, change: dict[str, str], refused: str
) -> None:
    """``/pulltransactions/v1/register`` refuses a malformed registration, registering nothing."""
    body = {
        "ShortCode": env.sim.shortcode,
        "RequestType": "Pull",
        "NominatedNumber": "254722000000",
        "CallBackURL": "https://gateway.example/pull",
    }
    status, answer = await env.post("/pulltransactions/v1/register", body | change)
    assert status == 400
    assert refused in answer["errorMessage"]
    assert env.sim.pull_registrations == {}
    status, answer = await env.post("/pulltransactions/v1/register", body)
    assert (status, answer["ResponseStatus"]) == (200, "1000")
