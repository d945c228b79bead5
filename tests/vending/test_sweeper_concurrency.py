"""The sweeper's status checks run side by side: one hanging query holds up nothing else."""

from __future__ import annotations

import asyncio

from vending_support import AMOUNT_FOR_TESTS, PHONE, World

from gateway.ledger import PurchaseState
from gateway.payments import PaymentStatus, ProviderReference
from gateway.sweeper import Sweeper


async def test_a_hanging_status_query_does_not_hold_up_the_others(world: World) -> None:
    """While one purchase's query hangs, another purchase's lost callback is recovered."""
    purchases = []
    for key, drn in (("slow", world.drns[0]), ("fast", world.drns[1])):
        opened = await world.vending.start_purchase(
            channel="ussd", phone=PHONE, meter=drn, amount=AMOUNT_FOR_TESTS, idempotency_key=key
        )
        purchases.append(await world.vending.request_payment(opened.purchase_id))
    slow, fast = purchases
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
