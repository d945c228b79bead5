"""The outbox worker: sends, retries with capped jittered backoff, fails for good, applies DLRs."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, cast

from gateway.ledger import Ledger, LedgerError, OutboxState, Purchase, PurchaseState
from gateway.phone import Msisdn
from gateway.sms import DeliveryReport, DeliveryState, SentMessage, SmsRejected, SmsUnavailable
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


class _SlowSender(FakeSender):
    """Each send takes ``took_s`` of the fake clock; ``during`` runs inside the Nth send."""

    def __init__(self, world: World, took_s: float, name: str = "slow") -> None:
        super().__init__()
        self._name = name
        self._world = world
        self._took_s = took_s
        self.during: dict[int, Callable[[], Awaitable[object]]] = {}

    async def send(self, to: Msisdn, text: str) -> SentMessage:
        """Accept the message after ``took_s`` (meanwhile another instance may run)."""
        sent = await super().send(to, text)
        self._world.clock.advance(self._took_s)
        hook = self.during.pop(len(self.sent), None)
        if hook is not None:
            await hook()
        return dataclasses.replace(sent, provider_message_id=f"{self._name}_{len(self.sent)}")


async def test_a_send_never_starts_so_late_that_its_lease_ends_before_it_is_recorded(
    world: World,
) -> None:
    """A message queued behind slow sends is left to its lease, not sent as the lease runs out.

    Instance A claims two messages (one send at a time); the first send is slow, so by the
    time the second could start, its lease ends before the send's deadline would. Had A sent
    it, instance B, claiming the expired lease during A's send, would have sent it too.
    """
    first, second = await vended(world, "k1"), await vended(world, "k2")
    slow = _SlowSender(world, took_s=40)
    other = _SlowSender(world, took_s=0, name="other")
    a = worker(world, slow, batch=2, concurrency=1, lease_s=45, send_timeout_s=15)
    b = worker(world, other, lease_s=45, send_timeout_s=15)
    slow.during[2] = b.run_once  # B looks for due messages while A's second send is out
    await a.run_once()
    world.clock.advance(30)
    await b.run_once()
    texts = [text for _, text in slow.sent + other.sent]
    assert len(texts) == len(set(texts)) == 2, texts
    for purchase in (first, second):
        (message,) = await world.ledger.outbox_for(purchase.purchase_id)
        assert message.state is OutboxState.SENT


class _FlakyLedger:
    """The ledger, except that recording a sent message fails ``failures`` times first."""

    def __init__(self, inner: Ledger, failures: int) -> None:
        self._inner = inner
        self.failures = failures

    async def outbox_sent(self, message_id: int, **fields: Any) -> None:
        """Fail while failures are left, then record."""
        if self.failures:
            self.failures -= 1
            raise LedgerError("database is locked")
        await self._inner.outbox_sent(message_id, **fields)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_an_accepted_send_whose_record_fails_once_is_recorded_not_sent_again(
    world: World,
) -> None:
    """The provider took the message; a failed write of that fact is retried, not lost.

    Lost, the message stays claimed and is sent a second time when its lease ends.
    """
    purchase = await vended(world)
    sender = FakeSender()
    w = OutboxWorker(
        ledger=cast("Ledger", _FlakyLedger(world.ledger, failures=1)),
        sender=sender,
        clock=world.clock,
        jitter=lambda: 0.5,
        policy=OutboxPolicy(lease_s=45, record_retry_s=0.0),
    )
    with contextlib.suppress(LedgerError):
        await w.run_once()
    world.clock.advance(60)
    await worker(world, sender).run_once()
    assert len(sender.sent) == 1
    (message,) = await world.ledger.outbox_for(purchase.purchase_id)
    assert (message.state, message.provider_message_id) == (OutboxState.SENT, "ATXid_1")
