import ipaddress
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, unused_port
from structlog.testing import capture_logs

from gateway.errors import GatewayError
from gateway.money import Money
from gateway.payments.airtel import AirtelProvider
from gateway.payments.base import (
    CollectionRequest,
    CustomerPaymentRefusal,
    PaymentNotice,
    PaymentProvider,
    PaymentState,
)
from gateway.payments.daraja import DarajaProvider
from gateway.payments.momo import MomoProvider, reference_for
from gateway.phone import Msisdn
from gateway.sim.daraja import DarajaSimulator
from gateway.web.callbacks import payment_routes
from gateway.web.middleware import context_middleware

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[[web.Application], Awaitable[Client]]
ServerFactory = Callable[..., Awaitable[TestServer]]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

SECRET = "s3cr3t-path-segment-0123456789"
KNOWN_METER = "37012345678"

# Documented shapes (docs/protocols.md §2.2, §2.4, §3.1, §3.2).
STK_SUCCESS = (
    b'{"Body":{"stkCallback":{"MerchantRequestID":"29115-34620561-1","CheckoutRequestID":'
    b'"ws_CO_191220191020363925","ResultCode":0,"ResultDesc":"The service request is processed '
    b'successfully.","CallbackMetadata":{"Item":[{"Name":"Amount","Value":1.00},{"Name":'
    b'"MpesaReceiptNumber","Value":"NLJ7RT61SV"},{"Name":"TransactionDate","Value":'
    b'20191219102115},{"Name":"PhoneNumber","Value":254708374149}]}}}}'
)


def _c2b(bill_ref: str = KNOWN_METER, amount: str = "100") -> bytes:
    return json.dumps(
        {
            "TransactionType": "Pay Bill",
            "TransID": "RKTQDM7W6S",
            "TransTime": "20191122063845",
            "TransAmount": amount,
            "BusinessShortCode": "600638",
            "BillRefNumber": bill_ref,
            "InvoiceNumber": "",
            "OrgAccountBalance": "",
            "ThirdPartyTransID": "",
            "MSISDN": "25470****149",
            "FirstName": "John",
            "MiddleName": "",
            "LastName": "",
        }
    ).encode()


MOMO_CALLBACK = json.dumps(
    {
        "financialTransactionId": "363440463",
        "externalId": "p-1",
        "amount": "5.00",
        "currency": "EUR",
        "payer": {"partyIdType": "MSISDN", "partyId": "256772123456"},
        "payerMessage": "Electricity",
        "payeeNote": "37012345678",
        "status": "SUCCESSFUL",
    }
).encode()
AIRTEL_CALLBACK = (
    b'{"transaction":{"id":"p-1","message":"Paid","status_code":"TS",'
    b'"airtel_money_id":"MP210603.1234.L06941"}}'
)


@dataclass
class FakeEvents:
    """The saga's side of the port: records notices, validates against a set of meters."""

    meters: frozenset[str] = frozenset({KNOWN_METER})
    notices: list[PaymentNotice] = field(default_factory=list)
    validations: list[tuple[str, str, Money, Msisdn | None]] = field(default_factory=list)
    failure: GatewayError | None = None

    async def on_payment_notice(
        self,
        notice: PaymentNotice,
        *,
        background: Callable[[Callable[[], Awaitable[None]]], None] | None = None,
    ) -> None:
        """Record the notice, or fail as a ledger that cannot write would."""
        del background  # nothing follows here
        if self.failure is not None:
            raise self.failure
        self.notices.append(notice)

    async def validate_customer_payment(
        self,
        provider: str,
        account_reference: str,
        amount: Money,
        payer: Msisdn | None,
        *,
        reference: str | None = None,
    ) -> str | None:
        """Accept known meters paying KES 10 to 10,000."""
        del reference  # nothing is recorded here
        if self.failure is not None:
            raise self.failure
        self.validations.append((provider, account_reference, amount, payer))
        if account_reference not in self.meters:
            return CustomerPaymentRefusal.UNKNOWN_ACCOUNT
        if not 1000 <= amount.amount_minor <= 1_000_000:
            return CustomerPaymentRefusal.AMOUNT_OUT_OF_RANGE
        return None


def _providers() -> dict[str, PaymentProvider]:
    offline = cast("aiohttp.ClientSession", None)  # the routes only parse
    return {
        "daraja": DarajaProvider(
            offline,
            base_url="http://127.0.0.1:9",
            consumer_key="k",
            consumer_secret="s",
            shortcode="600638",
            passkey="p",
            callback_url="http://127.0.0.1:9/stk",
        ),
        "momo": MomoProvider(
            offline, base_url="http://127.0.0.1:9", subscription_key="s", api_user="u", api_key="k"
        ),
        "airtel": AirtelProvider(
            offline, base_url="http://127.0.0.1:9", client_id="c", client_secret="s"
        ),
    }


def _app(events: FakeEvents, allow_from: Sequence[Network] | None = None) -> web.Application:
    app = web.Application(middlewares=[context_middleware])
    app.add_routes(payment_routes(_providers(), events, secret=SECRET, allow_from=allow_from))
    return app


@pytest.fixture
def events() -> FakeEvents:
    """A fresh fake saga."""
    return FakeEvents()


@pytest.fixture
async def client(aiohttp_client: ClientFactory, events: FakeEvents) -> Client:
    """The callback routes, served on loopback."""
    return await aiohttp_client(_app(events))


def _security(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [entry for entry in logs if entry.get("security_event")]


async def test_stk_callback_is_handed_over_and_acknowledged(
    client: Client, events: FakeEvents
) -> None:
    """Daraja's documented STK callback becomes one notice; Daraja gets its 200 JSON."""
    response = await client.post(f"/payments/daraja/{SECRET}/stk", data=STK_SUCCESS)
    assert response.status == 200
    assert await response.json() == {"ResultCode": 0, "ResultDesc": "Accepted"}
    [notice] = events.notices
    assert notice.reference == "ws_CO_191220191020363925"
    assert notice.raw == STK_SUCCESS


async def test_wrong_secret_is_404_and_a_security_event(client: Client, events: FakeEvents) -> None:
    """A callback under another secret is 404, logged as a security event, never handed over."""
    with capture_logs() as logs:
        response = await client.post("/payments/daraja/guessed-secret/stk", data=STK_SUCCESS)
    assert response.status == 404
    [event] = _security(logs)
    assert event["event"] == "payment_callback_wrong_secret"
    assert "guessed-secret" not in json.dumps(event, default=str)
    assert events.notices == []


async def test_forged_body_is_acknowledged_logged_and_dropped(
    client: Client, events: FakeEvents
) -> None:
    """A malformed callback gets the provider's ack, a security log with the raw body, no call."""
    forged = STK_SUCCESS.replace(b'"ResultCode":0', b'"ResultCode":"0"')
    with capture_logs() as logs:
        response = await client.post(f"/payments/daraja/{SECRET}/stk", data=forged)
    assert response.status == 200
    assert await response.json() == {"ResultCode": 0, "ResultDesc": "Accepted"}
    [event] = _security(logs)
    assert event["event"] == "payment_callback_forged"
    assert event["raw"] == forged.decode()
    assert events.notices == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("momo/{}/callback", b"not json"),
        ("airtel/{}/callback", b'{"transaction":{"id":"x","status_code":"PAID"}}'),
        ("daraja/{}/c2b/confirmation", b"[]"),
    ],
)
async def test_garbage_on_every_route_is_never_handed_over(
    client: Client, events: FakeEvents, path: str, body: bytes
) -> None:
    """Forged bodies on MoMo, Airtel and C2B routes are acknowledged and logged, nothing else."""
    with capture_logs() as logs:
        response = await client.post("/payments/" + path.format(SECRET), data=body)
    assert response.status == 200
    assert [e["event"] for e in _security(logs)] == ["payment_callback_forged"]
    assert events.notices == []


async def test_stk_body_on_the_confirmation_route_is_forged(
    client: Client, events: FakeEvents
) -> None:
    """An STK callback posted where C2B confirmations go is refused as forged."""
    with capture_logs() as logs:
        await client.post(f"/payments/daraja/{SECRET}/c2b/confirmation", data=STK_SUCCESS)
    assert [e["event"] for e in _security(logs)] == ["payment_callback_forged"]
    assert events.notices == []


async def test_source_outside_the_allowlist_is_403(
    aiohttp_client: ClientFactory, events: FakeEvents
) -> None:
    """With an allowlist that excludes loopback, a callback is 403 and logged."""
    client = await aiohttp_client(_app(events, [ipaddress.ip_network("196.201.214.0/24")]))
    with capture_logs() as logs:
        response = await client.post(f"/payments/daraja/{SECRET}/stk", data=STK_SUCCESS)
    assert response.status == 403
    assert [e["event"] for e in _security(logs)] == ["payment_callback_source_refused"]
    assert events.notices == []


async def test_source_inside_the_allowlist_is_served(
    aiohttp_client: ClientFactory, events: FakeEvents
) -> None:
    """With loopback allowed, the callback is handed over."""
    client = await aiohttp_client(_app(events, [ipaddress.ip_network("127.0.0.0/8")]))
    response = await client.post(f"/payments/daraja/{SECRET}/stk", data=STK_SUCCESS)
    assert response.status == 200
    assert len(events.notices) == 1


async def test_c2b_to_an_unknown_meter_is_rejected(client: Client, events: FakeEvents) -> None:
    """Validation for a meter the saga does not know answers Daraja's C2B00012 reject."""
    response = await client.post(
        f"/payments/daraja/{SECRET}/c2b/validation", data=_c2b(bill_ref="99999999999")
    )
    assert await response.json() == {"ResultCode": "C2B00012", "ResultDesc": "Rejected"}
    assert events.validations == [("daraja", "99999999999", Money(10000, "KES"), None)]
    assert events.notices == []


async def test_c2b_out_of_range_amount_is_rejected(client: Client) -> None:
    """Validation for an amount the saga refuses answers C2B00013."""
    response = await client.post(f"/payments/daraja/{SECRET}/c2b/validation", data=_c2b(amount="5"))
    assert (await response.json())["ResultCode"] == "C2B00013"


async def test_c2b_to_a_known_meter_is_accepted_then_confirmed(
    client: Client, events: FakeEvents
) -> None:
    """Validation accepts a known meter; the confirmation becomes a customer-initiated notice."""
    accepted = await client.post(f"/payments/daraja/{SECRET}/c2b/validation", data=_c2b())
    assert await accepted.json() == {"ResultCode": "0", "ResultDesc": "Accepted"}
    confirmed = await client.post(f"/payments/daraja/{SECRET}/c2b/confirmation", data=_c2b())
    assert await confirmed.json() == {"ResultCode": 0, "ResultDesc": "Success"}
    [notice] = events.notices
    assert notice.is_customer_initiated
    assert notice.account_reference == KNOWN_METER


async def test_validation_failure_rejects_safely(client: Client, events: FakeEvents) -> None:
    """When the saga cannot check the meter, validation rejects (no money has moved)."""
    events.failure = GatewayError("ledger locked", retryable=True)
    response = await client.post(f"/payments/daraja/{SECRET}/c2b/validation", data=_c2b())
    assert (await response.json())["ResultCode"] == "C2B00016"


@pytest.mark.parametrize("method", ["PUT", "POST"])
async def test_momo_callback_by_put_or_post(
    client: Client, events: FakeEvents, method: str
) -> None:
    """MoMo's callback is accepted by PUT and by POST and keyed by the derived reference."""
    response = await client.request(method, f"/payments/momo/{SECRET}/callback", data=MOMO_CALLBACK)
    assert response.status == 200
    [notice] = events.notices
    assert notice.reference == reference_for("p-1")


async def test_airtel_callback_is_handed_over(client: Client, events: FakeEvents) -> None:
    """Airtel's callback becomes a notice for our transaction id."""
    response = await client.post(f"/payments/airtel/{SECRET}/callback", data=AIRTEL_CALLBACK)
    assert response.status == 200
    assert [n.reference for n in events.notices] == ["p-1"]


async def test_unrecordable_notice_is_503_so_the_provider_retries(
    client: Client, events: FakeEvents
) -> None:
    """When the saga cannot record a notice, the route answers 503 instead of acknowledging."""
    events.failure = GatewayError("disk full", retryable=True)
    response = await client.post(f"/payments/daraja/{SECRET}/stk", data=STK_SUCCESS)
    assert response.status == 503


async def test_ten_duplicates_are_ten_identical_notices(client: Client, events: FakeEvents) -> None:
    """Ten copies of one callback reach the saga as ten notices with one reference and hash."""
    for _ in range(10):
        response = await client.post(f"/payments/daraja/{SECRET}/stk", data=STK_SUCCESS)
        assert response.status == 200
    assert len(events.notices) == 10
    assert len({(n.reference, n.payload_hash) for n in events.notices}) == 1


def test_empty_secret_is_refused() -> None:
    """Building the routes without a secret fails loudly."""
    with pytest.raises(ValueError, match="secret"):
        payment_routes(_providers(), FakeEvents(), secret="")


# -- end to end: the Daraja simulator calling our real routes -----------------------------------


@dataclass
class Wired:
    """The Daraja simulator and the adapter, with callbacks going to the real routes."""

    sim: DarajaSimulator
    provider: DarajaProvider
    events: FakeEvents
    base: str


@pytest.fixture
async def wired(aiohttp_server: ServerFactory) -> AsyncIterator[Wired]:
    """A simulator whose callbacks reach ``payment_routes`` over loopback."""
    sim = DarajaSimulator(seed=11, shortcode="600638", prompt_timeout_s=None)
    sim_server = await aiohttp_server(sim.app)
    port = unused_port()
    base = f"http://127.0.0.1:{port}/payments/daraja/{SECRET}"
    events = FakeEvents()
    async with aiohttp.ClientSession() as session:
        provider = DarajaProvider(
            session,
            base_url=str(sim_server.make_url("")).rstrip("/"),
            consumer_key=sim.consumer_key,
            consumer_secret=sim.consumer_secret,
            shortcode=sim.shortcode,
            passkey=sim.passkey,
            callback_url=f"{base}/stk",
            initiator=sim.initiator,
            security_credential=sim.security_credential,
            status_result_url=f"{base}/status/result",
            status_timeout_url=f"{base}/status/timeout",
            status_result_wait_s=5.0,
        )
        app = web.Application()
        app.add_routes(payment_routes({"daraja": provider}, events, secret=SECRET))
        await aiohttp_server(app, port=port)
        sim.register_urls(
            validation_url=f"{base}/c2b/validation", confirmation_url=f"{base}/c2b/confirmation"
        )
        yield Wired(sim, provider, events, base)


async def test_stk_push_end_to_end(wired: Wired) -> None:
    """A push approved on the simulator reaches the saga through the routes; the query agrees."""
    started = await wired.provider.request_collection(
        CollectionRequest(
            purchase_id="p-1",
            payer=Msisdn("+254708374149"),
            amount=Money(5000, "KES"),
            account_reference=KNOWN_METER,
            description="Electricity",
        )
    )
    await wired.sim.settle()
    [notice] = wired.events.notices
    assert notice.reference == started.reference
    status = await wired.provider.query_status(notice.reference)
    assert (status.state, status.amount) == (PaymentState.SUCCEEDED, notice.amount)


async def test_c2b_end_to_end_rejects_unknown_and_proves_known_meters(wired: Wired) -> None:
    """From the SIM menu: an unknown meter is refused before money moves; a known one is proven."""
    refused = await wired.sim.pay_bill("254708374149", "99999999999", 100)
    paid = await wired.sim.pay_bill("254708374149", KNOWN_METER, 100)
    await wired.sim.settle()
    assert (refused.accepted, refused.result_code) == (False, "C2B00012")
    assert [c.account for c in wired.sim.ledger()] == [KNOWN_METER]
    [notice] = wired.events.notices
    assert notice.reference == paid.trans_id
    status = await wired.provider.query_status(notice.reference)  # Transaction Status, async
    assert status.state is PaymentState.SUCCEEDED
    assert status.amount == Money(10000, "KES")
