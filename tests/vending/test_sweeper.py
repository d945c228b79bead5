"""Recovery: the sweeper finishes paid purchases, lost callbacks, expiries and due messages."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta

import pytest

from gateway.ledger import (
    ConfirmedPayment,
    LedgerUnavailable,
    OutboxState,
    Purchase,
    PurchaseState,
    SqliteLedger,
)
from gateway.phone import Msisdn
from gateway.sms import SentMessage
from gateway.sms.outbox import OutboxWorker
from gateway.sweeper import Sweeper
from gateway.vending import RECOVERY_LEASE_S
from tests.vending.vending_support import AMOUNT_FOR_TESTS, PHONE, FakeSender, World


async def awaiting(world: World, key: str = "k") -> Purchase:
    """A purchase whose collection was requested."""
    purchase = await world.vending.start_purchase(
        channel="ussd",
        phone=PHONE,
        meter=world.drns[0],
        amount=AMOUNT_FOR_TESTS,
        idempotency_key=key,
    )
    purchase = await world.vending.request_payment(purchase.purchase_id)
    assert purchase.provider_reference is not None
    return purchase


async def paid_without_vend(world: World, key: str = "k") -> Purchase:
    """A purchase marked paid whose process died before the vend."""
    purchase = await awaiting(world, key)
    assert purchase.provider_reference is not None
    return await world.ledger.mark_paid(
        purchase.purchase_id,
        ConfirmedPayment(
            provider="fakepay",
            reference=purchase.provider_reference,
            amount=AMOUNT_FOR_TESTS,
            payer=PHONE,
            receipt="R1",
        ),
        actor="test",
    )


def sweeper(world: World, sender: FakeSender | None = None) -> Sweeper:
    """A sweeper with an outbox worker on ``sender``."""
    outbox = OutboxWorker(
        ledger=world.ledger, sender=sender or FakeSender(), clock=world.clock, jitter=lambda: 0.0
    )
    return Sweeper(vending=world.vending, outbox=outbox, clock=world.clock)


async def test_sweep_vends_paid_purchases_and_sends_their_tokens(world: World) -> None:
    """A paid purchase left without a vend is vended and its SMS sent by one sweep."""
    purchase = await paid_without_vend(world)
    sender = FakeSender()
    report = await sweeper(world, sender).sweep_once()
    assert (report.vended, report.sent) == (1, 1)
    assert (await world.ledger.get_purchase(purchase.purchase_id)).state is PurchaseState.VENDED
    assert len(sender.sent) == 1


async def test_sweep_confirms_a_payment_whose_callback_was_lost(world: World) -> None:
    """No callback ever came: the sweeper's status check finds the payment and vends."""
    purchase = await awaiting(world)
    assert purchase.provider_reference is not None
    world.provider.settle(purchase.provider_reference, amount=AMOUNT_FOR_TESTS)
    assert (await sweeper(world).sweep_once()).checked == 0  # not due yet
    world.clock.advance(21)
    report = await sweeper(world).sweep_once()
    assert report.checked == 1
    assert (await world.ledger.get_purchase(purchase.purchase_id)).state is PurchaseState.VENDED


async def test_sweep_checks_20_s_after_the_prompt_then_every_30_s_then_expires(
    world: World,
) -> None:
    """An unpaid purchase is asked about 20 s after its prompt, then every 30 s, then EXPIRED."""
    purchase = await awaiting(world)
    prompted = world.clock()
    assert purchase.next_check_at == prompted + timedelta(seconds=20)
    world.clock.advance(20)
    gaps = []
    while True:
        before = world.clock()
        await sweeper(world).sweep_once()
        current = await world.ledger.get_purchase(purchase.purchase_id)
        if current.state is not PurchaseState.AWAITING_PAYMENT:
            break
        assert current.next_check_at is not None
        gaps.append((current.next_check_at - before).total_seconds())
        world.clock.advance(gaps[-1])
    assert current.state is PurchaseState.EXPIRED
    deadline = purchase.created_at + timedelta(seconds=600)  # the world's policy
    assert world.clock() == deadline
    assert gaps[:-1] == [30.0] * (len(gaps) - 1)
    assert 0 < gaps[-1] <= 30.0  # the last check is at the deadline
    assert world.provider.queries == len(gaps) + 1


async def test_sweep_survives_a_provider_outage(world: World) -> None:
    """An unavailable provider during a sweep raises nothing and leaves the purchase waiting."""
    purchase = await awaiting(world)
    world.provider.unavailable_queries = 5
    world.clock.advance(21)
    await sweeper(world).sweep_once()
    assert (await world.ledger.get_purchase(purchase.purchase_id)).state is (
        PurchaseState.AWAITING_PAYMENT
    )


async def test_run_sweeps_at_start_until_stopped(world: World) -> None:
    """run() sweeps immediately and returns once stopped."""
    await paid_without_vend(world)
    sent = asyncio.Event()

    class SignallingSender(FakeSender):
        async def send(self, to: Msisdn, text: str) -> SentMessage:
            """Send, then signal the test."""
            message = await super().send(to, text)
            sent.set()
            return message

    stop = asyncio.Event()
    task = asyncio.create_task(sweeper(world, SignallingSender()).run(stop))
    async with asyncio.timeout(10):
        await sent.wait()
    stop.set()
    async with asyncio.timeout(10):
        await task


def fill(conn: sqlite3.Connection) -> None:
    """Fill the database to a page limit, up to the last byte of the events b-tree."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + 4}")
    for size in (4000, 500, 50, 5, 1):
        while True:
            try:
                conn.execute(
                    "INSERT INTO events (purchase_id, kind, actor, data, at)"
                    " VALUES (NULL, 'filler', 'test', hex(randomblob(?)), '')",
                    (size,),
                )
            except sqlite3.OperationalError:
                break


async def test_full_database_leaves_nothing_half_written_and_the_sweeper_finishes(
    world: World,
) -> None:
    """A vend on a full database fails clearly, writes nothing; with space back a sweep vends."""
    purchase = await paid_without_vend(world)
    ledger = world.ledger
    assert isinstance(ledger, SqliteLedger)
    await ledger._writer.run_in_thread(fill)
    with pytest.raises(LedgerUnavailable, match="full"):
        await world.vending.vend(purchase.purchase_id)
    assert (await ledger.get_purchase(purchase.purchase_id)).state is PurchaseState.PAID
    assert await ledger.get_vend(purchase.purchase_id) is None
    assert await ledger.outbox_for(purchase.purchase_id) == []
    assert (await ledger.get_meter(world.drns[0])).last_tid is None

    report = await sweeper(world).sweep_once()  # still full: nothing, and no exception
    assert report.vended == 0
    await ledger._writer.run_in_thread(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
    report = await sweeper(world).sweep_once()
    assert report.vended == 0  # the failed recovery's claim holds until its lease lapses
    world.clock.advance(RECOVERY_LEASE_S + 1)
    report = await sweeper(world).sweep_once()
    assert report.vended == 1
    (message,) = await ledger.outbox_for(purchase.purchase_id)
    assert message.state is OutboxState.SENT


async def test_a_second_sweep_does_nothing_more(world: World) -> None:
    """Sweeping twice changes nothing more than sweeping once (idempotent recovery)."""
    await paid_without_vend(world)
    sender = FakeSender()
    await sweeper(world, sender).sweep_once()
    again = await sweeper(world, sender).sweep_once()
    assert (again.vended, again.sent) == (0, 0)
    assert len(sender.sent) == 1


async def test_sweep_requests_a_payment_the_caller_never_requested(world: World) -> None:
    """A purchase left CREATED (crash before request_payment) is requested by a later sweep."""
    purchase = await world.vending.start_purchase(
        channel="ussd",
        phone=PHONE,
        meter=world.drns[0],
        amount=AMOUNT_FOR_TESTS,
        idempotency_key="x",
    )
    assert world.provider.requests == []
    world.clock.advance(21)
    await sweeper(world).sweep_once()
    assert [r.purchase_id for r in world.provider.requests] == [purchase.purchase_id]
    assert (await world.ledger.get_purchase(purchase.purchase_id)).state is (
        PurchaseState.AWAITING_PAYMENT
    )
