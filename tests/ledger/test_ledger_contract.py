"""The ``Ledger`` contract, written once and run against every backend (the ``ledger`` fixture)."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta

import pytest

from gateway.ledger import (
    MAX_SAVED_METERS,
    ConfirmedPayment,
    DuplicateError,
    IdempotencyConflict,
    IllegalTransition,
    Ledger,
    MessageKind,
    MeterNumber,
    NotFound,
    NoticeRecord,
    OutboxState,
    Purchase,
    PurchaseDraft,
    PurchaseId,
    PurchaseState,
    SavedMetersFull,
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
TOKEN = "12345678901234567890"


def draft(
    key: str = "k1", *, amount: int = 5000, meter: str = METER, phone: str = PHONE
) -> PurchaseDraft:
    """A purchase draft for the domestic tariff."""
    return PurchaseDraft(
        purchase_id=new_purchase_id(),
        channel="ussd",
        phone=Msisdn(phone),
        meter=MeterNumber(meter),
        amount=Money(amount, "KES"),
        units=172,
        tariff_id="domestic",
        idempotency_key=key,
        provider="fakepay",
    )


def payment(reference: str = "REF1", amount: int = 5000) -> ConfirmedPayment:
    """A proven payment of ``amount`` minor KES."""
    return ConfirmedPayment(
        provider="fakepay",
        reference=reference,
        amount=Money(amount, "KES"),
        payer=PHONE,
        receipt="RCPT" + reference,
    )


def vend_draft(
    purchase: Purchase, *, tid: int, expected: int | None, token: str = TOKEN
) -> VendDraft:
    """A vend of ``token`` with ``tid`` computed from ``expected``."""
    return VendDraft(
        purchase_id=purchase.purchase_id,
        meter=purchase.meter,
        tid=tid,
        expected_last_tid=expected,
        token=token,
        units=purchase.units,
        receipt="RCPT1",
        recipient=purchase.phone,
        message=f"Token {token}",
    )


async def paid_purchase(ledger: Ledger, key: str = "k1", **kwargs: object) -> Purchase:
    """Open, attach and pay a purchase."""
    purchase = await ledger.open_purchase(draft(key, **kwargs), actor="test")  # type: ignore[arg-type]
    await ledger.attach_payment(
        purchase.purchase_id, provider="fakepay", reference="REF-" + key, actor="test"
    )
    return await ledger.mark_paid(purchase.purchase_id, payment("REF-" + key), actor="test")


async def test_same_idempotency_key_returns_the_same_purchase(ledger: Ledger) -> None:
    """Opening a purchase twice with one idempotency key yields one purchase and one event."""
    first = await ledger.open_purchase(draft("same"), actor="test")
    second = await ledger.open_purchase(draft("same"), actor="test")
    assert second.purchase_id == first.purchase_id
    assert first.state is PurchaseState.CREATED
    assert [e.kind for e in await ledger.timeline(first.purchase_id)] == ["purchase_created"]


async def test_concurrent_opens_with_one_key_make_one_purchase(ledger: Ledger) -> None:
    """Twenty concurrent opens with one key all get the same purchase id."""
    opened = await asyncio.gather(
        *(ledger.open_purchase(draft("race"), actor="t") for _ in range(20))
    )
    assert len({p.purchase_id for p in opened}) == 1
    assert len(await ledger.find_purchases(phone=PHONE)) == 1


async def test_reused_key_with_other_details_is_refused(ledger: Ledger) -> None:
    """An idempotency key reused for another amount raises IdempotencyConflict."""
    await ledger.open_purchase(draft("k", amount=5000), actor="test")
    with pytest.raises(IdempotencyConflict):
        await ledger.open_purchase(draft("k", amount=6000), actor="test")


async def test_purchase_for_unknown_meter_is_refused(ledger: Ledger) -> None:
    """Opening a purchase for a meter that is not registered raises NotFound."""
    with pytest.raises(NotFound):
        await ledger.open_purchase(draft(meter="99999999999"), actor="test")


async def test_transition_appends_one_event_and_repeats_harmlessly(ledger: Ledger) -> None:
    """A legal transition appends its event once; repeating it changes nothing."""
    purchase = await ledger.open_purchase(draft(), actor="test")
    moved = await ledger.transition(
        purchase.purchase_id, PurchaseState.EXPIRED, kind="purchase_expired", actor="sweeper"
    )
    again = await ledger.transition(
        purchase.purchase_id, PurchaseState.EXPIRED, kind="purchase_expired", actor="sweeper"
    )
    assert moved.state is again.state is PurchaseState.EXPIRED
    kinds = [e.kind for e in await ledger.timeline(purchase.purchase_id)]
    assert kinds == ["purchase_created", "purchase_expired"]


async def test_illegal_transition_raises_and_changes_nothing(ledger: Ledger) -> None:
    """CREATED cannot jump to VENDED: IllegalTransition, state and timeline unchanged."""
    purchase = await ledger.open_purchase(draft(), actor="test")
    with pytest.raises(IllegalTransition) as caught:
        await ledger.transition(purchase.purchase_id, PurchaseState.VENDED, kind="x", actor="t")
    assert caught.value.current is PurchaseState.CREATED
    assert (await ledger.get_purchase(purchase.purchase_id)).state is PurchaseState.CREATED
    assert len(await ledger.timeline(purchase.purchase_id)) == 1


async def test_attach_payment_awaits_payment_and_refuses_a_foreign_reference(
    ledger: Ledger,
) -> None:
    """A provider reference belongs to one purchase: attaching it to another raises."""
    first = await ledger.open_purchase(draft("a"), actor="test")
    second = await ledger.open_purchase(draft("b"), actor="test")
    attached = await ledger.attach_payment(
        first.purchase_id, provider="fakepay", reference="R", actor="t"
    )
    assert attached.state is PurchaseState.AWAITING_PAYMENT
    assert attached.provider_reference == "R"
    with pytest.raises(DuplicateError):
        await ledger.attach_payment(
            second.purchase_id, provider="fakepay", reference="R", actor="t"
        )


async def test_notice_duplicates_and_payload_conflicts_are_told_apart(ledger: Ledger) -> None:
    """The same reference again is a duplicate; with another body it is a payload conflict."""
    purchase = await ledger.open_purchase(draft(), actor="test")
    await ledger.attach_payment(purchase.purchase_id, provider="fakepay", reference="R", actor="t")

    def notice(raw: bytes) -> NoticeRecord:
        return NoticeRecord(
            provider="fakepay",
            reference="R",
            claimed_state="succeeded",
            amount=Money(5000, "KES"),
            payer=PHONE,
            receipt="X",
            raw=raw,
            payload_hash=hashlib.sha256(raw).hexdigest(),
        )

    first = await ledger.record_notice(notice(b"one"), actor="callback")
    again = await ledger.record_notice(notice(b"one"), actor="callback")
    forged = await ledger.record_notice(notice(b"two"), actor="callback")
    assert first.purchase_id == purchase.purchase_id
    assert (first.is_duplicate, first.payload_conflict) == (False, False)
    assert (again.is_duplicate, again.payload_conflict) == (True, False)
    assert forged.payload_conflict
    assert [e.kind for e in await ledger.events(kind="notice_payload_conflict")]


async def test_mark_paid_is_idempotent_and_accepts_a_late_success(ledger: Ledger) -> None:
    """An expired purchase still becomes paid (money is never lost); repeating adds nothing."""
    purchase = await ledger.open_purchase(draft(), actor="test")
    await ledger.transition(purchase.purchase_id, PurchaseState.EXPIRED, kind="expired", actor="t")
    paid = await ledger.mark_paid(purchase.purchase_id, payment(), actor="sweeper")
    again = await ledger.mark_paid(purchase.purchase_id, payment(), actor="sweeper")
    assert paid.state is again.state is PurchaseState.PAID
    stored = await ledger.get_payment("fakepay", "REF1")
    assert stored is not None
    assert (stored.purchase_id, stored.receipt) == (purchase.purchase_id, "RCPTREF1")
    assert await ledger.get_payment("fakepay", "nope") is None
    confirmations = [
        e for e in await ledger.timeline(purchase.purchase_id) if e.kind == "payment_confirmed"
    ]
    assert len(confirmations) == 1
    assert confirmations[0].data["late"] is True


async def test_mismatched_payment_goes_to_refund_and_never_to_paid(ledger: Ledger) -> None:
    """A proven payment of the wrong amount moves the purchase to REFUND_PENDING."""
    purchase = await ledger.open_purchase(draft(), actor="test")
    result = await ledger.mark_payment_mismatch(
        purchase.purchase_id, payment(amount=4900), expected=purchase.amount, actor="saga"
    )
    assert result.state is PurchaseState.REFUND_PENDING
    assert "amount_mismatch" in [e.kind for e in await ledger.timeline(purchase.purchase_id)]
    with pytest.raises(IllegalTransition):
        await ledger.mark_paid(purchase.purchase_id, payment(), actor="saga")


async def test_vend_stores_token_message_and_advances_the_tid(ledger: Ledger) -> None:
    """A vend moves the purchase to VENDED, sets the meter's TID and queues one token SMS."""
    purchase = await paid_purchase(ledger)
    outcome = await ledger.record_vend(vend_draft(purchase, tid=100, expected=None), actor="saga")
    assert not outcome.replayed
    assert outcome.vend.token == TOKEN
    assert (await ledger.get_purchase(purchase.purchase_id)).state is PurchaseState.VENDED
    assert (await ledger.get_meter(METER)).last_tid == 100
    messages = await ledger.outbox_for(purchase.purchase_id)
    assert [(m.kind, m.state) for m in messages] == [(MessageKind.TOKEN, OutboxState.PENDING)]


async def test_replayed_vend_returns_the_stored_token_and_queues_nothing(ledger: Ledger) -> None:
    """A second vend for the same purchase returns the first token; no second message."""
    purchase = await paid_purchase(ledger)
    await ledger.record_vend(vend_draft(purchase, tid=100, expected=None), actor="saga")
    replay = await ledger.record_vend(
        vend_draft(purchase, tid=101, expected=100, token="99999999999999999999"), actor="saga"
    )
    assert replay.replayed
    assert replay.vend.token == TOKEN
    assert replay.vend.tid == 100
    assert len(await ledger.outbox_for(purchase.purchase_id)) == 1
    assert (await ledger.get_meter(METER)).last_tid == 100


async def test_vend_computed_from_a_stale_tid_is_refused(ledger: Ledger) -> None:
    """A vend whose expected last TID is stale, or whose TID does not increase, raises."""
    first = await paid_purchase(ledger, "a")
    second = await paid_purchase(ledger, "b")
    await ledger.record_vend(vend_draft(first, tid=100, expected=None), actor="saga")
    with pytest.raises(TidConflict):
        await ledger.record_vend(vend_draft(second, tid=101, expected=None), actor="saga")
    with pytest.raises(TidConflict):
        await ledger.record_vend(vend_draft(second, tid=100, expected=100), actor="saga")
    assert await ledger.get_vend(second.purchase_id) is None
    assert (await ledger.get_purchase(second.purchase_id)).state is PurchaseState.PAID


async def test_vend_of_an_unpaid_purchase_is_refused(ledger: Ledger) -> None:
    """An unpaid purchase cannot be vended: IllegalTransition and nothing stored."""
    purchase = await ledger.open_purchase(draft(), actor="test")
    with pytest.raises(IllegalTransition):
        await ledger.record_vend(vend_draft(purchase, tid=1, expected=None), actor="saga")
    assert await ledger.get_vend(purchase.purchase_id) is None
    assert await ledger.outbox_for(purchase.purchase_id) == []
    assert (await ledger.get_meter(METER)).last_tid is None


async def test_paid_not_vended_lists_only_paid_purchases_without_vend(ledger: Ledger) -> None:
    """The sweeper's list holds paid purchases until they are vended."""
    first = await paid_purchase(ledger, "a")
    second = await paid_purchase(ledger, "b")
    await ledger.record_vend(vend_draft(first, tid=5, expected=None), actor="saga")
    assert [p.purchase_id for p in await ledger.paid_not_vended()] == [second.purchase_id]


async def test_due_for_check_follows_the_schedule(ledger: Ledger, clock: FakeClock) -> None:
    """A purchase is due for a status check once its scheduled time has come."""
    purchase = await ledger.open_purchase(draft(), actor="test")
    await ledger.schedule_check(
        purchase.purchase_id, at=clock() + timedelta(seconds=30), attempts=1
    )
    assert await ledger.due_for_check(clock()) == []
    clock.advance(31)
    due = await ledger.due_for_check(clock())
    assert [p.purchase_id for p in due] == [purchase.purchase_id]
    assert due[0].check_attempts == 1


async def test_due_checks_are_claimed_once_until_the_lease_lapses(
    ledger: Ledger, clock: FakeClock
) -> None:
    """Claimed checks are nobody else's until their lease lapses or the next check is set."""
    purchases = [await ledger.open_purchase(draft(f"c{i}"), actor="test") for i in range(3)]
    for purchase in purchases:
        await ledger.schedule_check(purchase.purchase_id, at=clock(), attempts=0)
    lease = clock() + timedelta(seconds=60)
    first = await ledger.claim_due_checks(clock(), lease_until=lease, limit=2)
    second = await ledger.claim_due_checks(clock(), lease_until=lease, limit=2)
    third = await ledger.claim_due_checks(clock(), lease_until=lease, limit=2)
    first_ids = {p.purchase_id for p in first}
    second_ids = {p.purchase_id for p in second}
    assert (len(first_ids), len(second_ids), third) == (2, 1, [])
    assert first_ids | second_ids == {p.purchase_id for p in purchases}
    # The check sets the next one: that ends the lease, and the purchase is due again then.
    done = purchases[0].purchase_id
    await ledger.schedule_check(done, at=clock() + timedelta(seconds=30), attempts=1)
    clock.advance(31)
    again = await ledger.claim_due_checks(
        clock(), lease_until=clock() + timedelta(seconds=60), limit=10
    )
    assert [p.purchase_id for p in again] == [done]
    # A claimer that died: its purchases come back once the lease lapses.
    clock.advance(30)
    back = await ledger.claim_due_checks(clock(), lease_until=clock() + timedelta(seconds=60))
    assert {p.purchase_id for p in back} == {p.purchase_id for p in purchases} - {done}


async def test_paid_not_vended_is_claimed_once_until_the_lease_lapses(
    ledger: Ledger, clock: FakeClock
) -> None:
    """Two recoveries never take the same paid purchase while its lease holds."""
    first = await paid_purchase(ledger, "a")
    second = await paid_purchase(ledger, "b")
    lease = clock() + timedelta(seconds=30)
    one = await ledger.claim_paid_not_vended(clock(), lease_until=lease, limit=1)
    other = await ledger.claim_paid_not_vended(clock(), lease_until=lease, limit=5)
    assert [p.purchase_id for p in one + other] == [first.purchase_id, second.purchase_id]
    assert await ledger.claim_paid_not_vended(clock(), lease_until=lease) == []
    await ledger.record_vend(vend_draft(first, tid=5, expected=None), actor="saga")
    clock.advance(31)  # the recovery of ``second`` failed: it comes back; ``first`` is vended
    back = await ledger.claim_paid_not_vended(clock(), lease_until=clock() + timedelta(seconds=30))
    assert [p.purchase_id for p in back] == [second.purchase_id]


async def test_concurrent_check_claims_are_disjoint(ledger: Ledger, clock: FakeClock) -> None:
    """Claimers racing for the same due checks split them: none taken twice, none left."""
    opened = [await ledger.open_purchase(draft(f"r{i}"), actor="test") for i in range(12)]
    for purchase in opened:
        await ledger.schedule_check(purchase.purchase_id, at=clock(), attempts=0)
    lease = clock() + timedelta(seconds=60)
    claims = await asyncio.gather(
        *(ledger.claim_due_checks(clock(), lease_until=lease, limit=3) for _ in range(6))
    )
    claimed = [p.purchase_id for claim in claims for p in claim]
    assert sorted(claimed) == sorted(p.purchase_id for p in opened)


async def test_outbox_claim_is_a_lease(ledger: Ledger, clock: FakeClock) -> None:
    """A claimed message is not claimed again until its lease ends, then it comes back."""
    purchase = await paid_purchase(ledger)
    await ledger.record_vend(vend_draft(purchase, tid=1, expected=None), actor="saga")
    lease = clock() + timedelta(seconds=60)
    claimed = await ledger.claim_outbox(clock(), lease_until=lease)
    assert len(claimed) == 1
    assert claimed[0].attempts == 1
    assert await ledger.claim_outbox(clock(), lease_until=lease) == []
    clock.advance(61)
    again = await ledger.claim_outbox(clock(), lease_until=clock() + timedelta(seconds=60))
    assert [m.message_id for m in again] == [claimed[0].message_id]
    assert again[0].attempts == 2


async def test_delivery_report_delivers_the_purchase_once(ledger: Ledger, clock: FakeClock) -> None:
    """A delivered report makes the purchase DELIVERED; a later failure report changes nothing."""
    purchase = await paid_purchase(ledger)
    await ledger.record_vend(vend_draft(purchase, tid=1, expected=None), actor="saga")
    (message,) = await ledger.claim_outbox(clock(), lease_until=clock() + timedelta(seconds=60))
    await ledger.outbox_sent(
        message.message_id, provider_message_id="ATX1", cost="KES 0.8", state=DeliveryState.SENT
    )
    delivered = await ledger.apply_delivery_report(
        DeliveryReport(provider_message_id="ATX1", state=DeliveryState.DELIVERED)
    )
    late = await ledger.apply_delivery_report(
        DeliveryReport(provider_message_id="ATX1", state=DeliveryState.FAILED)
    )
    assert delivered is not None
    assert delivered.state is OutboxState.DELIVERED
    assert late is not None
    assert late.state is OutboxState.DELIVERED
    assert (await ledger.get_purchase(purchase.purchase_id)).state is PurchaseState.DELIVERED
    unknown = DeliveryReport(provider_message_id="nope", state=DeliveryState.DELIVERED)
    assert await ledger.apply_delivery_report(unknown) is None


async def test_retry_and_failure_of_a_message(ledger: Ledger, clock: FakeClock) -> None:
    """A retried message is due again at its new time; a failed one is never claimed again."""
    purchase = await paid_purchase(ledger)
    await ledger.record_vend(vend_draft(purchase, tid=1, expected=None), actor="saga")
    (message,) = await ledger.claim_outbox(clock(), lease_until=clock() + timedelta(seconds=60))
    await ledger.outbox_retry(
        message.message_id, next_try_at=clock() + timedelta(seconds=5), error="timeout"
    )
    clock.advance(5)
    (again,) = await ledger.claim_outbox(clock(), lease_until=clock() + timedelta(seconds=60))
    assert again.last_error == "timeout"
    await ledger.outbox_failed(again.message_id, error="blacklisted")
    clock.advance(3600)
    assert await ledger.claim_outbox(clock(), lease_until=clock() + timedelta(seconds=60)) == []
    (final,) = await ledger.outbox_for(purchase.purchase_id)
    assert final.state is OutboxState.FAILED


async def test_reprint_message_is_queued_beside_the_token_message(ledger: Ledger) -> None:
    """A reprint adds a message of kind REPRINT; the token message stays unique."""
    purchase = await paid_purchase(ledger)
    await ledger.record_vend(vend_draft(purchase, tid=1, expected=None), actor="saga")
    await ledger.enqueue_message(
        purchase.purchase_id, kind=MessageKind.REPRINT, recipient=PHONE, body="again", actor="op"
    )
    kinds = [m.kind for m in await ledger.outbox_for(purchase.purchase_id)]
    assert kinds == [MessageKind.TOKEN, MessageKind.REPRINT]


async def test_last_vend_for_phone_and_meter(ledger: Ledger, clock: FakeClock) -> None:
    """The last vend is the newest for the phone, or for the phone and a given meter."""
    first = await paid_purchase(ledger, "a", meter="01234567890")
    await ledger.record_vend(vend_draft(first, tid=1, expected=None), actor="saga")
    clock.advance(60)
    second = await paid_purchase(ledger, "b", meter="01234567891")
    await ledger.record_vend(
        vend_draft(second, tid=1, expected=None, token="11112222333344445555"), actor="saga"
    )
    newest = await ledger.last_vend(PHONE)
    on_first = await ledger.last_vend(PHONE, "01234567890")
    assert newest is not None
    assert newest.purchase_id == second.purchase_id
    assert on_first is not None
    assert on_first.purchase_id == first.purchase_id
    assert await ledger.last_vend(Msisdn("+254700000000")) is None


async def test_find_purchases_filters_by_phone_meter_and_state(ledger: Ledger) -> None:
    """find_purchases applies every filter given."""
    await ledger.open_purchase(draft("a", meter="01234567890"), actor="t")
    await ledger.open_purchase(draft("b", meter="01234567891"), actor="t")
    other = await ledger.open_purchase(
        draft("c", meter="01234567891", phone="+254722000111"), actor="t"
    )
    assert len(await ledger.find_purchases(phone=PHONE)) == 2
    assert len(await ledger.find_purchases(meter="01234567891")) == 2
    found = await ledger.find_purchases(meter="01234567891", phone="+254722000111")
    assert [p.purchase_id for p in found] == [other.purchase_id]
    assert await ledger.find_purchases(states=[PurchaseState.PAID]) == []


async def test_meter_lookup_masks_the_name_and_keeps_last_tid(ledger: Ledger) -> None:
    """lookup_meter masks the customer name; re-registering a meter keeps its last TID."""
    purchase = await paid_purchase(ledger)
    await ledger.record_vend(vend_draft(purchase, tid=42, expected=None), actor="saga")
    await ledger.put_meter(meter_record(METER, customer_name="Achieng Otieno"))
    info = await ledger.lookup_meter(METER)
    assert info is not None
    assert info.masked_name == "A****** O*****"
    assert (await ledger.get_meter(METER)).last_tid == 42
    assert await ledger.lookup_meter(MeterNumber("00000000000")) is None


async def test_saved_meters_are_capped_per_phone(ledger: Ledger) -> None:
    """A phone keeps at most MAX_SAVED_METERS meters; renaming and removing work."""
    drns = [MeterNumber(f"0555000000{i}") for i in range(MAX_SAVED_METERS + 1)]
    for drn in drns:
        await ledger.put_meter(meter_record(drn))
    for drn in drns[:MAX_SAVED_METERS]:
        await ledger.save_meter(PHONE, drn, nickname="home")
    with pytest.raises(SavedMetersFull):
        await ledger.save_meter(PHONE, drns[-1])
    renamed = await ledger.save_meter(PHONE, drns[0], nickname="shop")
    assert renamed.nickname == "shop"
    assert await ledger.remove_saved_meter(PHONE, drns[1])
    assert not await ledger.remove_saved_meter(PHONE, drns[1])
    assert [s.meter for s in await ledger.saved_meters(PHONE)] == [
        d for d in drns[:MAX_SAVED_METERS] if d != drns[1]
    ]


async def test_language_preference_round_trips(ledger: Ledger) -> None:
    """A phone's language is unknown until set, then the last value set."""
    assert await ledger.get_language(PHONE) is None
    await ledger.set_language(PHONE, "sw")
    await ledger.set_language(PHONE, "fr")
    assert await ledger.get_language(PHONE) == "fr"


async def test_daily_report_counts_and_sums_by_state(ledger: Ledger, clock: FakeClock) -> None:
    """The daily report groups the day's purchases by provider and state with their sums."""
    await paid_purchase(ledger, "a", amount=5000)
    await paid_purchase(ledger, "b", amount=7000)
    await ledger.open_purchase(draft("c", amount=2000), actor="t")
    clock.advance(86_400)
    await ledger.open_purchase(draft("d", amount=9900), actor="t")
    rows = await ledger.daily_report((clock() - timedelta(days=1)).date())
    summary = {(r.provider, r.state): (r.count, r.amount_minor) for r in rows}
    assert summary == {
        ("fakepay", PurchaseState.PAID): (2, 12000),
        ("fakepay", PurchaseState.CREATED): (1, 2000),
    }


async def test_security_event_without_purchase_is_kept(ledger: Ledger) -> None:
    """An event with no purchase (a security event) is stored and listed by kind."""
    await ledger.append_event(None, "unknown_reference", actor="callback", data={"ref": "Z"})
    (event,) = await ledger.events(kind="unknown_reference")
    assert event.purchase_id is None
    assert event.data == {"ref": "Z"}


async def test_get_purchase_of_unknown_id_raises(ledger: Ledger) -> None:
    """An unknown purchase id raises NotFound naming it."""
    with pytest.raises(NotFound, match="PNOPE"):
        await ledger.get_purchase(PurchaseId("PNOPE"))


async def test_probe_write_commits_and_changes_nothing(ledger: Ledger) -> None:
    """Readiness's probe write succeeds on a working ledger, repeatedly, leaving no trace."""
    before = await ledger.purchase_counts()
    for _ in range(3):
        await ledger.probe_write()
    assert await ledger.purchase_counts() == before
    assert await ledger.events() == []
