import asyncio
import base64
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from phonenumbers import is_valid_number, parse

from gateway.money import Money
from gateway.payments.base import (
    CollectionRequest,
    CustomerPaymentRefusal,
    ForgedCallback,
    PaymentDeclined,
    PaymentState,
    ProviderReference,
    ProviderUnavailable,
)
from gateway.payments.daraja import (
    DarajaProvider,
    fit_account_reference,
    stk_password,
    stk_timestamp,
)
from gateway.phone import Msisdn
from gateway.sim.daraja import CustomerAction, DarajaSimulator
from tests.payments.payfakes import CallbackReceiver, FakeClock

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]

PAYER = Msisdn("+254708374149")
KES_50 = Money(5000, "KES")

# The STK callback samples from Daraja's MpesaExpressSimulate page (docs/protocols.md §2.2),
# verbatim.
DOC_SUCCESS = (
    b'{"Body":{"stkCallback":{"MerchantRequestID":"29115-34620561-1","CheckoutRequestID":'
    b'"ws_CO_191220191020363925","ResultCode":0,"ResultDesc":"The service request is processed '
    b'successfully.","CallbackMetadata":{"Item":[{"Name":"Amount","Value":1.00},{"Name":'
    b'"MpesaReceiptNumber","Value":"NLJ7RT61SV"},{"Name":"TransactionDate","Value":'
    b'20191219102115},{"Name":"PhoneNumber","Value":254708374149}]}}}}'
)
DOC_CANCELLED = (
    b'{"Body":{"stkCallback":{"MerchantRequestID":"29115-34620561-1","CheckoutRequestID":'
    b'"ws_CO_191220191020363925","ResultCode":1032,"ResultDesc":"Request cancelled by user"}}}'
)
# A C2B confirmation in the documented field set (docs/protocols.md §2.4): strings, masked MSISDN.
DOC_C2B = json.dumps(
    {
        "TransactionType": "Pay Bill",
        "TransID": "RKTQDM7W6S",
        "TransTime": "20191122063845",
        "TransAmount": "10",
        "BusinessShortCode": "600638",
        "BillRefNumber": "37012345678",
        "InvoiceNumber": "",
        "OrgAccountBalance": "49197.00",
        "ThirdPartyTransID": "",
        "MSISDN": "25470****149",
        "FirstName": "John",
        "MiddleName": "",
        "LastName": "Doe",
    }
).encode()


@dataclass
class Daraja:
    """A simulator, its server, the adapter pointed at it and the receiver of its callbacks."""

    sim: DarajaSimulator
    provider: DarajaProvider
    receiver: CallbackReceiver
    base_url: str

    def notices(self) -> list[bytes]:
        """The STK callbacks received so far."""
        return self.receiver.bodies("/stk")


def _request(
    purchase: str = "p-1", amount: Money = KES_50, payer: Msisdn = PAYER
) -> CollectionRequest:
    return CollectionRequest(
        purchase_id=purchase,
        payer=payer,
        amount=amount,
        account_reference="37012345678",
        description="Electricity",
    )


@pytest.fixture
async def daraja(
    aiohttp_server: ServerFactory,
    session: aiohttp.ClientSession,
    receiver: CallbackReceiver,
    clock: FakeClock,
) -> Daraja:
    """A Daraja simulator on loopback and the adapter pointed at it, callbacks to ``receiver``."""
    sim = DarajaSimulator(seed=7, prompt_timeout_s=None, shortcode="600638")
    server = await aiohttp_server(sim.app)
    base_url = str(server.make_url("")).rstrip("/")
    provider = DarajaProvider(
        session,
        base_url=base_url,
        consumer_key=sim.consumer_key,
        consumer_secret=sim.consumer_secret,
        shortcode=sim.shortcode,
        passkey=sim.passkey,
        callback_url=receiver.url("/stk"),
        initiator=sim.initiator,
        security_credential=sim.security_credential,
        status_result_url=receiver.url("/status/result"),
        status_timeout_url=receiver.url("/status/timeout"),
        status_result_wait_s=5.0,
        timeout_s=2.0,
        clock=clock,
    )

    async def deliver(body: bytes) -> tuple[int, bytes]:
        await provider.deliver_status_result(body)
        return 200, b'{"ResultCode":0}'

    receiver.hooks["/status/result"] = deliver
    return Daraja(sim, provider, receiver, base_url)


# -- pure helpers ------------------------------------------------------------------------------


def test_password_matches_the_documented_sample() -> None:
    """The STK Password for Daraja's sandbox sample equals the value its docs print."""
    passkey = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"
    assert stk_password("174379", passkey, "20160216165627") == (
        "MTc0Mzc5YmZiMjc5ZjlhYTliZGJjZjE1OGU5N2RkNzFhNDY3Y2QyZTBjODkzMDU5YjEwZjc4ZTZiNzJhZGExZWQy"
        "YzkxOTIwMTYwMjE2MTY1NjI3"
    )


def test_timestamp_is_kenyan_time() -> None:
    """Timestamp is YYYYMMDDHHmmss in EAT (UTC+3), whatever zone the clock reports."""
    assert stk_timestamp(datetime(2024, 1, 1, 21, 30, 5, tzinfo=UTC)) == "20240102003005"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("37012345678", "37012345678"), ("0123456789012", "123456789012"), ("A-1 2", "A12")],
)
def test_account_reference_fits_twelve_characters(text: str, expected: str) -> None:
    """AccountReference keeps alphanumerics and at most the last 12 of them."""
    assert fit_account_reference(text) == expected


# -- parsing documented payloads ----------------------------------------------------------------


def _offline_provider(shortcode: str = "600638") -> DarajaProvider:
    return DarajaProvider(
        cast("aiohttp.ClientSession", None),  # never used: parsing is pure
        base_url="http://127.0.0.1:9",
        consumer_key="k",
        consumer_secret="s",
        shortcode=shortcode,
        passkey="p",
        callback_url="http://127.0.0.1:9/stk",
    )


def test_documented_success_callback_parses() -> None:
    """Daraja's own success sample gives a SUCCEEDED claim with amount, receipt and payer."""
    notice = _offline_provider().parse_callback(DOC_SUCCESS, {})
    assert notice.reference == "ws_CO_191220191020363925"
    assert notice.claimed_state is PaymentState.SUCCEEDED
    assert notice.amount == Money(100, "KES")
    assert notice.receipt == "NLJ7RT61SV"
    assert notice.payer == "+254708374149"
    assert notice.raw == DOC_SUCCESS
    assert not notice.is_customer_initiated


def test_documented_cancel_callback_parses() -> None:
    """Daraja's ResultCode 1032 sample is a CANCELLED claim without amount."""
    notice = _offline_provider().parse_callback(DOC_CANCELLED, {})
    assert notice.claimed_state is PaymentState.CANCELLED
    assert notice.amount is None


def test_success_callback_with_balance_item_without_value_parses() -> None:
    """A ``{"Name":"Balance"}`` item without a Value, as live callbacks carry, is accepted."""
    body = DOC_SUCCESS.replace(b'"Item":[', b'"Item":[{"Name":"Balance"},')
    assert _offline_provider().parse_callback(body, {}).receipt == "NLJ7RT61SV"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b'"ResultCode":0', b'"ResultCode":"0"'),  # a string: that is the query's type
        (b'"Value":254708374149', b'"Value":"254708374149"'),  # PhoneNumber is a number
        (b'"Value":20191219102115', b'"Value":"20191219102115"'),  # so is TransactionDate
        (b'"Value":1.00', b'"Value":-1'),
        (b'"NLJ7RT61SV"', b'"x"'),
        (b'"CheckoutRequestID":"ws_CO_191220191020363925",', b""),
    ],
)
def test_callbacks_off_the_documented_shape_are_forged(old: bytes, new: bytes) -> None:
    """A success callback whose field types differ from Daraja's is refused as forged."""
    body = DOC_SUCCESS.replace(old, new)
    assert body != DOC_SUCCESS
    with pytest.raises(ForgedCallback):
        _offline_provider().parse_callback(body, {})


def test_documented_c2b_confirmation_parses_as_customer_initiated() -> None:
    """A C2B confirmation is a customer-initiated claim for the meter in BillRefNumber."""
    notice = _offline_provider().parse_callback(DOC_C2B, {})
    assert notice.is_customer_initiated
    assert notice.reference == "RKTQDM7W6S"
    assert notice.account_reference == "37012345678"
    assert notice.amount == Money(1000, "KES")
    assert notice.payer is None  # Daraja masks the MSISDN
    assert notice.claimed_state is PaymentState.SUCCEEDED


def test_c2b_paid_to_another_shortcode_is_forged() -> None:
    """A C2B confirmation for a shortcode that is not ours is refused."""
    with pytest.raises(ForgedCallback):
        _offline_provider(shortcode="174379").parse_callback(DOC_C2B, {})


@settings(max_examples=300)
@given(st.binary())
def test_arbitrary_bytes_raise_only_forged_callback(body: bytes) -> None:
    """Whatever the bytes, parse_callback returns a notice or raises ForgedCallback."""
    with contextlib.suppress(ForgedCallback):
        _offline_provider().parse_callback(body, {})


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)


@pytest.mark.slow
@settings(max_examples=300)
@given(_JSON, st.sampled_from(["Body", "TransID", "Result"]))
def test_arbitrary_json_raises_only_forged_callback(value: object, key: str) -> None:
    """JSON of any shape under a Daraja key is parsed or refused, never crashes the parser."""
    body = json.dumps({key: value, "Body": {"stkCallback": value}}).encode()
    with contextlib.suppress(ForgedCallback):
        _offline_provider().parse_callback(body, {})


# -- STK push against the simulator -------------------------------------------------------------


async def test_approved_push_is_claimed_and_confirmed(daraja: Daraja) -> None:
    """An approved STK push sends a success callback and STK Query confirms the amount."""
    started = await daraja.provider.request_collection(_request())
    await daraja.sim.settle()
    [body] = daraja.notices()
    notice = daraja.provider.parse_callback(body, {})
    assert notice.reference == started.reference
    assert notice.claimed_state is PaymentState.SUCCEEDED
    assert notice.amount == KES_50
    assert notice.payer == PAYER
    status = await daraja.provider.query_status(started.reference)
    assert status.state is PaymentState.SUCCEEDED
    assert status.amount == KES_50
    [charge] = daraja.sim.ledger()
    assert (charge.reference, charge.amount_minor, charge.receipt) == (
        started.reference,
        5000,
        notice.receipt,
    )


async def test_push_wire_format_is_darajas(daraja: Daraja) -> None:
    """The push carries Password, Timestamp, integer Amount and 2547… numbers as Daraja wants."""
    await daraja.provider.request_collection(_request())
    [sent] = daraja.sim.push_requests
    assert sent["Amount"] == 50
    assert sent["PartyA"] == sent["PhoneNumber"] == "254708374149"
    assert sent["PartyB"] == sent["BusinessShortCode"] == "600638"
    decoded = base64.b64decode(sent["Password"]).decode()
    assert decoded == f"600638{daraja.sim.passkey}{sent['Timestamp']}"
    assert len(sent["AccountReference"]) <= 12
    assert len(sent["TransactionDesc"]) <= 13


@pytest.mark.parametrize(
    ("action", "state"),
    [
        (CustomerAction.CANCEL, PaymentState.CANCELLED),
        (CustomerAction.WRONG_PIN, PaymentState.FAILED),
        (CustomerAction.INSUFFICIENT_FUNDS, PaymentState.FAILED),
        (CustomerAction.IGNORE, PaymentState.TIMED_OUT),
    ],
)
async def test_customer_refusals_reach_callback_and_query(
    daraja: Daraja, action: CustomerAction, state: PaymentState
) -> None:
    """Cancel, wrong PIN, no funds and an ignored prompt map to our states; no money moves."""
    daraja.sim.set_customer(PAYER, action)
    started = await daraja.provider.request_collection(_request())
    await daraja.sim.expire_prompts()
    [body] = daraja.notices()
    assert daraja.provider.parse_callback(body, {}).claimed_state is state
    status = await daraja.provider.query_status(started.reference)
    assert status.state is state
    assert status.reason
    assert daraja.sim.ledger() == []


async def test_open_prompt_is_pending(daraja: Daraja) -> None:
    """While the customer has not answered, STK Query says PENDING, then the final state."""
    daraja.sim.faults.hold_prompts = True
    started = await daraja.provider.request_collection(_request())
    assert (await daraja.provider.query_status(started.reference)).state is PaymentState.PENDING
    await daraja.sim.answer_prompts()
    assert (await daraja.provider.query_status(started.reference)).state is PaymentState.SUCCEEDED


async def test_tampered_callback_amount_differs_from_the_proof(daraja: Daraja) -> None:
    """A callback claiming another amount is contradicted by the status and the money taken."""
    daraja.sim.faults.tamper_amount_kes = 1
    started = await daraja.provider.request_collection(_request())
    await daraja.sim.settle()
    notice = daraja.provider.parse_callback(daraja.notices()[0], {})
    status = await daraja.provider.query_status(started.reference)
    assert notice.amount == Money(100, "KES")
    assert status.amount == KES_50 != notice.amount
    assert [c.amount_minor for c in daraja.sim.ledger()] == [5000]


async def test_lost_callback_is_recovered_by_query(daraja: Daraja) -> None:
    """With the callback lost, query_status alone proves the payment."""
    daraja.sim.faults.callbacks.drop_next = 1
    started = await daraja.provider.request_collection(_request())
    await daraja.sim.settle()
    assert daraja.notices() == []
    assert (await daraja.provider.query_status(started.reference)).state is PaymentState.SUCCEEDED


async def test_ten_duplicated_callbacks_are_ten_identical_notices(daraja: Daraja) -> None:
    """Ten copies of a callback parse to one reference and one payload hash; one charge."""
    daraja.sim.faults.callbacks.copies = 10
    await daraja.provider.request_collection(_request())
    await daraja.sim.settle()
    notices = [daraja.provider.parse_callback(b, {}) for b in daraja.notices()]
    assert len(notices) == 10
    assert len({(n.reference, n.payload_hash) for n in notices}) == 1
    assert len(daraja.sim.ledger()) == 1


async def test_callback_after_the_query_showed_the_final_state(daraja: Daraja) -> None:
    """A callback held back arrives after a query already proved the payment; it agrees."""
    daraja.sim.faults.callbacks.hold = True
    started = await daraja.provider.request_collection(_request())
    await daraja.sim.settle()
    assert (await daraja.provider.query_status(started.reference)).state is PaymentState.SUCCEEDED
    assert daraja.notices() == []
    await daraja.sim.release_callbacks()
    [body] = daraja.notices()
    assert daraja.provider.parse_callback(body, {}).reference == started.reference


async def test_held_callbacks_can_be_reordered(daraja: Daraja) -> None:
    """Released in reverse, the second purchase's callback arrives before the first's."""
    daraja.sim.faults.callbacks.hold = True
    first = await daraja.provider.request_collection(_request("p-1"))
    second = await daraja.provider.request_collection(
        _request("p-2", payer=Msisdn("+254711000001"))
    )
    await daraja.sim.settle()
    await daraja.sim.release_callbacks(reverse=True)
    refs = [daraja.provider.parse_callback(b, {}).reference for b in daraja.notices()]
    assert refs == [second.reference, first.reference]


async def test_same_purchase_is_pushed_once(daraja: Daraja) -> None:
    """Requesting the same purchase twice sends one push and returns the same reference."""
    first = await daraja.provider.request_collection(_request())
    again = await daraja.provider.request_collection(_request())
    assert first == again
    assert len(daraja.sim.push_requests) == 1


async def test_second_open_prompt_for_a_subscriber_is_retryable(daraja: Daraja) -> None:
    """Daraja's "unable to lock subscriber" while a prompt is open is a retryable refusal."""
    daraja.sim.faults.hold_prompts = True
    await daraja.provider.request_collection(_request("p-1"))
    with pytest.raises(ProviderUnavailable) as caught:
        await daraja.provider.request_collection(_request("p-2"))
    assert caught.value.retryable


async def test_spike_arrest_is_retryable(daraja: Daraja) -> None:
    """A throttled push (500.003.02) is ProviderUnavailable, retryable."""
    daraja.sim.faults.push_errors = 1
    with pytest.raises(ProviderUnavailable) as caught:
        await daraja.provider.request_collection(_request())
    assert caught.value.retryable
    assert "500.003.02" in str(caught.value)


async def test_wrong_passkey_is_a_final_refusal(
    daraja: Daraja, session: aiohttp.ClientSession
) -> None:
    """A push whose Password does not match the passkey is declined, not retryable."""
    provider = DarajaProvider(
        session,
        base_url=daraja.base_url,
        consumer_key=daraja.sim.consumer_key,
        consumer_secret=daraja.sim.consumer_secret,
        shortcode=daraja.sim.shortcode,
        passkey="not-the-passkey",
        callback_url=daraja.receiver.url("/stk"),
    )
    with pytest.raises(PaymentDeclined) as caught:
        await provider.request_collection(_request())
    assert not caught.value.retryable
    assert "Wrong credentials" in str(caught.value)


@pytest.mark.parametrize("amount", [Money(5050, "KES"), Money(5000, "UGX"), Money(0, "KES")])
async def test_amounts_mpesa_cannot_take_are_declined_before_sending(
    daraja: Daraja, amount: Money
) -> None:
    """Fractions of a shilling, other currencies and zero are declined without a push."""
    with pytest.raises(PaymentDeclined):
        await daraja.provider.request_collection(_request(amount=amount))
    assert daraja.sim.push_requests == []


async def test_query_5xx_is_retryable(daraja: Daraja) -> None:
    """An STK Query answered with a 500 is ProviderUnavailable, retryable."""
    started = await daraja.provider.request_collection(_request())
    daraja.sim.faults.query_errors = 1
    with pytest.raises(ProviderUnavailable) as caught:
        await daraja.provider.query_status(started.reference)
    assert caught.value.retryable
    assert (await daraja.provider.query_status(started.reference)).state is PaymentState.SUCCEEDED


async def test_query_timeout_is_retryable(daraja: Daraja, session: aiohttp.ClientSession) -> None:
    """An STK Query that does not answer within the deadline is ProviderUnavailable, retryable."""
    started = await daraja.provider.request_collection(_request())
    fast = DarajaProvider(
        session,
        base_url=daraja.base_url,
        consumer_key=daraja.sim.consumer_key,
        consumer_secret=daraja.sim.consumer_secret,
        shortcode=daraja.sim.shortcode,
        passkey=daraja.sim.passkey,
        callback_url=daraja.receiver.url("/stk"),
        timeout_s=0.2,
    )
    await fast.query_status(started.reference)  # fetch the token before queries hang
    daraja.sim.faults.hang_queries = True
    with pytest.raises(ProviderUnavailable) as caught:
        await fast.query_status(started.reference)
    daraja.sim.release_queries()
    assert caught.value.retryable


async def test_unknown_checkout_is_contradicted(daraja: Daraja) -> None:
    """A CheckoutRequestID Daraja never issued is ForgedCallback: its records contradict it."""
    with pytest.raises(ForgedCallback):
        await daraja.provider.query_status(ProviderReference("ws_CO_000000000000000000"))


async def test_unreachable_daraja_is_retryable(session: aiohttp.ClientSession) -> None:
    """A refused connection is ProviderUnavailable, retryable (nothing was sent)."""
    provider = _offline_provider()
    provider._session = session
    with pytest.raises(ProviderUnavailable) as caught:
        await provider.request_collection(_request())
    assert caught.value.retryable


async def test_push_timing_out_after_sending_is_not_retryable(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    """A push that times out after it was sent may have prompted: retryable=False."""
    release = asyncio.Event()

    async def token(_request: web.Request) -> web.Response:
        return web.json_response({"access_token": "t", "expires_in": "3599"})

    async def hang(_request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/oauth/v1/generate", token)
    app.router.add_post("/mpesa/stkpush/v1/processrequest", hang)
    server = await aiohttp_server(app)
    provider = _offline_provider()
    provider._session = session
    provider._base_url = str(server.make_url("")).rstrip("/")
    provider._timeout_s = 0.2
    with pytest.raises(ProviderUnavailable) as caught:
        await provider.request_collection(_request())
    release.set()
    assert not caught.value.retryable


# -- OAuth ----------------------------------------------------------------------------------


async def test_token_is_cached_until_shortly_before_expiry(
    daraja: Daraja, clock: FakeClock
) -> None:
    """Calls share one token; a new one is fetched only near the end of its 3599 s."""
    started = await daraja.provider.request_collection(_request())
    await daraja.provider.query_status(started.reference)
    assert daraja.sim.token_grants == 1
    clock.advance(3000)
    await daraja.provider.query_status(started.reference)
    assert daraja.sim.token_grants == 1
    clock.advance(560)
    await daraja.provider.query_status(started.reference)
    assert daraja.sim.token_grants == 2


async def test_token_rejected_by_daraja_is_refreshed(daraja: Daraja) -> None:
    """A cached token Daraja no longer accepts (404.001.03) is replaced and the call succeeds."""
    started = await daraja.provider.request_collection(_request())
    daraja.sim.expire_tokens()
    assert (await daraja.provider.query_status(started.reference)).state is PaymentState.SUCCEEDED
    assert daraja.sim.token_grants == 2


async def test_bad_consumer_secret_is_a_final_refusal(
    daraja: Daraja, session: aiohttp.ClientSession
) -> None:
    """OAuth refusing our credentials is a non-retryable error naming Daraja's code."""
    provider = DarajaProvider(
        session,
        base_url=daraja.base_url,
        consumer_key=daraja.sim.consumer_key,
        consumer_secret="wrong",
        shortcode=daraja.sim.shortcode,
        passkey=daraja.sim.passkey,
        callback_url=daraja.receiver.url("/stk"),
    )
    with pytest.raises(PaymentDeclined, match=r"400\.008\.01"):
        await provider.request_collection(_request())


# -- C2B ------------------------------------------------------------------------------------


def _validator(provider: DarajaProvider, known: set[str]) -> Callable[[bytes], tuple[int, bytes]]:
    def validate(body: bytes) -> tuple[int, bytes]:
        notice = provider.parse_customer_validation(body)
        refusal = (
            None if notice.account_reference in known else CustomerPaymentRefusal.UNKNOWN_ACCOUNT
        )
        ack = provider.customer_validation_answer(refusal)
        return ack.status, ack.body

    return validate


async def test_c2b_to_a_known_meter_is_validated_confirmed_and_proven(daraja: Daraja) -> None:
    """A paybill payment to a known meter passes validation, is confirmed and proven."""
    daraja.sim.register_urls(
        validation_url=daraja.receiver.url("/c2b/validation"),
        confirmation_url=daraja.receiver.url("/c2b/confirmation"),
    )
    daraja.receiver.hooks["/c2b/validation"] = _validator(daraja.provider, {"37012345678"})
    outcome = await daraja.sim.pay_bill("254708374149", "37012345678", 200)
    await daraja.sim.settle()
    assert outcome.accepted
    [body] = daraja.receiver.bodies("/c2b/confirmation")
    notice = daraja.provider.parse_callback(body, {})
    assert notice.is_customer_initiated
    assert notice.account_reference == "37012345678"
    assert notice.amount == Money(20000, "KES")
    assert notice.payer is None
    status = await daraja.provider.query_status(notice.reference)
    assert status.state is PaymentState.SUCCEEDED
    assert status.amount == Money(20000, "KES")
    assert status.payer == PAYER
    assert status.receipt == outcome.trans_id
    assert status.customer_initiated is True  # ReasonType "Pay Bill": from the SIM menu


async def test_transaction_status_tells_a_push_receipt_from_a_paybill_one(daraja: Daraja) -> None:
    """Daraja's ReasonType: "Pay Bill Online" is an STK push's receipt, not a paybill payment.

    A claim that a push's receipt is a paybill payment (or the reverse) is then contradicted by
    Daraja's own record (the saga's ``payment_claim_contradicted``).
    """
    await daraja.provider.request_collection(_request())
    await daraja.sim.settle()
    [charge] = daraja.sim.ledger()
    record = await daraja.provider.verify_receipt(charge.receipt)
    assert record.state is PaymentState.SUCCEEDED
    assert record.payer == PAYER
    assert record.customer_initiated is False


async def test_c2b_to_an_unknown_meter_is_rejected_before_money_moves(daraja: Daraja) -> None:
    """Validation refusing the account answers C2B00012; no money is taken, no confirmation."""
    daraja.sim.register_urls(
        validation_url=daraja.receiver.url("/c2b/validation"),
        confirmation_url=daraja.receiver.url("/c2b/confirmation"),
    )
    daraja.receiver.hooks["/c2b/validation"] = _validator(daraja.provider, {"37012345678"})
    outcome = await daraja.sim.pay_bill("254708374149", "99999999999", 200)
    await daraja.sim.settle()
    assert not outcome.accepted
    assert outcome.result_code == "C2B00012"
    assert daraja.sim.ledger() == []
    assert daraja.receiver.bodies("/c2b/confirmation") == []


async def test_c2b_validation_failure_applies_the_registered_default(daraja: Daraja) -> None:
    """When validation errors, Daraja applies ResponseType: Cancelled refuses the payment."""
    daraja.sim.register_urls(
        validation_url=daraja.receiver.url("/c2b/validation"),
        confirmation_url=daraja.receiver.url("/c2b/confirmation"),
        response_type="Cancelled",
    )
    daraja.receiver.hooks["/c2b/validation"] = lambda _body: (500, b"")
    outcome = await daraja.sim.pay_bill("254708374149", "37012345678", 200)
    assert not outcome.accepted
    assert daraja.sim.ledger() == []


@pytest.mark.parametrize(
    ("refusal", "code"),
    [
        (CustomerPaymentRefusal.UNKNOWN_ACCOUNT, "C2B00012"),
        (CustomerPaymentRefusal.AMOUNT_OUT_OF_RANGE, "C2B00013"),
        (CustomerPaymentRefusal.INVALID_PAYER, "C2B00011"),
        ("meter is blocked", "C2B00016"),
    ],
)
def test_validation_refusals_use_darajas_codes(refusal: str, code: str) -> None:
    """Each refusal reason is answered with Daraja's reject code and "Rejected"."""
    ack = _offline_provider().customer_validation_answer(refusal)
    assert json.loads(ack.body) == {"ResultCode": code, "ResultDesc": "Rejected"}


def test_validation_accept_and_confirmation_answers() -> None:
    """Accept is ResultCode "0"/Accepted; confirmation is ResultCode 0/Success."""
    provider = _offline_provider()
    assert json.loads(provider.customer_validation_answer(None).body) == {
        "ResultCode": "0",
        "ResultDesc": "Accepted",
    }
    assert json.loads(provider.customer_confirmation_answer().body) == {
        "ResultCode": 0,
        "ResultDesc": "Success",
    }


async def test_transaction_status_for_an_unknown_receipt_is_failed(daraja: Daraja) -> None:
    """A receipt M-Pesa never issued is FAILED by Transaction Status: it proves nothing."""
    status = await daraja.provider.query_status(ProviderReference("ZZZZZZZZZZ"))
    assert status.state is PaymentState.FAILED


async def test_transaction_status_with_a_wrong_credential_is_not_retryable(
    daraja: Daraja, session: aiohttp.ClientSession, receiver: CallbackReceiver
) -> None:
    """An initiator M-Pesa refuses (2001) is a configuration fault: not retryable."""
    provider = DarajaProvider(
        session,
        base_url=daraja.base_url,
        consumer_key=daraja.sim.consumer_key,
        consumer_secret=daraja.sim.consumer_secret,
        shortcode=daraja.sim.shortcode,
        passkey=daraja.sim.passkey,
        callback_url=receiver.url("/stk"),
        initiator="testapi",
        security_credential="wrong",
        status_result_url=receiver.url("/status/result"),
        status_timeout_url=receiver.url("/status/timeout"),
    )

    async def deliver(body: bytes) -> tuple[int, bytes]:
        await provider.deliver_status_result(body)
        return 200, b"{}"

    receiver.hooks["/status/result"] = deliver
    with pytest.raises(ProviderUnavailable) as caught:
        await provider.query_status(ProviderReference("ZZZZZZZZZZ"))
    assert not caught.value.retryable


async def test_transaction_status_result_lost_is_retryable(daraja: Daraja) -> None:
    """When the asynchronous result never arrives, the query fails retryable."""
    daraja.provider._status_result_wait_s = 0.2
    daraja.sim.faults.callbacks.drop_next = 1
    with pytest.raises(ProviderUnavailable) as caught:
        await daraja.provider.query_status(ProviderReference("ZZZZZZZZZZ"))
    assert caught.value.retryable


async def test_transaction_status_unconfigured_is_not_retryable() -> None:
    """Without initiator and credential, confirming a C2B receipt fails, not retryable."""
    with pytest.raises(ProviderUnavailable) as caught:
        await _offline_provider().query_status(ProviderReference("RKTQDM7W6S"))
    assert not caught.value.retryable


async def test_simulate_endpoint_pays_from_the_sim_menu(
    daraja: Daraja, session: aiohttp.ClientSession
) -> None:
    """Daraja's own C2B simulate call makes a payment the ledger endpoint then reports."""
    daraja.sim.register_urls(
        validation_url="", confirmation_url=daraja.receiver.url("/c2b/confirmation")
    )
    token = await daraja.provider._tokens.get()
    headers = {"Authorization": f"Bearer {token}"}
    body = {
        "ShortCode": "600638",
        "CommandID": "CustomerPayBillOnline",
        "Amount": "100",
        "Msisdn": "254708374149",
        "BillRefNumber": "37012345678",
    }
    async with session.post(
        f"{daraja.base_url}/mpesa/c2b/v1/simulate", json=body, headers=headers
    ) as response:
        assert (await response.json())["ResponseCode"] == "0"
    await daraja.sim.settle()
    async with session.get(f"{daraja.base_url}/_sim/ledger") as response:
        [charge] = await response.json()
    assert charge["amount_minor"] == 10000
    assert charge["account"] == "37012345678"
    assert len(daraja.receiver.bodies("/c2b/confirmation")) == 1


async def test_concurrent_transaction_status_queries_both_get_the_result(daraja: Daraja) -> None:
    """Two queries for one receipt at once both receive Daraja's asynchronous result."""
    daraja.sim.register_urls(
        validation_url="", confirmation_url=daraja.receiver.url("/c2b/confirmation")
    )
    outcome = await daraja.sim.pay_bill("254708374149", "37012345678", 200)
    reference = ProviderReference(outcome.trans_id)
    first, second = await asyncio.gather(
        daraja.provider.query_status(reference), daraja.provider.query_status(reference)
    )
    assert first.state is second.state is PaymentState.SUCCEEDED
    assert daraja.provider._status_requests == {}


async def test_query_with_wrong_credentials_is_a_configuration_fault(
    daraja: Daraja, session: aiohttp.ClientSession
) -> None:
    """An STK Query refused for our Password is not a forged push: non-retryable unavailability."""
    started = await daraja.provider.request_collection(_request())
    misconfigured = DarajaProvider(
        session,
        base_url=daraja.base_url,
        consumer_key=daraja.sim.consumer_key,
        consumer_secret=daraja.sim.consumer_secret,
        shortcode=daraja.sim.shortcode,
        passkey="stale-passkey",
        callback_url=daraja.receiver.url("/stk"),
    )
    with pytest.raises(ProviderUnavailable) as caught:
        await misconfigured.query_status(started.reference)
    assert not caught.value.retryable
    assert not isinstance(caught.value, ForgedCallback)


@settings(max_examples=200)
@given(
    shillings=st.integers(min_value=1, max_value=250_000),
    as_float=st.booleans(),
    receipt=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=10, max_size=10),
    subscriber=st.integers(min_value=0, max_value=99_999_999),
    prefix=st.sampled_from([2547, 2541]),
)
def test_any_documented_success_callback_reads_back_its_values(
    shillings: int, as_float: bool, receipt: str, subscriber: int, prefix: int
) -> None:
    """Every success callback of Daraja's shape yields exactly its amount, receipt and payer."""
    phone = int(f"{prefix}{subscriber:08d}")
    amount: float | int = float(shillings) if as_float else shillings
    body = json.dumps(
        {
            "Body": {
                "stkCallback": {
                    "MerchantRequestID": "29115-34620561-1",
                    "CheckoutRequestID": "ws_CO_191220191020363925",
                    "ResultCode": 0,
                    "ResultDesc": "The service request is processed successfully.",
                    "CallbackMetadata": {
                        "Item": [
                            {"Name": "Amount", "Value": amount},
                            {"Name": "MpesaReceiptNumber", "Value": receipt},
                            {"Name": "Balance"},
                            {"Name": "TransactionDate", "Value": 20191219102115},
                            {"Name": "PhoneNumber", "Value": phone},
                        ]
                    },
                }
            }
        }
    ).encode()
    try:
        notice = _offline_provider().parse_callback(body, {})
    except ForgedCallback:
        # Only numbers phonenumbers' metadata does not list as valid Kenyan mobiles may fail.
        assert not is_valid_number(parse(f"+{phone}"))
        return
    assert notice.amount == Money(shillings * 100, "KES")
    assert notice.receipt == receipt
    assert notice.payer == f"+{phone}"
