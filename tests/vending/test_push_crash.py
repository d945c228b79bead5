"""A crash between the provider accepting a push and the saga storing its reference.

Daraja's STK push has no idempotency key: pushing again would charge the customer twice. The saga
marks a push before sending it and never sends another while its outcome is unknown; the push's
own success callback (an unknown reference) is matched to the purchase by payer and amount, and
the provider's status query stays the proof.
"""

from __future__ import annotations

import asyncio
import contextlib

from gateway.ledger import PurchaseState
from gateway.money import Money
from gateway.payments import CollectionRequest, CollectionStarted, PaymentNotice, PaymentState
from tests.vending.vending_support import PHONE, World

AMOUNT = Money(11600, "KES")


class ProcessDied(BaseException):
    """Raised where the real process would have been killed."""


async def _purchase_pushed_then_crashed(world: World) -> str:
    purchase = await world.vending.start_purchase(
        channel="ussd", phone=PHONE, meter=world.drns[0], amount=AMOUNT, idempotency_key="k1"
    )
    provider = world.provider
    accept = provider.request_collection

    async def accept_then_die(request: CollectionRequest) -> CollectionStarted:
        await accept(request)  # the provider took the request: a prompt is on the phone
        raise ProcessDied

    provider.request_collection = accept_then_die  # type: ignore[method-assign]
    with contextlib.suppress(ProcessDied):
        await world.vending.request_payment(purchase.purchase_id)
    provider.request_collection = accept  # type: ignore[method-assign]
    return purchase.purchase_id


async def test_a_push_of_unknown_outcome_is_never_sent_again(world: World) -> None:
    """After the crash, neither a retry nor the sweeper pushes a second time."""
    purchase_id = await _purchase_pushed_then_crashed(world)
    assert len(world.provider.requests) == 1
    await world.vending.request_payment(purchase_id)
    await world.vending.check_payment(purchase_id)
    assert len(world.provider.requests) == 1
    purchase = await world.ledger.get_purchase(purchase_id)
    assert purchase.state is PurchaseState.CREATED


async def test_the_pushs_own_callback_is_adopted_and_vends_once(world: World) -> None:
    """The success callback for the unknown reference pays the purchase; one token, one charge."""
    purchase_id = await _purchase_pushed_then_crashed(world)
    reference = world.provider.reference_for(purchase_id)
    world.provider.settle(reference, amount=AMOUNT, receipt="RKTQDM7W6S")
    notice = PaymentNotice(
        provider=world.provider.name,
        reference=reference,
        claimed_state=PaymentState.SUCCEEDED,
        amount=AMOUNT,
        payer=PHONE,
        raw=b'{"stk": "success"}',
    )
    await world.vending.on_payment_notice(notice)
    await world.vending.on_payment_notice(notice)  # a duplicate changes nothing
    purchase = await world.ledger.get_purchase(purchase_id)
    assert purchase.state is PurchaseState.VENDED
    assert purchase.provider_reference == reference
    assert len(world.provider.requests) == 1
    assert len(await world.ledger.outbox_for(purchase_id)) == 1


async def test_an_unknown_success_from_another_payer_is_not_adopted(world: World) -> None:
    """A claim whose payer or amount differs stays unknown: nothing is paid or vended."""
    purchase_id = await _purchase_pushed_then_crashed(world)
    reference = world.provider.reference_for(purchase_id)
    world.provider.settle(reference, amount=AMOUNT)
    for payer, amount in ((PHONE, Money(11700, "KES")), (None, AMOUNT)):
        await world.vending.on_payment_notice(
            PaymentNotice(
                provider=world.provider.name,
                reference=reference,
                claimed_state=PaymentState.SUCCEEDED,
                amount=amount,
                payer=payer,
                raw=f"{payer}{amount}".encode(),
            )
        )
    purchase = await world.ledger.get_purchase(purchase_id)
    assert purchase.state is PurchaseState.CREATED
    assert await world.ledger.get_vend(purchase_id) is None


async def test_a_push_refused_as_retryable_may_be_sent_again(world: World) -> None:
    """When the adapter says the push did not take effect, the sweeper sends it again."""
    purchase = await world.vending.start_purchase(
        channel="ussd", phone=PHONE, meter=world.drns[0], amount=AMOUNT, idempotency_key="k2"
    )
    world.provider.unavailable_requests = 1
    await world.vending.request_payment(purchase.purchase_id)
    assert world.provider.requests == []
    again = await world.vending.request_payment(purchase.purchase_id)
    assert again.state is PurchaseState.AWAITING_PAYMENT
    assert len(world.provider.requests) == 1


async def test_racing_payment_requests_push_once(world: World) -> None:
    """The channel's follow-up and the sweeper's check, racing, send one collection request."""
    purchase = await world.vending.start_purchase(
        channel="ussd", phone=PHONE, meter=world.drns[0], amount=AMOUNT, idempotency_key="k3"
    )
    provider = world.provider
    accept = provider.request_collection
    inside = asyncio.Event()
    release = asyncio.Event()

    async def slow_accept(request: CollectionRequest) -> CollectionStarted:
        inside.set()
        await release.wait()  # the provider is slow to answer; the other request arrives
        return await accept(request)

    provider.request_collection = slow_accept  # type: ignore[method-assign]
    first = asyncio.create_task(world.vending.request_payment(purchase.purchase_id))
    await inside.wait()
    second = asyncio.create_task(world.vending.check_payment(purchase.purchase_id))
    await asyncio.sleep(0)  # let the sweeper's step reach the saga's guard
    release.set()
    await asyncio.gather(first, second)
    assert len(provider.requests) == 1
    after = await world.ledger.get_purchase(purchase.purchase_id)
    assert after.state is PurchaseState.AWAITING_PAYMENT
