import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.money import Money
from gateway.payments.base import (
    CollectionRequest,
    ForgedCallback,
    PaymentDeclined,
    PaymentState,
    ProviderReference,
    ProviderUnavailable,
)
from gateway.payments.momo import MomoProvider, reference_for
from gateway.phone import Msisdn
from gateway.sim.momo import MomoSimulator, PayerAction
from tests.payments.payfakes import CallbackReceiver, FakeClock

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]

PAYER = Msisdn("+256772123456")
EUR_5 = Money(500, "EUR")

# The status/callback body as MoMo documents it (docs/protocols.md §3.1): amount is a string.
DOC_CALLBACK = json.dumps(
    {
        "financialTransactionId": "363440463",
        "externalId": "947354",
        "amount": "100",
        "currency": "EUR",
        "payer": {"partyIdType": "MSISDN", "partyId": "256772123456"},
        "payerMessage": "Electricity",
        "payeeNote": "37012345678",
        "status": "SUCCESSFUL",
    }
).encode()


@dataclass
class Momo:
    """A MoMo simulator, the adapter pointed at it and the receiver of its callbacks."""

    sim: MomoSimulator
    provider: MomoProvider
    receiver: CallbackReceiver
    base_url: str

    def notices(self) -> list[bytes]:
        """The callbacks received so far."""
        return self.receiver.bodies("/momo")

    def provider_with(self, session: aiohttp.ClientSession, **changes: object) -> MomoProvider:
        """Another adapter on the same simulator, with some settings changed."""
        settings_: dict[str, object] = {
            "base_url": self.base_url,
            "subscription_key": self.sim.subscription_key,
            "api_user": self.sim.api_user,
            "api_key": self.sim.api_key,
            "callback_url": self.receiver.url("/momo"),
        }
        settings_.update(changes)
        return MomoProvider(session, **settings_)  # type: ignore[arg-type]


def _request(
    purchase: str = "p-1", payer: Msisdn = PAYER, amount: Money = EUR_5
) -> CollectionRequest:
    return CollectionRequest(
        purchase_id=purchase,
        payer=payer,
        amount=amount,
        account_reference="37012345678",
        description="Electricity",
    )


@pytest.fixture
async def momo(
    aiohttp_server: ServerFactory,
    session: aiohttp.ClientSession,
    receiver: CallbackReceiver,
    clock: FakeClock,
) -> Momo:
    """A MoMo simulator on loopback and the adapter pointed at it."""
    sim = MomoSimulator(seed=3)
    server = await aiohttp_server(sim.app)
    base_url = str(server.make_url("")).rstrip("/")
    provider = MomoProvider(
        session,
        base_url=base_url,
        subscription_key=sim.subscription_key,
        api_user=sim.api_user,
        api_key=sim.api_key,
        callback_url=receiver.url("/momo"),
        timeout_s=2.0,
        clock=clock,
    )
    return Momo(sim, provider, receiver, base_url)


def _offline() -> MomoProvider:
    return MomoProvider(
        cast("aiohttp.ClientSession", None),  # parsing is pure
        base_url="http://127.0.0.1:9",
        subscription_key="s",
        api_user="u",
        api_key="k",
    )


def test_reference_is_a_stable_uuid5_of_the_purchase() -> None:
    """The X-Reference-Id is a version-5 UUID, equal for equal purchases, distinct otherwise."""
    first = reference_for("p-1")
    assert uuid.UUID(first).version == 5
    assert reference_for("p-1") == first != reference_for("p-2")


def test_documented_callback_parses() -> None:
    """The documented status body parses to a claim keyed by the externalId's reference."""
    notice = _offline().parse_callback(DOC_CALLBACK, {})
    assert notice.reference == reference_for("947354")
    assert notice.claimed_state is PaymentState.SUCCEEDED
    assert notice.amount == Money(10000, "EUR")
    assert notice.payer == "+256772123456"
    assert notice.receipt == "363440463"


@pytest.mark.parametrize(
    ("reason", "state"),
    [
        ("APPROVAL_REJECTED", PaymentState.CANCELLED),
        ("COULD_NOT_PERFORM_TRANSACTION", PaymentState.TIMED_OUT),
        ("NOT_ENOUGH_FUNDS", PaymentState.FAILED),
        ({"code": "PAYER_NOT_FOUND", "message": "Payer not found"}, PaymentState.FAILED),
    ],
)
def test_failed_callback_reasons_map_to_states(reason: object, state: PaymentState) -> None:
    """FAILED with each reason (string, or the older object form) maps to our state."""
    body = json.loads(DOC_CALLBACK)
    body.update(status="FAILED", reason=reason)
    del body["financialTransactionId"]
    notice = _offline().parse_callback(json.dumps(body).encode(), {})
    assert notice.claimed_state is state


@pytest.mark.parametrize(
    "change",
    [{"amount": 100}, {"status": "DONE"}, {"externalId": ""}, {"currency": None}],
)
def test_callbacks_off_the_documented_shape_are_forged(change: dict[str, object]) -> None:
    """A number for amount, an unknown status, no externalId or currency: forged."""
    body = json.loads(DOC_CALLBACK)
    body.update(change)
    with pytest.raises(ForgedCallback):
        _offline().parse_callback(json.dumps(body).encode(), {})


@settings(max_examples=300)
@given(st.binary())
def test_arbitrary_bytes_raise_only_forged_callback(body: bytes) -> None:
    """Whatever the bytes, parse_callback returns a notice or raises ForgedCallback."""
    with contextlib.suppress(ForgedCallback):
        _offline().parse_callback(body, {})


@settings(max_examples=200)
@example({"externalId": "p", "status": "FAILED", "amount": "1e999999999", "currency": "EUR"})
@given(
    st.dictionaries(
        st.sampled_from(["externalId", "status", "amount", "currency", "payer", "reason"]),
        st.none()
        | st.integers()
        | st.floats()
        | st.text(max_size=10)
        | st.sampled_from(["SUCCESSFUL", "FAILED", "PENDING", "EUR", "1e999", "NaN", "-5"]),
    )
)
def test_arbitrary_fields_raise_only_forged_callback(fields: dict[str, object]) -> None:
    """Any mix of MoMo's field names and values is parsed or refused, never crashes."""
    with contextlib.suppress(ForgedCallback):
        _offline().parse_callback(json.dumps(fields).encode(), {})


async def test_approved_request_is_claimed_and_proven(momo: Momo) -> None:
    """An approved request-to-pay is called back (PUT) and its status shows amount and payer."""
    started = await momo.provider.request_collection(_request())
    assert started.reference == reference_for("p-1")
    await momo.sim.settle()
    [delivery] = momo.sim.courier.deliveries
    assert delivery.method == "PUT"
    notice = momo.provider.parse_callback(momo.notices()[0], {})
    assert (notice.reference, notice.claimed_state) == (started.reference, PaymentState.SUCCEEDED)
    status = await momo.provider.query_status(started.reference)
    assert status.state is PaymentState.SUCCEEDED
    assert status.amount == EUR_5
    assert status.payer == PAYER
    assert status.receipt == notice.receipt
    [charge] = momo.sim.ledger()
    assert (charge.reference, charge.amount_minor, charge.currency) == (
        started.reference,
        500,
        "EUR",
    )


async def test_request_wire_format_is_momos(momo: Momo) -> None:
    """The request carries a string amount, the purchase as externalId and 256… as partyId."""
    started = await momo.provider.request_collection(_request())
    body = momo.sim.requests[started.reference].body
    assert body["amount"] == "5.00"
    assert body["currency"] == "EUR"
    assert body["externalId"] == "p-1"
    assert body["payer"] == {"partyIdType": "MSISDN", "partyId": "256772123456"}
    assert momo.sim.requests[started.reference].callback_url == momo.receiver.url("/momo")


@pytest.mark.parametrize(
    ("number", "state"),
    [
        ("+46733123450", PaymentState.FAILED),
        ("+46733123451", PaymentState.CANCELLED),
        ("+56733123453", PaymentState.SUCCEEDED),
        ("+46733123454", PaymentState.PENDING),
    ],
)
async def test_sandbox_test_numbers_behave_as_documented(
    momo: Momo, number: str, state: PaymentState
) -> None:
    """MoMo's sandbox test numbers fail, reject, succeed or stay pending."""
    started = await momo.provider.request_collection(_request(payer=Msisdn(number)))
    await momo.sim.settle()
    assert (await momo.provider.query_status(started.reference)).state is state


async def test_approval_timeout_ends_as_timed_out(momo: Momo) -> None:
    """The TIMEOUT test number stays pending, then fails COULD_NOT_PERFORM_TRANSACTION."""
    started = await momo.provider.request_collection(_request(payer=Msisdn("+46733123452")))
    assert (await momo.provider.query_status(started.reference)).state is PaymentState.PENDING
    await momo.sim.expire_requests()
    status = await momo.provider.query_status(started.reference)
    assert status.state is PaymentState.TIMED_OUT
    assert status.reason == "COULD_NOT_PERFORM_TRANSACTION"
    assert momo.sim.ledger() == []


async def test_retry_after_a_timeout_charges_once(
    momo: Momo, session: aiohttp.ClientSession
) -> None:
    """A request that timed out after MoMo took it is retried: 409, same reference, one charge."""
    provider = momo.provider_with(session, timeout_s=0.2)
    momo.sim.faults.hang_requests = True
    with pytest.raises(ProviderUnavailable) as caught:
        await provider.request_collection(_request())
    assert caught.value.retryable
    momo.sim.faults.hang_requests = False
    momo.sim.release()
    retried = await provider.request_collection(_request())
    assert retried.reference == reference_for("p-1")
    assert (await provider.query_status(retried.reference)).state is PaymentState.SUCCEEDED
    await momo.sim.settle()
    assert len(momo.sim.ledger()) == 1
    assert len(momo.sim.requests) == 1


async def test_request_5xx_is_retryable(momo: Momo) -> None:
    """A 503 on request-to-pay is ProviderUnavailable, retryable."""
    momo.sim.faults.request_errors = 1
    with pytest.raises(ProviderUnavailable) as caught:
        await momo.provider.request_collection(_request())
    assert caught.value.retryable


async def test_currency_other_than_the_environments_is_declined(momo: Momo) -> None:
    """Only the environment's currency is requested: UGX in the EUR sandbox never reaches MoMo."""
    with pytest.raises(PaymentDeclined):
        await momo.provider.request_collection(_request(amount=Money(500, "UGX")))
    assert momo.sim.requests == {}


async def test_apostrophes_never_reach_the_notes(momo: Momo) -> None:
    """MoMo refuses apostrophes in payerMessage/payeeNote: they are stripped before sending."""
    request = CollectionRequest(
        purchase_id="p-1",
        payer=PAYER,
        amount=EUR_5,
        account_reference="O'Neil's meter",
        description="Jane's power",
    )
    started = await momo.provider.request_collection(request)
    body = momo.sim.requests[started.reference].body
    assert "'" not in body["payerMessage"] + body["payeeNote"]


async def test_callback_host_must_be_the_registered_one(
    momo: Momo, session: aiohttp.ClientSession
) -> None:
    """A callback URL on a host MoMo does not know is refused (400): a final refusal."""
    provider = momo.provider_with(session, callback_url="http://evil.example/cb")
    with pytest.raises(PaymentDeclined) as caught:
        await provider.request_collection(_request())
    assert "INVALID_CALLBACK_URL_HOST" in str(caught.value)
    assert not caught.value.retryable


async def test_tampered_callback_amount_differs_from_the_proof(momo: Momo) -> None:
    """A callback claiming another amount is contradicted by the status and the money taken."""
    momo.sim.faults.tamper_amount = "0.01"
    started = await momo.provider.request_collection(_request())
    await momo.sim.settle()
    notice = momo.provider.parse_callback(momo.notices()[0], {})
    status = await momo.provider.query_status(started.reference)
    assert notice.amount == Money(1, "EUR")
    assert status.amount == EUR_5 != notice.amount
    assert [c.amount_minor for c in momo.sim.ledger()] == [500]


async def test_lost_callback_is_recovered_by_query(momo: Momo) -> None:
    """With the callback lost, the status GET alone proves the payment."""
    momo.sim.faults.callbacks.drop_next = 1
    started = await momo.provider.request_collection(_request())
    await momo.sim.settle()
    assert momo.notices() == []
    assert (await momo.provider.query_status(started.reference)).state is PaymentState.SUCCEEDED


async def test_ten_duplicated_callbacks_are_ten_identical_notices(momo: Momo) -> None:
    """Ten copies of a callback parse to one reference and one payload hash; one charge."""
    momo.sim.faults.callbacks.copies = 10
    await momo.provider.request_collection(_request())
    await momo.sim.settle()
    notices = [momo.provider.parse_callback(b, {}) for b in momo.notices()]
    assert len(notices) == 10
    assert len({(n.reference, n.payload_hash) for n in notices}) == 1
    assert len(momo.sim.ledger()) == 1


async def test_held_payer_is_pending_until_answering(momo: Momo) -> None:
    """While the payer has not answered, the status is PENDING."""
    momo.sim.faults.hold_payers = True
    started = await momo.provider.request_collection(_request())
    assert (await momo.provider.query_status(started.reference)).state is PaymentState.PENDING
    await momo.sim.answer_payers()
    assert (await momo.provider.query_status(started.reference)).state is PaymentState.SUCCEEDED


async def test_status_errors_and_timeouts_are_retryable(
    momo: Momo, session: aiohttp.ClientSession
) -> None:
    """A 500 or a status call that never answers is ProviderUnavailable, retryable."""
    provider = momo.provider_with(session, timeout_s=0.2)
    started = await provider.request_collection(_request())
    momo.sim.faults.query_errors = 1
    with pytest.raises(ProviderUnavailable) as first:
        await provider.query_status(started.reference)
    momo.sim.faults.hang_queries = True
    with pytest.raises(ProviderUnavailable) as second:
        await provider.query_status(started.reference)
    momo.sim.faults.hang_queries = False
    momo.sim.release()
    assert first.value.retryable
    assert second.value.retryable


async def test_unknown_reference_is_contradicted(momo: Momo) -> None:
    """A reference MoMo never saw (404) is ForgedCallback."""
    with pytest.raises(ForgedCallback):
        await momo.provider.query_status(ProviderReference(str(uuid.uuid4())))


async def test_token_is_cached_and_refreshed(momo: Momo, clock: FakeClock) -> None:
    """One token serves calls until near expiry; one MoMo rejects (401) is replaced."""
    started = await momo.provider.request_collection(_request())
    await momo.provider.query_status(started.reference)
    assert momo.sim.token_grants == 1
    clock.advance(3590)
    await momo.provider.query_status(started.reference)
    assert momo.sim.token_grants == 2
    momo.sim.expire_tokens()
    await momo.provider.query_status(started.reference)
    assert momo.sim.token_grants == 3


async def test_wrong_api_key_is_a_final_refusal(momo: Momo, session: aiohttp.ClientSession) -> None:
    """A token request MoMo refuses is a non-retryable refusal."""
    provider = momo.provider_with(session, api_key="wrong")
    with pytest.raises(PaymentDeclined) as caught:
        await provider.request_collection(_request())
    assert not caught.value.retryable


async def test_sandbox_provisioning_gives_a_working_user(
    momo: Momo, session: aiohttp.ClientSession
) -> None:
    """An API user made through /v1_0/apiuser and its new key can collect money."""
    user = str(uuid.uuid4())
    headers = {"Ocp-Apim-Subscription-Key": momo.sim.subscription_key, "X-Reference-Id": user}
    async with session.post(
        f"{momo.base_url}/v1_0/apiuser",
        json={"providerCallbackHost": "127.0.0.1"},
        headers=headers,
    ) as response:
        assert response.status == 201
    async with session.post(f"{momo.base_url}/v1_0/apiuser/{user}/apikey", headers=headers) as r:
        key = (await r.json())["apiKey"]
    provider = momo.provider_with(session, api_user=user, api_key=key)
    started = await provider.request_collection(_request())
    assert (await provider.query_status(started.reference)).state is PaymentState.SUCCEEDED


async def test_post_callbacks_are_supported(momo: Momo) -> None:
    """A simulator set to POST callbacks delivers the same body by POST."""
    momo.sim.callback_method = "POST"
    await momo.provider.request_collection(_request())
    await momo.sim.settle()
    assert [d.method for d in momo.sim.courier.deliveries] == ["POST"]
    assert (
        momo.provider.parse_callback(momo.notices()[0], {}).claimed_state is PaymentState.SUCCEEDED
    )


async def test_payer_set_to_reject(momo: Momo) -> None:
    """A payer told to reject makes the request CANCELLED and takes no money."""
    momo.sim.set_payer(PAYER, PayerAction.REJECT)
    started = await momo.provider.request_collection(_request())
    await momo.sim.settle()
    assert (await momo.provider.query_status(started.reference)).state is PaymentState.CANCELLED
    assert momo.sim.ledger() == []


async def test_status_refused_for_our_environment_is_not_retryable(
    momo: Momo, session: aiohttp.ClientSession
) -> None:
    """A status GET refused with a 4xx (wrong X-Target-Environment) is a configuration fault."""
    started = await momo.provider.request_collection(_request())
    misconfigured = momo.provider_with(session, target_environment="mtnuganda")
    with pytest.raises(ProviderUnavailable) as caught:
        await misconfigured.query_status(started.reference)
    assert not caught.value.retryable


@settings(max_examples=200)
@given(
    cents=st.integers(min_value=1, max_value=10**9),
    external=st.text(min_size=1, max_size=40),
    status=st.sampled_from(["SUCCESSFUL", "FAILED", "PENDING"]),
)
def test_any_documented_callback_reads_back_its_values(
    cents: int, external: str, status: str
) -> None:
    """Every callback of MoMo's shape yields its amount and the reference of its externalId."""
    body = json.loads(DOC_CALLBACK)
    body.update(amount=str(Money(cents, "EUR").major), externalId=external, status=status)
    notice = _offline().parse_callback(json.dumps(body).encode(), {})
    assert notice.amount == Money(cents, "EUR")
    assert notice.reference == reference_for(external)
    assert notice.claimed_state.is_final is (status != "PENDING")
