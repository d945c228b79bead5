"""The outbox worker: sends, retries with capped jittered backoff, fails for good, applies DLRs."""

from __future__ import annotations

from datetime import timedelta

from gateway.ledger import OutboxState, Purchase, PurchaseState
from gateway.sms import DeliveryReport, DeliveryState, SmsRejected, SmsUnavailable
from gateway.sms.outbox import OutboxPolicy, OutboxWorker
from tests.vending.vending_support import AMOUNT_FOR_TESTS, PHONE, FakeSender, World


async def vended(world: World, key: str = "k") -> Purchase:
    """A purchase vended, its token message queued."""
    purchase = await world.vending.start_purchase(
        channel="sms",
        phone=PHONE,
        meter=world.drns[0],
        amount=AMOUNT_FOR_TESTS,
        idempotency_key=key,
    )
    purchase = await world.vending.request_payment(purchase.purchase_id)
    assert purchase.provider_reference is not None
    world.provider.settle(purchase.provider_reference, amount=AMOUNT_FOR_TESTS)
    return await world.vending.confirm(purchase.purchase_id)


def worker(world: World, sender: FakeSender, **policy: float) -> OutboxWorker:
    """A worker with no jitter randomness (the seam returns 0.5)."""
    return OutboxWorker(
        ledger=world.ledger,
        sender=sender,
        clock=world.clock,
        jitter=lambda: 0.5,
        policy=OutboxPolicy(**policy),  # type: ignore[arg-type]
    )


async def test_due_message_is_sent_and_recorded(world: World) -> None:
    """A queued token message is sent once, with its provider id and cost recorded."""
    purchase = await vended(world)
    sender = FakeSender()
    run = await worker(world, sender).run_once()
    assert run.sent == 1
    assert [to for to, _ in sender.sent] == [PHONE]
    (message,) = await world.ledger.outbox_for(purchase.purchase_id)
    assert (message.state, message.provider_message_id, message.cost) == (
        OutboxState.SENT,
        "ATXid_1",
        "KES 0.8000",
    )
    assert (await worker(world, sender).run_once()).sent == 0


async def test_retryable_failure_backs_off_then_sends(world: World) -> None:
    """An unavailable provider: retried after the backoff, not before, then sent."""
    purchase = await vended(world)
    sender = FakeSender()
    sender.failures.append(SmsUnavailable("503", provider="fake"))
    w = worker(world, sender, base_delay_s=10)
    assert (await w.run_once()).retried == 1
    (message,) = await world.ledger.outbox_for(purchase.purchase_id)
    assert message.next_try_at == world.clock() + timedelta(seconds=7.5)
    world.clock.advance(7)
    assert (await w.run_once()).sent == 0
    world.clock.advance(1)
    assert (await w.run_once()).sent == 1


def test_backoff_is_capped_and_jittered(world: World) -> None:
    """Delays double per attempt up to the cap, jitter spreading them over its upper half."""
    low = OutboxWorker(
        ledger=world.ledger,
        sender=FakeSender(),
        jitter=lambda: 0.0,
        policy=OutboxPolicy(base_delay_s=5, max_delay_s=60),
    )
    high = OutboxWorker(
        ledger=world.ledger,
        sender=FakeSender(),
        jitter=lambda: 0.999999,
        policy=OutboxPolicy(base_delay_s=5, max_delay_s=60),
    )
    assert [low.backoff(n).total_seconds() for n in (1, 2, 3, 4, 5, 9)] == [
        2.5,
        5,
        10,
        20,
        30,
        30,
    ]
    assert 59.9 < high.backoff(9).total_seconds() <= 60


async def test_rejection_fails_the_message_for_an_operator(world: World) -> None:
    """A refused message is FAILED at once, with the reason, and never retried."""
    purchase = await vended(world)
    sender = FakeSender()
    sender.failures.append(SmsRejected("blacklisted", provider="fake"))
    assert (await worker(world, sender).run_once()).failed == 1
    world.clock.advance(86_400)
    assert (await worker(world, sender).run_once()).sent == 0
    (message,) = await world.ledger.outbox_for(purchase.purchase_id)
    assert message.state is OutboxState.FAILED
    assert message.last_error is not None
    assert "blacklisted" in message.last_error


async def test_too_many_attempts_fail_the_message(world: World) -> None:
    """A message still failing after max_attempts becomes FAILED."""
    purchase = await vended(world)
    sender = FakeSender()
    sender.failures.extend(SmsUnavailable("503", provider="fake") for _ in range(3))
    w = worker(world, sender, max_attempts=2, base_delay_s=1)
    await w.run_once()
    world.clock.advance(10)
    assert (await w.run_once()).failed == 1
    (message,) = await world.ledger.outbox_for(purchase.purchase_id)
    assert message.state is OutboxState.FAILED


async def test_crashed_send_is_retried(world: World) -> None:
    """An unexpected error in the sender is logged and retried, never lost."""
    await vended(world)
    sender = FakeSender()
    sender.failures.append(RuntimeError("boom"))
    assert (await worker(world, sender).run_once()).retried == 1


async def test_delivery_report_delivers_the_purchase(world: World) -> None:
    """A DELIVERED report for the token message makes the purchase DELIVERED."""
    purchase = await vended(world)
    sender = FakeSender()
    w = worker(world, sender)
    await w.run_once()
    report = DeliveryReport(provider_message_id="ATXid_1", state=DeliveryState.DELIVERED)
    message = await w.apply_delivery_report(report)
    assert message is not None
    assert message.state is OutboxState.DELIVERED
    assert (await world.ledger.get_purchase(purchase.purchase_id)).state is (
        PurchaseState.DELIVERED
    )
    unknown = DeliveryReport(provider_message_id="nope", state=DeliveryState.DELIVERED)
    assert await w.apply_delivery_report(unknown) is None
