import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.money import Money
from gateway.payments.airtel import AirtelProvider
from gateway.payments.base import (
    CollectionRequest,
    ForgedCallback,
    PaymentDeclined,
    PaymentState,
    ProviderReference,
    ProviderUnavailable,
)
from gateway.phone import Msisdn
from gateway.sim.airtel import AirtelAction, AirtelSimulator
from tests.payments.payfakes import CallbackReceiver, FakeClock

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]

PAYER = Msisdn("+256752123456")
UGX_5000 = Money(5000, "UGX")

# The callback shape Airtel's Open API documents (docs/protocols.md §3.2).
DOC_CALLBACK = (
    b'{"transaction":{"id":"BBZMiscxy","message":"Paid UGX 5,000 to TECHNOLOGIES LIMITED '
    b'Charge UGX 140, Trans ID MP210603.1234.L06941.","status_code":"TS",'
    b'"airtel_money_id":"MP210603.1234.L06941"}}'
)


@dataclass
class Airtel:
    """An Airtel simulator, the adapter pointed at it and the receiver of its callbacks."""

    sim: AirtelSimulator
    provider: AirtelProvider
    receiver: CallbackReceiver
    base_url: str

    def notices(self) -> list[bytes]:
        """The callbacks received so far."""
        return self.receiver.bodies("/airtel")


def _request(purchase: str = "p-1", amount: Money = UGX_5000) -> CollectionRequest:
    return CollectionRequest(
        purchase_id=purchase,
        payer=PAYER,
        amount=amount,
        account_reference="37012345678",
        description="Electricity",
    )


@pytest.fixture
async def airtel(
    aiohttp_server: ServerFactory,
    session: aiohttp.ClientSession,
    receiver: CallbackReceiver,
    clock: FakeClock,
) -> Airtel:
    """An Airtel simulator on loopback and the adapter pointed at it."""
    sim = AirtelSimulator(seed=5, callback_url=receiver.url("/airtel"))
    server = await aiohttp_server(sim.app)
    base_url = str(server.make_url("")).rstrip("/")
    provider = AirtelProvider(
        session,
        base_url=base_url,
        client_id=sim.client_id,
        client_secret=sim.client_secret,
        timeout_s=2.0,
        clock=clock,
    )
    return Airtel(sim, provider, receiver, base_url)


def _offline() -> AirtelProvider:
    return AirtelProvider(
        cast("aiohttp.ClientSession", None),  # parsing is pure
        base_url="http://127.0.0.1:9",
        client_id="c",
        client_secret="s",
    )


def test_documented_callback_parses() -> None:
    """Airtel's documented callback is a SUCCEEDED claim keyed by our transaction id."""
    notice = _offline().parse_callback(DOC_CALLBACK, {})
    assert notice.reference == "BBZMiscxy"
    assert notice.claimed_state is PaymentState.SUCCEEDED
    assert notice.receipt == "MP210603.1234.L06941"
    assert notice.amount is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"transaction":{"id":"x","status_code":"OK"}}',
        b'{"transaction":{"id":7,"status_code":"TS"}}',
        b'{"transaction":"TS"}',
        b'{"transaction":{"id":"x","status_code":"TS","airtel_money_id":5}}',
    ],
)
def test_callbacks_off_the_documented_shape_are_forged(body: bytes) -> None:
    """Unknown status codes, non-string ids or a missing object are forged."""
    with pytest.raises(ForgedCallback):
        _offline().parse_callback(body, {})


@settings(max_examples=300)
@given(st.binary())
def test_arbitrary_bytes_raise_only_forged_callback(body: bytes) -> None:
    """Whatever the bytes, parse_callback returns a notice or raises ForgedCallback."""
    with contextlib.suppress(ForgedCallback):
        _offline().parse_callback(body, {})


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.sampled_from(["id", "status_code", "airtel_money_id", "message"]),
        st.none() | st.integers() | st.text(max_size=70) | st.sampled_from(["TS", "TF", "TIP"]),
    )
)
def test_arbitrary_transaction_fields_raise_only_forged_callback(fields: dict[str, object]) -> None:
    """Any mix of the callback's field names and values is parsed or refused, never crashes."""
    with contextlib.suppress(ForgedCallback):
        _offline().parse_callback(json.dumps({"transaction": fields}).encode(), {})


async def test_approved_push_is_claimed_and_proven(airtel: Airtel) -> None:
    """An approved push is called back TS and the status query proves it."""
    started = await airtel.provider.request_collection(_request())
    assert started.reference == "p-1"
    await airtel.sim.settle()
    notice = airtel.provider.parse_callback(airtel.notices()[0], {})
    assert notice.claimed_state is PaymentState.SUCCEEDED
    status = await airtel.provider.query_status(started.reference)
    assert status.state is PaymentState.SUCCEEDED
    assert status.amount == UGX_5000
    assert status.receipt == notice.receipt
    [charge] = airtel.sim.ledger()
    assert (charge.reference, charge.amount_minor, charge.currency) == ("p-1", 5000, "UGX")


async def test_request_wire_format_is_airtels(airtel: Airtel) -> None:
    """The subscriber msisdn is national (no country code) and the amount a whole number."""
    await airtel.provider.request_collection(_request())
    payment = airtel.sim.payments["p-1"]
    assert payment.msisdn == "752123456"
    assert payment.amount == 5000


@pytest.mark.parametrize(
    ("action", "state"),
    [
        (AirtelAction.WRONG_PIN, PaymentState.FAILED),
        (AirtelAction.NOT_ENOUGH_FUNDS, PaymentState.FAILED),
        (AirtelAction.REFUSE, PaymentState.CANCELLED),
        (AirtelAction.IGNORE, PaymentState.TIMED_OUT),
    ],
)
async def test_payer_refusals_map_to_states(
    airtel: Airtel, action: AirtelAction, state: PaymentState
) -> None:
    """Wrong PIN, no funds, refusal and an ignored prompt map to our states; no money moves."""
    airtel.sim.set_payer("752123456", action)
    started = await airtel.provider.request_collection(_request())
    await airtel.sim.expire_payments()
    status = await airtel.provider.query_status(started.reference)
    assert status.state is state
    assert status.reason
    assert airtel.sim.ledger() == []


async def test_in_progress_is_pending(airtel: Airtel) -> None:
    """While the payer has not answered, the status is PENDING (TIP)."""
    airtel.sim.faults.hold_payers = True
    started = await airtel.provider.request_collection(_request())
    assert (await airtel.provider.query_status(started.reference)).state is PaymentState.PENDING
    await airtel.sim.answer_payers()
    assert (await airtel.provider.query_status(started.reference)).state is PaymentState.SUCCEEDED


async def test_forged_success_callback_is_contradicted_by_the_status(airtel: Airtel) -> None:
    """A callback claiming success for a failed payment is contradicted by the status query."""
    airtel.sim.set_payer("752123456", AirtelAction.NOT_ENOUGH_FUNDS)
    airtel.sim.faults.forge_success = True
    started = await airtel.provider.request_collection(_request())
    await airtel.sim.settle()
    notice = airtel.provider.parse_callback(airtel.notices()[0], {})
    assert notice.claimed_state is PaymentState.SUCCEEDED
    assert (await airtel.provider.query_status(started.reference)).state is PaymentState.FAILED
    assert airtel.sim.ledger() == []


async def test_retry_after_a_timeout_charges_once(
    airtel: Airtel, session: aiohttp.ClientSession
) -> None:
    """A push that timed out after Airtel took it is retried: duplicate id, one charge."""
    provider = AirtelProvider(
        session,
        base_url=airtel.base_url,
        client_id=airtel.sim.client_id,
        client_secret=airtel.sim.client_secret,
        timeout_s=0.2,
    )
    await provider._tokens.get()
    airtel.sim.faults.hang_requests = True
    with pytest.raises(ProviderUnavailable) as caught:
        await provider.request_collection(_request())
    assert caught.value.retryable
    airtel.sim.faults.hang_requests = False
    airtel.sim.release()
    again = await provider.request_collection(_request())
    assert (await provider.query_status(again.reference)).state is PaymentState.SUCCEEDED
    await airtel.sim.settle()
    assert len(airtel.sim.ledger()) == 1


async def test_lost_callback_is_recovered_by_query(airtel: Airtel) -> None:
    """With the callback lost, the status query alone proves the payment."""
    airtel.sim.faults.callbacks.drop_next = 1
    started = await airtel.provider.request_collection(_request())
    await airtel.sim.settle()
    assert airtel.notices() == []
    assert (await airtel.provider.query_status(started.reference)).state is PaymentState.SUCCEEDED


async def test_ten_duplicated_callbacks_are_ten_identical_notices(airtel: Airtel) -> None:
    """Ten copies of a callback parse to one reference and one payload hash."""
    airtel.sim.faults.callbacks.copies = 10
    await airtel.provider.request_collection(_request())
    await airtel.sim.settle()
    notices = [airtel.provider.parse_callback(b, {}) for b in airtel.notices()]
    assert len(notices) == 10
    assert len({(n.reference, n.payload_hash) for n in notices}) == 1


async def test_server_errors_are_retryable(airtel: Airtel) -> None:
    """A 500 on the push or on the status is ProviderUnavailable, retryable."""
    airtel.sim.faults.request_errors = 1
    with pytest.raises(ProviderUnavailable) as first:
        await airtel.provider.request_collection(_request())
    started = await airtel.provider.request_collection(_request())
    airtel.sim.faults.query_errors = 1
    with pytest.raises(ProviderUnavailable) as second:
        await airtel.provider.query_status(started.reference)
    assert first.value.retryable
    assert second.value.retryable


async def test_unknown_transaction_is_contradicted(airtel: Airtel) -> None:
    """A transaction id Airtel never saw (ESB000045) is ForgedCallback."""
    with pytest.raises(ForgedCallback):
        await airtel.provider.query_status(ProviderReference("never-sent"))


@pytest.mark.parametrize("amount", [Money(5000, "KES"), Money(5050, "KES")])
async def test_other_currencies_are_declined_before_sending(airtel: Airtel, amount: Money) -> None:
    """A currency other than the wallet's is declined without calling Airtel."""
    with pytest.raises(PaymentDeclined):
        await airtel.provider.request_collection(_request(amount=amount))
    assert airtel.sim.payments == {}


async def test_short_lived_token_is_refreshed(airtel: Airtel, clock: FakeClock) -> None:
    """Airtel's 180 s token is reused within its life and refreshed near its end or on 401."""
    started = await airtel.provider.request_collection(_request())
    await airtel.provider.query_status(started.reference)
    assert airtel.sim.token_grants == 1
    clock.advance(100)
    await airtel.provider.query_status(started.reference)
    assert airtel.sim.token_grants == 1
    clock.advance(25)  # within a minute of the end of its 180 s
    await airtel.provider.query_status(started.reference)
    assert airtel.sim.token_grants == 2
    airtel.sim.expire_tokens()
    await airtel.provider.query_status(started.reference)
    assert airtel.sim.token_grants == 3


async def test_wrong_client_secret_is_a_final_refusal(
    airtel: Airtel, session: aiohttp.ClientSession
) -> None:
    """OAuth refusing our credentials is not retryable."""
    provider = AirtelProvider(
        session, base_url=airtel.base_url, client_id=airtel.sim.client_id, client_secret="no"
    )
    with pytest.raises(PaymentDeclined) as caught:
        await provider.request_collection(_request())
    assert not caught.value.retryable


async def test_status_refused_for_our_wallet_headers_is_not_retryable(
    airtel: Airtel, session: aiohttp.ClientSession
) -> None:
    """A status query refused with a 4xx (wrong X-Country) is a configuration fault."""
    started = await airtel.provider.request_collection(_request())
    misconfigured = AirtelProvider(
        session,
        base_url=airtel.base_url,
        client_id=airtel.sim.client_id,
        client_secret=airtel.sim.client_secret,
        country="KE",
    )
    with pytest.raises(ProviderUnavailable) as caught:
        await misconfigured.query_status(started.reference)
    assert not caught.value.retryable
