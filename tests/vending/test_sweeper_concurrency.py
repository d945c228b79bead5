"""The sweeper's status checks run side by side: one hanging query holds up nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gateway.ledger import LedgerUnavailable, Purchase, PurchaseState
from gateway.payments import PaymentStatus, ProviderReference
from gateway.sweeper import Sweeper
from tests.vending.vending_support import AMOUNT_FOR_TESTS, PHONE, World


async def _two_prompted(world: World, *keys: str) -> list[Purchase]:
    """Purchases on two meters, each prompted for payment (awaiting it)."""
    purchases = []
    for key, drn in zip(keys, world.drns, strict=False):
        opened = await world.vending.start_purchase(
            channel="ussd", phone=PHONE, meter=drn, amount=AMOUNT_FOR_TESTS, idempotency_key=key
        )
        purchases.append(await world.vending.request_payment(opened.purchase_id))
    return purchases


async def test_a_hanging_status_query_does_not_hold_up_the_others(world: World) -> None:
    """While one purchase's query hangs, another purchase's lost callback is recovered."""
    slow, fast = await _two_prompted(world, "slow", "fast")
    assert slow.provider_reference is not None
    assert fast.provider_reference is not None
    world.provider.settle(fast.provider_reference, amount=AMOUNT_FOR_TESTS)
    hanging = asyncio.Event()
    release = asyncio.Event()
    answer = world.provider.query_status

    async def query(reference: ProviderReference) -> PaymentStatus:
        if reference == slow.provider_reference:
            hanging.set()
            await release.wait()
        return await answer(reference)

    world.provider.query_status = query  # type: ignore[method-assign]
    world.clock.advance(3600)  # both are due (and past any first-check delay)
    sweep = asyncio.create_task(Sweeper(vending=world.vending, outbox=None).sweep_once())
    await hanging.wait()
    for _ in range(500):  # the fast one is recovered while the slow one still hangs
        if (await world.ledger.get_purchase(fast.purchase_id)).state is PurchaseState.VENDED:
            break
        await asyncio.sleep(0.01)
    assert (await world.ledger.get_purchase(fast.purchase_id)).state is PurchaseState.VENDED
    assert not sweep.done()
    release.set()
    report = await sweep
    assert report.checked == 2


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition never held")


async def test_the_checker_keeps_32_queries_in_flight_and_starts_each_as_room_frees(
    world: World,
) -> None:
    """40 due checks: 32 run at once; each one finished lets a waiting one start, no tick needed."""
    purchases = []
    for n in range(40):
        opened = await world.vending.start_purchase(
            channel="ussd",
            phone=PHONE,
            meter=world.drns[n % 3],
            amount=AMOUNT_FOR_TESTS,
            idempotency_key=f"k{n}",
        )
        purchases.append(await world.vending.request_payment(opened.purchase_id))
    answer = world.provider.query_status
    in_flight: set[str] = set()
    most = 0
    release: dict[str, asyncio.Event] = {}
    arrived = asyncio.Event()

    async def query(reference: ProviderReference) -> PaymentStatus:
        nonlocal most
        in_flight.add(reference)
        most = max(most, len(in_flight))
        release[reference] = asyncio.Event()
        arrived.set()
        await release[reference].wait()
        in_flight.discard(reference)
        return await answer(reference)

    world.provider.query_status = query  # type: ignore[method-assign]
    for purchase in purchases:
        assert purchase.provider_reference is not None
        world.provider.settle(purchase.provider_reference, amount=AMOUNT_FOR_TESTS)
    world.clock.advance(21)
    stop = asyncio.Event()
    sweeper = Sweeper(vending=world.vending, outbox=None, clock=world.clock, interval_s=3600)
    checker = asyncio.create_task(sweeper.check_continuously(stop))
    await _until(lambda: len(in_flight) >= 32)
    assert len(in_flight) == 32
    first = sorted(in_flight)
    for reference in first[:8]:  # eight finish: the other eight start at once
        release[reference].set()
    await _until(lambda: len(release) == 40)
    await _until(lambda: len(in_flight) == 32)
    for event in release.values():
        event.set()
    await _until(lambda: not in_flight)
    stop.set()
    await checker  # finishes the checks in flight
    for purchase in purchases:
        vended = await world.ledger.get_purchase(purchase.purchase_id)
        assert vended.state is PurchaseState.VENDED
    assert most == 32


async def test_stopping_the_checker_finishes_the_checks_in_flight(world: World) -> None:
    """A stop while a query is in flight waits for it; the purchase's answer is recorded."""
    opened = await world.vending.start_purchase(
        channel="ussd",
        phone=PHONE,
        meter=world.drns[0],
        amount=AMOUNT_FOR_TESTS,
        idempotency_key="k",
    )
    purchase = await world.vending.request_payment(opened.purchase_id)
    assert purchase.provider_reference is not None
    world.provider.settle(purchase.provider_reference, amount=AMOUNT_FOR_TESTS)
    answer = world.provider.query_status
    asked = asyncio.Event()
    release = asyncio.Event()

    async def query(reference: ProviderReference) -> PaymentStatus:
        asked.set()
        await release.wait()
        return await answer(reference)

    world.provider.query_status = query  # type: ignore[method-assign]
    world.clock.advance(21)
    stop = asyncio.Event()
    sweeper = Sweeper(vending=world.vending, outbox=None, clock=world.clock, interval_s=3600)
    runner = asyncio.create_task(sweeper.run(stop))
    await asyncio.wait_for(asked.wait(), 5)
    stop.set()
    await asyncio.sleep(0.01)
    assert not runner.done()
    release.set()
    await asyncio.wait_for(runner, 5)
    assert (await world.ledger.get_purchase(purchase.purchase_id)).state is PurchaseState.VENDED


async def test_a_failing_check_rests_instead_of_being_retried_at_every_poll(world: World) -> None:
    """A failed check (the ledger unavailable) is retried after ``interval_s``, not every poll.

    Its purchase stays due; the other purchases' checks go on meanwhile.
    """
    broken, fine = await _two_prompted(world, "broken", "fine")
    assert fine.provider_reference is not None
    world.provider.settle(fine.provider_reference, amount=AMOUNT_FOR_TESTS)
    attempts: list[str] = []
    check = world.vending.check_payment

    async def failing_check(purchase_id: str) -> Purchase:
        attempts.append(purchase_id)
        if purchase_id == broken.purchase_id:
            raise LedgerUnavailable("database is full")
        return await check(purchase_id)

    world.vending.check_payment = failing_check  # type: ignore[method-assign]
    world.clock.advance(21)
    stop = asyncio.Event()
    sweeper = Sweeper(
        vending=world.vending, outbox=None, clock=world.clock, interval_s=3600, check_poll_s=0.01
    )
    checker = asyncio.create_task(sweeper.check_continuously(stop))
    await _until(lambda: broken.purchase_id in attempts and fine.purchase_id in attempts)
    for _ in range(30):  # thirty polls or more
        await asyncio.sleep(0.01)
    stop.set()
    await checker
    assert attempts.count(broken.purchase_id) == 1
    assert (await world.ledger.get_purchase(fine.purchase_id)).state is PurchaseState.VENDED
    assert (await world.ledger.get_purchase(broken.purchase_id)).state is (
        PurchaseState.AWAITING_PAYMENT
    )
