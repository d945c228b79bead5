"""The purchase saga end to end on a real ledger file and the real local token engine."""

from __future__ import annotations

import asyncio

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from gateway.ledger import (
    MessageKind,
    MeterStatus,
    OutboxState,
    Purchase,
    PurchaseState,
)
from gateway.money import Money
from gateway.payments import (
    CustomerPaymentRefusal,
    PaymentEvents,
    PaymentNotice,
    PaymentState,
    ProviderReference,
)
from gateway.phone import Msisdn
from gateway.sts import CreditAdded, MeterEmulator, Verdict
from gateway.tariff import AmountBelowMinimum
from gateway.vending import (
    MeterBlocked,
    NothingToReprint,
    NotPaid,
    UnknownMeter,
    VendFailed,
    token_message,
)
from tests.vending.vending_support import (
    PHONE,
    VENDING_KEY,
    World,
    make_drn,
    meter_record,
    profile_of,
)

AMOUNT = Money(11600, "KES")  # KES 116 at KES 25/kWh + 16 % VAT: 4.0 kWh, 40 units


async def started(world: World, key: str = "k1", meter: str | None = None) -> Purchase:
    """A purchase whose collection was requested."""
    purchase = await world.vending.start_purchase(
        channel="ussd",
        phone=PHONE,
        meter=meter or world.drns[0],
        amount=AMOUNT,
        idempotency_key=key,
    )
    return await world.vending.request_payment(purchase.purchase_id)


def reference(purchase: Purchase) -> str:
    """The fake provider's reference for the purchase."""
    assert purchase.provider_reference is not None
    return purchase.provider_reference


def emulator(world: World, drn: str) -> MeterEmulator:
    """A meter emulator keyed like meter ``drn``."""
    return MeterEmulator.for_profile(profile_of(meter_record(drn)), VENDING_KEY)


async def test_quote_prices_the_amount_under_the_meters_tariff(world: World) -> None:
    """KES 116 buys 40 units (4.0 kWh) at KES 25/kWh plus 16 % VAT."""
    assert (await world.vending.quote(world.drns[0], AMOUNT)).units == 40


async def test_quote_refuses_unknown_blocked_and_too_small(world: World) -> None:
    """Unknown and blocked meters and amounts below the minimum are refused with reasons."""
    with pytest.raises(UnknownMeter):
        await world.vending.quote(make_drn(999), AMOUNT)
    await world.ledger.put_meter(meter_record(world.drns[1], status=MeterStatus.BLOCKED))
    with pytest.raises(MeterBlocked):
        await world.vending.quote(world.drns[1], AMOUNT)
    with pytest.raises(AmountBelowMinimum):
        await world.vending.quote(world.drns[0], Money(500, "KES"))


async def test_paid_purchase_vends_a_token_the_meter_accepts(world: World) -> None:
    """Request, callback, status check: one token the meter accepts for 40 units, one SMS."""
    purchase = await started(world)
    assert purchase.state is PurchaseState.AWAITING_PAYMENT
    (request,) = world.provider.requests
    assert (request.amount, request.payer, request.account_reference) == (
        AMOUNT,
        PHONE,
        world.drns[0],
    )
    world.provider.settle(reference(purchase), amount=AMOUNT, receipt="RKTQDM7W6S")
    await world.vending.on_payment_notice(world.provider.notice(reference(purchase)))

    after = await world.ledger.get_purchase(purchase.purchase_id)
    vend = await world.ledger.get_vend(purchase.purchase_id)
    assert after.state is PurchaseState.VENDED
    assert vend is not None
    response = emulator(world, world.drns[0]).enter(vend.token)
    assert response.verdict is Verdict.ACCEPTED
    assert isinstance(response.change, CreditAdded)
    assert response.change.amount == 40
    (message,) = await world.ledger.outbox_for(purchase.purchase_id)
    assert message.recipient == PHONE
    assert "-".join(vend.token[i : i + 4] for i in range(0, 20, 4)) in message.body
    assert "RKTQDM7W6S" in message.body
    assert len(message.body) <= 160
    kinds = [e.kind for e in await world.ledger.timeline(purchase.purchase_id)]
    assert kinds == [
        "purchase_created",
        "collection_attempted",
        "payment_requested",
        "payment_notice",
        "payment_confirmed",
        "token_vended",
    ]


async def test_a_callback_alone_vends_nothing(world: World) -> None:
    """A success claim the provider's status does not back (still pending) vends nothing."""
    purchase = await started(world)
    await world.vending.on_payment_notice(world.provider.notice(reference(purchase)))
    assert (await world.ledger.get_purchase(purchase.purchase_id)).state is (
        PurchaseState.AWAITING_PAYMENT
    )
    assert await world.ledger.get_vend(purchase.purchase_id) is None


async def test_wrong_amount_never_vends_and_is_a_security_event(world: World) -> None:
    """A proven payment of KES 115 for a KES 116 purchase goes to refund, with no token."""
    purchase = await started(world)
    world.provider.settle(reference(purchase), amount=Money(11500, "KES"))
    await world.vending.on_payment_notice(world.provider.notice(reference(purchase)))
    after = await world.ledger.get_purchase(purchase.purchase_id)
    assert after.state is PurchaseState.REFUND_PENDING
    assert await world.ledger.get_vend(purchase.purchase_id) is None
    assert await world.ledger.events(kind="amount_mismatch")


async def test_wrong_currency_or_payer_never_vends(world: World) -> None:
    """The right number in another currency, or another payer, is a mismatch too."""
    first = await started(world, "a")
    second = await started(world, "b")
    world.provider.settle(reference(first), amount=Money(11600, "UGX"))
    world.provider.settle(reference(second), amount=AMOUNT, payer=Msisdn("+254799999999"))
    for purchase in (first, second):
        await world.vending.confirm(purchase.purchase_id)
        assert (await world.ledger.get_purchase(purchase.purchase_id)).state is (
            PurchaseState.REFUND_PENDING
        )
        assert await world.ledger.get_vend(purchase.purchase_id) is None


async def test_duplicated_notices_vend_once(world: World) -> None:
    """Ten copies of the callback, concurrently, give one vend and one message."""
    purchase = await started(world)
    world.provider.settle(reference(purchase), amount=AMOUNT)
    notice = world.provider.notice(reference(purchase))
    await asyncio.gather(*(world.vending.on_payment_notice(notice) for _ in range(10)))
    assert len(await world.ledger.outbox_for(purchase.purchase_id)) == 1
    confirmations = [
        e for e in await world.ledger.timeline(purchase.purchase_id) if e.kind == "token_vended"
    ]
    assert len(confirmations) == 1


async def test_replayed_vend_returns_the_stored_token(world: World) -> None:
    """Calling vend again returns the same token and queues no second message."""
    purchase = await started(world)
    world.provider.settle(reference(purchase), amount=AMOUNT)
    await world.vending.confirm(purchase.purchase_id)
    first = await world.ledger.get_vend(purchase.purchase_id)
    again = await world.vending.vend(purchase.purchase_id)
    assert first is not None
    assert again.token == first.token
    assert len(await world.ledger.outbox_for(purchase.purchase_id)) == 1


async def test_unpaid_purchase_cannot_be_vended(world: World) -> None:
    """Vend on a purchase awaiting payment raises NotPaid and stores nothing."""
    purchase = await started(world)
    with pytest.raises(NotPaid):
        await world.vending.vend(purchase.purchase_id)
    assert await world.ledger.get_vend(purchase.purchase_id) is None


async def test_late_success_after_expiry_still_vends(world: World) -> None:
    """A purchase expired by the sweeper still vends when the payment is later proven."""
    purchase = await started(world)
    world.clock.advance(601)
    expired = await world.vending.check_payment(purchase.purchase_id)
    assert expired.state is PurchaseState.EXPIRED
    world.provider.settle(reference(purchase), amount=AMOUNT)
    await world.vending.on_payment_notice(world.provider.notice(reference(purchase)))
    assert (await world.ledger.get_purchase(purchase.purchase_id)).state is PurchaseState.VENDED


async def test_failed_payment_is_kept_as_a_state(world: World) -> None:
    """A declined payment leaves the purchase PAYMENT_FAILED with its event, not deleted."""
    purchase = await started(world)
    world.provider.settle(reference(purchase), PaymentState.FAILED)
    await world.vending.on_payment_notice(
        world.provider.notice(reference(purchase), PaymentState.FAILED)
    )
    after = await world.ledger.get_purchase(purchase.purchase_id)
    assert after.state is PurchaseState.PAYMENT_FAILED
    assert "payment_failed" in [e.kind for e in await world.ledger.timeline(after.purchase_id)]


async def test_refused_collection_request_fails_the_purchase(world: World) -> None:
    """A final refusal of the collection request makes the purchase PAYMENT_FAILED."""
    world.provider.decline_requests = True
    purchase = await started(world)
    assert purchase.state is PurchaseState.PAYMENT_FAILED


async def test_provider_outage_leaves_the_request_for_the_sweeper(world: World) -> None:
    """A retryable failure keeps the purchase CREATED; the sweeper's check requests it again."""
    world.provider.unavailable_requests = 1
    purchase = await started(world)
    assert purchase.state is PurchaseState.CREATED
    assert purchase.next_check_at is not None
    world.clock.advance(3600 * 0 + 60)
    (due,) = await world.ledger.due_for_check(world.clock())
    retried = await world.vending.check_payment(due.purchase_id)
    assert retried.state is PurchaseState.AWAITING_PAYMENT
    assert len(world.provider.requests) == 1


async def test_status_outage_during_check_reschedules(world: World) -> None:
    """An unavailable status query during a check schedules the next one later."""
    purchase = await started(world)
    world.provider.unavailable_queries = 1
    world.clock.advance(30)
    checked = await world.vending.check_payment(purchase.purchase_id)
    assert checked.state is PurchaseState.AWAITING_PAYMENT
    assert checked.next_check_at is not None
    assert checked.next_check_at > world.clock()


async def test_unknown_key_fails_the_vend_for_an_operator(world: World) -> None:
    """A meter whose key the engine lacks: VEND_FAILED, VendFailed raised, no token."""
    await world.ledger.put_meter(meter_record(world.drns[2], krn=2))
    purchase = await started(world, meter=world.drns[2])
    world.provider.settle(reference(purchase), amount=AMOUNT)
    await world.vending.on_payment_notice(world.provider.notice(reference(purchase)))
    assert (await world.ledger.get_purchase(purchase.purchase_id)).state is (
        PurchaseState.VEND_FAILED
    )
    with pytest.raises(VendFailed):
        await world.vending.vend(purchase.purchase_id)
    assert await world.ledger.get_vend(purchase.purchase_id) is None


async def test_two_purchases_in_one_minute_get_increasing_tids(world: World) -> None:
    """Two purchases for one meter in the same minute get consecutive TIDs, both accepted."""
    first = await started(world, "a")
    second = await started(world, "b")
    for purchase in (first, second):
        world.provider.settle(reference(purchase), amount=AMOUNT)
    await asyncio.gather(
        world.vending.confirm(first.purchase_id), world.vending.confirm(second.purchase_id)
    )
    vends = [await world.ledger.get_vend(p.purchase_id) for p in (first, second)]
    tids = sorted(v.tid for v in vends if v is not None)
    assert tids[1] == tids[0] + 1
    meter = emulator(world, world.drns[0])
    for vend in sorted((v for v in vends if v is not None), key=lambda v: v.tid):
        assert meter.enter(vend.token).verdict is Verdict.ACCEPTED


async def test_reprint_resends_the_same_token(world: World) -> None:
    """A reprint queues the same token again; before a vend there is nothing to reprint."""
    purchase = await started(world)
    with pytest.raises(NothingToReprint):
        await world.vending.reprint(purchase.purchase_id)
    world.provider.settle(reference(purchase), amount=AMOUNT)
    await world.vending.confirm(purchase.purchase_id)
    vend = await world.ledger.get_vend(purchase.purchase_id)
    message = await world.vending.reprint(purchase.purchase_id)
    assert vend is not None
    assert message.kind is MessageKind.REPRINT
    assert message.state is OutboxState.PENDING
    token_in = [m.body for m in await world.ledger.outbox_for(purchase.purchase_id)]
    assert token_in[0] == token_in[1]
    assert await world.ledger.get_vend(purchase.purchase_id) == vend


async def test_last_token_is_the_newest_for_the_phone(world: World) -> None:
    """last_token returns the newest vend for the phone, None for a phone without any."""
    purchase = await started(world)
    world.provider.settle(reference(purchase), amount=AMOUNT)
    await world.vending.confirm(purchase.purchase_id)
    last = await world.vending.last_token(PHONE)
    assert last is not None
    assert last.purchase_id == purchase.purchase_id
    assert await world.vending.last_token(Msisdn("+254700000001")) is None


async def test_customer_initiated_payment_opens_and_vends(world: World) -> None:
    """A paybill payment naming a meter opens a purchase and vends it once proven."""
    ref = "RKTQDM7W6S"
    world.provider.settle(ref, amount=AMOUNT, receipt=ref)
    notice = PaymentNotice(
        provider="fakepay",
        reference=ProviderReference(ref),
        claimed_state=PaymentState.SUCCEEDED,
        amount=AMOUNT,
        payer=PHONE,
        account_reference=world.drns[1],
        is_customer_initiated=True,
        raw=b'{"TransID":"RKTQDM7W6S"}',
    )
    await world.vending.on_payment_notice(notice)
    await world.vending.on_payment_notice(notice)
    (purchase,) = await world.ledger.find_purchases(meter=world.drns[1])
    assert purchase.state is PurchaseState.VENDED
    assert purchase.channel == "c2b"
    assert len(await world.ledger.outbox_for(purchase.purchase_id)) == 1


async def test_customer_payment_validation(world: World) -> None:
    """Validation accepts a sellable meter and amount, else answers a provider-mappable refusal."""
    check = world.vending.validate_customer_payment
    await world.ledger.put_meter(meter_record(world.drns[2], status=MeterStatus.BLOCKED))
    assert await check("fakepay", world.drns[0], AMOUNT, None) is None
    assert await check("fakepay", "123", AMOUNT, None) is CustomerPaymentRefusal.UNKNOWN_ACCOUNT
    assert await check("fakepay", " ", AMOUNT, None) is CustomerPaymentRefusal.UNKNOWN_ACCOUNT
    small = await check("fakepay", world.drns[0], Money(100, "KES"), None)
    assert small is CustomerPaymentRefusal.AMOUNT_OUT_OF_RANGE
    dollars = await check("fakepay", world.drns[0], Money(11600, "USD"), None)
    assert dollars is CustomerPaymentRefusal.AMOUNT_OUT_OF_RANGE
    assert await check("fakepay", world.drns[2], AMOUNT, None) is CustomerPaymentRefusal.OTHER


async def test_unknown_reference_is_recorded_not_raised(world: World) -> None:
    """A notice for a reference nobody requested is a security event and raises nothing."""
    await world.vending.on_payment_notice(world.provider.notice("NOBODY"))
    assert await world.ledger.events(kind="unknown_payment_reference")


async def test_logs_carry_the_masked_token_only(world: World) -> None:
    """token_vended is logged with the purchase id and the last four digits, never the token."""
    purchase = await started(world)
    world.provider.settle(reference(purchase), amount=AMOUNT)
    with structlog.testing.capture_logs() as logs:
        await world.vending.confirm(purchase.purchase_id)
    vend = await world.ledger.get_vend(purchase.purchase_id)
    assert vend is not None
    (vended,) = [entry for entry in logs if entry["event"] == "token_vended"]
    assert vended["token"].endswith(vend.token[-4:])
    assert vend.token not in repr(logs)
    assert vend.token not in repr(vend)


@given(
    token=st.text(alphabet="0123456789", min_size=20, max_size=20),
    units=st.integers(min_value=1, max_value=65535),
    amount=st.integers(min_value=1, max_value=10**9),
    receipt=st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ0123456789", min_size=1, max_size=20),
    language=st.sampled_from(["en", "sw", "fr", "xx"]),
)
def test_token_message_fits_in_two_segments(
    token: str, units: int, amount: int, receipt: str, language: str
) -> None:
    """The token SMS carries the grouped token and never exceeds two GSM-7 segments."""
    text = token_message(
        token=token,
        units=units,
        amount=Money(amount, "KES"),
        meter="0123456789012",
        receipt=receipt,
        language=language,
    )
    assert "-".join(token[i : i + 4] for i in range(0, 20, 4)) in text
    assert len(text) <= 306


@pytest.mark.parametrize("language", ["en", "sw", "fr"])
def test_typical_token_message_fits_one_segment(language: str) -> None:
    """A typical token SMS (KES 2,000, 13-digit meter, 10-character receipt) is one segment."""
    text = token_message(
        token="12345678901234567890",
        units=645,
        amount=Money(200_000, "KES"),
        meter="0123456789012",
        receipt="RKTQDM7W6S",
        language=language,
    )
    assert len(text) <= 160
    assert "64.5" in text


def test_vending_satisfies_the_payment_events_port(world: World) -> None:
    """The saga is what the callback routes are typed against (checked by mypy, too)."""
    events: PaymentEvents = world.vending
    assert callable(events.on_payment_notice)
    assert callable(events.validate_customer_payment)
