"""The ``Ledger`` contract for key rotations, metrics reads, early delivery reports and receipts.

Run against every backend through the ``ledger`` fixture (``conftest.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta

import pytest

from gateway.ledger import (
    ConfirmedPayment,
    KeyChangeState,
    KeyRotation,
    Ledger,
    MessageKind,
    MeterNumber,
    NoticeRecord,
    OutboxState,
    Purchase,
    PurchaseDraft,
    PurchaseState,
    TidConflict,
    VendDraft,
    new_purchase_id,
)
from gateway.money import Money
from gateway.phone import Msisdn
from gateway.sms import DeliveryReport, DeliveryState
from tests.ledger.ledger_support import FakeClock, meter_record

PHONE = Msisdn("+254712345678")
METER = MeterNumber("01234567890")
OTHER = MeterNumber("01234567891")
TOKEN = "12345678901234567890"
KCT = ("11112222333344445555", "66667777888899990000")
ROTATION = KeyRotation(sgc="123457", from_krn=1, to_krn=2, to_base_date=2014)


async def paid_purchase(ledger: Ledger, key: str, meter: str = METER) -> Purchase:
    """A purchase for ``meter``, opened, attached and paid."""
    purchase = await ledger.open_purchase(
        PurchaseDraft(
            purchase_id=new_purchase_id(),
            channel="ussd",
            phone=PHONE,
            meter=MeterNumber(meter),
            amount=Money(5000, "KES"),
            units=172,
            tariff_id="domestic",
            idempotency_key=key,
            provider="fakepay",
        ),
        actor="test",
    )
    await ledger.attach_payment(
        purchase.purchase_id, provider="fakepay", reference="REF-" + key, actor="test"
    )
    return await ledger.mark_paid(
        purchase.purchase_id,
        ConfirmedPayment(
            provider="fakepay",
            reference="REF-" + key,
            amount=Money(5000, "KES"),
            payer=PHONE,
            receipt=None,
        ),
        actor="test",
    )


def vend_draft(
    purchase: Purchase,
    *,
    tid: int,
    expected: int | None,
    change_id: int | None = None,
    kcts: tuple[str, ...] = (),
) -> VendDraft:
    """A vend of ``TOKEN`` with ``tid``, delivering the key change ``change_id`` if given."""
    return VendDraft(
        purchase_id=purchase.purchase_id,
        meter=purchase.meter,
        tid=tid,
        expected_last_tid=expected,
        token=TOKEN,
        units=purchase.units,
        receipt="R",
        recipient=purchase.phone,
        message="text",
        key_change_id=change_id,
        key_change_tokens=kcts,
    )


async def test_rotation_plans_one_pending_change_per_meter_on_the_old_key(ledger: Ledger) -> None:
    """Meters on (SGC, old KRN) get a pending change; a meter on another key is left alone."""
    await ledger.put_meter(meter_record("01234567892", krn=3))
    planned = await ledger.plan_key_rotation(ROTATION, actor="operator")
    assert [c.meter for c in planned] == [METER, OTHER]
    change = planned[0]
    assert (change.from_krn, change.krn, change.state) == (1, 2, KeyChangeState.PENDING)
    assert (change.sgc, change.tariff_index, change.base_date) == ("123457", "01", 2014)
    assert not change.rollover
    assert await ledger.key_changes(MeterNumber("01234567892")) == []
    assert [m.drn for m in await ledger.meters_on_key("123457", 1, meters=[OTHER])] == [OTHER]
    assert [e.data["meters"] for e in await ledger.events(kind="key_rotation_planned")] == [2]


async def test_a_later_rotation_supersedes_the_pending_change(ledger: Ledger) -> None:
    """Planning again for a meter leaves exactly one pending change: the newest."""
    await ledger.plan_key_rotation(ROTATION, meters=[METER], actor="operator")
    newer = KeyRotation(sgc="123457", from_krn=1, to_krn=3, to_base_date=2014)
    await ledger.plan_key_rotation(newer, meters=[METER], actor="operator")
    changes = await ledger.key_changes(METER)
    assert [(c.krn, c.state) for c in changes] == [
        (2, KeyChangeState.SUPERSEDED),
        (3, KeyChangeState.PENDING),
    ]
    assert await ledger.key_changes(OTHER) == []


async def test_vend_context_carries_the_pending_change(ledger: Ledger) -> None:
    """The next vend's context names the meter's pending change; other meters have none."""
    (change,) = await ledger.plan_key_rotation(ROTATION, meters=[METER], actor="operator")
    purchase = await paid_purchase(ledger, "a")
    other = await paid_purchase(ledger, "b", meter=OTHER)
    assert (await ledger.vend_context(purchase.purchase_id)).key_change == change
    assert (await ledger.vend_context(other.purchase_id)).key_change is None


async def test_vend_with_a_key_change_applies_it_in_the_same_transaction(ledger: Ledger) -> None:
    """The meter takes the new key, the change is applied, the vend keeps its KCTs; replayed too."""
    await ledger.put_meter(meter_record(METER, krn=1, base_date=1993))
    first = await paid_purchase(ledger, "a")
    await ledger.record_vend(vend_draft(first, tid=16_000_000, expected=None), actor="saga")
    (change,) = await ledger.plan_key_rotation(ROTATION, meters=[METER], actor="operator")
    assert change.rollover
    second = await paid_purchase(ledger, "b")
    draft = vend_draft(
        second, tid=6_000_000, expected=16_000_000, change_id=change.change_id, kcts=KCT
    )
    outcome = await ledger.record_vend(draft, actor="saga")
    meter = await ledger.get_meter(METER)
    assert (meter.krn, meter.base_date, meter.last_tid) == (2, 2014, 6_000_000)
    (applied,) = await ledger.key_changes(METER)
    assert applied.state is KeyChangeState.APPLIED
    assert applied.purchase_id == second.purchase_id
    assert outcome.vend.key_change_tokens == KCT
    replay = await ledger.record_vend(draft, actor="saga")
    assert replay.replayed
    assert replay.vend.key_change_tokens == KCT
    stored = (await ledger.vend_context(second.purchase_id)).vend
    assert stored is not None
    assert stored.key_change_tokens == KCT
    assert "key_changed" in [e.kind for e in await ledger.timeline(second.purchase_id)]


async def test_a_key_change_no_longer_pending_is_refused(ledger: Ledger) -> None:
    """A vend delivering a superseded change raises TidConflict and writes nothing."""
    (old,) = await ledger.plan_key_rotation(ROTATION, meters=[METER], actor="operator")
    await ledger.plan_key_rotation(ROTATION, meters=[METER], actor="operator")
    purchase = await paid_purchase(ledger, "a")
    with pytest.raises(TidConflict):
        await ledger.record_vend(
            vend_draft(purchase, tid=5, expected=None, change_id=old.change_id, kcts=KCT),
            actor="saga",
        )
    assert await ledger.get_vend(purchase.purchase_id) is None
    assert (await ledger.get_meter(METER)).krn == 1


async def test_without_rollover_the_tid_must_still_increase(ledger: Ledger) -> None:
    """A same-base-date key change keeps TIDs increasing: a lower TID is refused."""
    first = await paid_purchase(ledger, "a")
    await ledger.record_vend(vend_draft(first, tid=100, expected=None), actor="saga")
    (change,) = await ledger.plan_key_rotation(ROTATION, meters=[METER], actor="operator")
    second = await paid_purchase(ledger, "b")
    with pytest.raises(TidConflict):
        await ledger.record_vend(
            vend_draft(second, tid=50, expected=100, change_id=change.change_id, kcts=KCT),
            actor="saga",
        )
    assert (await ledger.get_meter(METER)).krn == 1


async def test_planning_queues_the_meters_failed_vends_again(ledger: Ledger) -> None:
    """A VEND_FAILED purchase of a planned meter goes back to PAID for the sweeper; others stay."""
    failed = await paid_purchase(ledger, "a")
    elsewhere = await paid_purchase(ledger, "b", meter=OTHER)
    for purchase in (failed, elsewhere):
        await ledger.transition(
            purchase.purchase_id, PurchaseState.VEND_FAILED, kind="vend_failed", actor="saga"
        )
    await ledger.plan_key_rotation(ROTATION, meters=[METER], actor="operator")
    assert (await ledger.get_purchase(failed.purchase_id)).state is PurchaseState.PAID
    assert (await ledger.get_purchase(elsewhere.purchase_id)).state is PurchaseState.VEND_FAILED
    assert [p.purchase_id for p in await ledger.paid_not_vended()] == [failed.purchase_id]
    assert "vend_retry_queued" in [e.kind for e in await ledger.timeline(failed.purchase_id)]


async def test_purchase_counts_name_every_state(ledger: Ledger) -> None:
    """Counts by state include zeros, and follow the purchases' moves."""
    before = await ledger.purchase_counts()
    assert set(before) == {state.value for state in PurchaseState}
    assert sum(before.values()) == 0
    purchase = await paid_purchase(ledger, "a")
    await paid_purchase(ledger, "b")
    await ledger.record_vend(vend_draft(purchase, tid=1, expected=None), actor="saga")
    counts = await ledger.purchase_counts()
    assert (counts["paid"], counts["vended"], counts["created"]) == (1, 1, 0)


async def test_outbox_stats_count_the_unsent_and_their_age(
    ledger: Ledger, clock: FakeClock
) -> None:
    """Backlog and oldest age cover pending messages; sent ones leave it; held ones are apart."""
    assert (await ledger.outbox_stats(clock())).backlog == 0
    purchase = await paid_purchase(ledger, "a")
    await ledger.record_vend(vend_draft(purchase, tid=1, expected=None), actor="saga")
    await ledger.enqueue_message(None, kind=MessageKind.REPLY, recipient=None, body="x", actor="t")
    clock.advance(90)
    stats = await ledger.outbox_stats(clock())
    assert (stats.backlog, stats.held) == (1, 1)
    assert stats.oldest_age_s == pytest.approx(90)
    (message,) = await ledger.claim_outbox(clock(), lease_until=clock() + timedelta(seconds=30))
    assert (await ledger.outbox_stats(clock())).backlog == 1  # being sent is not sent yet
    await ledger.outbox_sent(
        message.message_id, provider_message_id="ATX1", cost=None, state=DeliveryState.SENT
    )
    after = await ledger.outbox_stats(clock())
    assert (after.backlog, after.oldest_age_s) == (0, 0.0)


async def test_a_report_before_the_message_id_is_applied_when_it_is_recorded(
    ledger: Ledger, clock: FakeClock
) -> None:
    """A delivery report for an id not recorded yet is kept and delivers the purchase later."""
    purchase = await paid_purchase(ledger, "a")
    await ledger.record_vend(vend_draft(purchase, tid=1, expected=None), actor="saga")
    (message,) = await ledger.claim_outbox(clock(), lease_until=clock() + timedelta(seconds=30))
    early = DeliveryReport(provider_message_id="ATX9", state=DeliveryState.DELIVERED)
    assert await ledger.apply_delivery_report(early) is None
    late_sent = DeliveryReport(provider_message_id="ATX9", state=DeliveryState.SENT)
    assert await ledger.apply_delivery_report(late_sent) is None  # never replaces a final one
    await ledger.outbox_sent(
        message.message_id, provider_message_id="ATX9", cost=None, state=DeliveryState.SENT
    )
    (stored,) = await ledger.outbox_for(purchase.purchase_id)
    assert stored.state is OutboxState.DELIVERED
    assert (await ledger.get_purchase(purchase.purchase_id)).state is PurchaseState.DELIVERED


async def test_an_early_report_expires(ledger: Ledger, clock: FakeClock) -> None:
    """A report kept longer than its expiry is forgotten: the message stays SENT."""
    purchase = await paid_purchase(ledger, "a")
    await ledger.record_vend(vend_draft(purchase, tid=1, expected=None), actor="saga")
    (message,) = await ledger.claim_outbox(clock(), lease_until=clock() + timedelta(seconds=30))
    report = DeliveryReport(provider_message_id="ATX7", state=DeliveryState.DELIVERED)
    await ledger.apply_delivery_report(report)
    clock.advance(2 * 3600)
    other = DeliveryReport(provider_message_id="ATX8", state=DeliveryState.SENT)
    await ledger.apply_delivery_report(other)  # sweeps the expired one
    await ledger.outbox_sent(
        message.message_id, provider_message_id="ATX7", cost=None, state=DeliveryState.SENT
    )
    (stored,) = await ledger.outbox_for(purchase.purchase_id)
    assert stored.state is OutboxState.SENT


async def test_a_notice_receipt_is_not_kept_when_the_proving_answer_has_none(
    ledger: Ledger,
) -> None:
    """Only the provider's records supply a receipt (issue 17 point 6): a callback's claim is not.

    (Before issue 17 the callback's receipt stayed on the payment when the proving status answer
    had none, so a forged callback could put its receipt on a real token SMS.)
    """
    purchase = await ledger.open_purchase(
        PurchaseDraft(
            purchase_id=new_purchase_id(),
            channel="ussd",
            phone=PHONE,
            meter=METER,
            amount=Money(5000, "KES"),
            units=172,
            tariff_id="domestic",
            idempotency_key="k",
            provider="fakepay",
        ),
        actor="test",
    )
    await ledger.attach_payment(purchase.purchase_id, provider="fakepay", reference="R", actor="t")
    raw = b'{"receipt": "QKX1ABC"}'
    await ledger.record_notice(
        NoticeRecord(
            provider="fakepay",
            reference="R",
            claimed_state="succeeded",
            amount=Money(5000, "KES"),
            payer=PHONE,
            receipt="QKX1ABC",
            raw=raw,
            payload_hash=hashlib.sha256(raw).hexdigest(),
        ),
        actor="callback",
    )
    proven = ConfirmedPayment(
        provider="fakepay", reference="R", amount=Money(5000, "KES"), payer=PHONE, receipt=None
    )
    await ledger.mark_paid(purchase.purchase_id, proven, actor="saga")
    stored = await ledger.get_payment("fakepay", "R")
    assert stored is not None
    assert stored.receipt is None


async def test_a_proven_payment_leaves_a_failed_vend_as_it_is(ledger: Ledger) -> None:
    """mark_paid on a VEND_FAILED purchase changes nothing: it was paid before it failed."""
    purchase = await paid_purchase(ledger, "a")
    await ledger.transition(
        purchase.purchase_id, PurchaseState.VEND_FAILED, kind="vend_failed", actor="saga"
    )
    before = await ledger.timeline(purchase.purchase_id)
    again = await ledger.mark_paid(
        purchase.purchase_id,
        ConfirmedPayment(
            provider="fakepay",
            reference="REF-a",
            amount=Money(5000, "KES"),
            payer=PHONE,
            receipt=None,
        ),
        actor="saga",
    )
    assert again.state is PurchaseState.VEND_FAILED
    assert await ledger.timeline(purchase.purchase_id) == before


async def test_a_report_racing_the_record_of_its_id_is_never_lost(
    ledger: Ledger, clock: FakeClock
) -> None:
    """Reports arriving while their message ids are being recorded all end DELIVERED."""
    purchases = [await paid_purchase(ledger, f"r{i}") for i in range(12)]
    for tid, purchase in enumerate(purchases, start=1):
        await ledger.record_vend(vend_draft(purchase, tid=tid, expected=tid - 1 or None), actor="s")
    claimed = await ledger.claim_outbox(
        clock(), lease_until=clock() + timedelta(seconds=30), limit=100
    )
    assert len(claimed) == len(purchases)

    async def race(message_id: int, provider_id: str) -> None:
        report = DeliveryReport(provider_message_id=provider_id, state=DeliveryState.DELIVERED)
        await asyncio.gather(
            ledger.apply_delivery_report(report),
            ledger.outbox_sent(
                message_id, provider_message_id=provider_id, cost=None, state=DeliveryState.SENT
            ),
        )

    await asyncio.gather(*(race(m.message_id, f"ATX-{m.message_id}") for m in claimed))
    states = {(await ledger.get_purchase(p.purchase_id)).state for p in purchases}
    assert states == {PurchaseState.DELIVERED}
