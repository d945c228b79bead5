"""A crash between opening a paybill (C2B) purchase and attaching its payment reference.

The customer already paid on their own phone: the purchase is opened from the C2B confirmation
and its ``TransID`` attached in a second step. A process killed between the two leaves a CREATED
purchase with the payer's phone and no reference. No path may then prompt the customer (an STK
push would charge them twice): the purchase waits for the confirmation's redelivery, which
attaches the reference and vends once, or expires at its deadline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

from gateway.ledger import Purchase, PurchaseState
from gateway.money import Money
from gateway.payments import PaymentNotice, PaymentState, ProviderReference
from gateway.sweeper import Sweeper
from tests.vending.vending_support import PHONE, World

AMOUNT = Money(11600, "KES")
TRANS_ID = "RKTQDM7W6S"


class ProcessDied(BaseException):
    """Raised where the real process would have been killed."""


def _confirmation(world: World) -> PaymentNotice:
    return PaymentNotice(
        provider=world.provider.name,
        reference=ProviderReference(TRANS_ID),
        claimed_state=PaymentState.SUCCEEDED,
        amount=AMOUNT,
        payer=PHONE,
        account_reference=world.drns[0],
        is_customer_initiated=True,
        raw=b'{"TransID":"RKTQDM7W6S"}',
    )


async def _opened_then_killed(world: World) -> Purchase:
    """The confirmation opened the purchase; the process died before the reference was attached."""
    world.provider.settle(TRANS_ID, amount=AMOUNT, receipt=TRANS_ID)
    ledger = world.ledger
    attach = ledger.attach_payment

    async def die(*args: object, **kwargs: object) -> Purchase:
        raise ProcessDied

    ledger.attach_payment = die  # type: ignore[method-assign]
    with contextlib.suppress(ProcessDied):
        await world.vending.on_payment_notice(_confirmation(world))
    ledger.attach_payment = attach  # type: ignore[method-assign]
    (purchase,) = await ledger.find_purchases(meter=world.drns[0])
    assert (purchase.channel, purchase.state, purchase.provider_reference) == (
        "c2b",
        PurchaseState.CREATED,
        None,
    )
    assert purchase.phone == PHONE
    return purchase


def _sweeper(world: World) -> Sweeper:
    return Sweeper(vending=world.vending, outbox=None, clock=world.clock)


async def test_a_paybill_purchase_is_never_prompted_by_recovery(world: World) -> None:
    """The sweeper's checks, a direct request and a retry send no STK push; it expires unpaid."""
    purchase = await _opened_then_killed(world)
    await world.vending.request_payment(purchase.purchase_id)
    for _ in range(12):
        world.clock.advance(120)
        await _sweeper(world).sweep_once()
        await world.vending.check_payment(purchase.purchase_id)
    assert world.provider.requests == []
    after = await world.ledger.get_purchase(purchase.purchase_id)
    assert after.state is PurchaseState.EXPIRED


async def test_the_redelivered_confirmation_vends_it_once(world: World) -> None:
    """Daraja resends the unanswered confirmation: the reference is attached and one token sent."""
    purchase = await _opened_then_killed(world)
    world.clock.advance(60)
    await _sweeper(world).sweep_once()
    await world.vending.on_payment_notice(_confirmation(world))
    await world.vending.on_payment_notice(_confirmation(world))
    after = await world.ledger.get_purchase(purchase.purchase_id)
    assert after.state is PurchaseState.VENDED
    assert after.provider_reference == TRANS_ID
    assert world.provider.requests == []
    assert len(await world.ledger.outbox_for(purchase.purchase_id)) == 1


async def test_a_claim_answered_then_killed_is_carried_through_by_the_sweeper(
    world: World,
) -> None:
    """Issue 14 (3): the route answered once the claim was recorded, then the process died.

    Its background check never ran. The sweeper takes the pending claim once its lease passed
    and vends it once, never prompting; then the claim is forgotten.
    """
    world.provider.settle(TRANS_ID, amount=AMOUNT, receipt=TRANS_ID)
    claim = world.provider.customer_claim(TRANS_ID, amount=AMOUNT, account=world.drns[0])
    dropped: list[object] = []
    await world.vending.on_payment_notice(claim, background=dropped.append)  # never run: killed
    assert len(dropped) == 1
    assert await world.ledger.find_purchases(meter=world.drns[0]) == []

    early = await _sweeper(world).sweep_once()  # the lease (the dead task's) has not passed
    assert early.claims == 0
    world.clock.advance(61)
    report = await _sweeper(world).sweep_once()
    assert report.claims == 1
    (purchase,) = await world.ledger.find_purchases(meter=world.drns[0])
    after = await world.ledger.get_purchase(purchase.purchase_id)
    assert after.state is PurchaseState.VENDED
    assert after.provider_reference == TRANS_ID
    assert world.provider.requests == []
    world.clock.advance(61)
    assert (await _sweeper(world).sweep_once()).claims == 0  # forgotten once carried through
    assert len(await world.ledger.outbox_for(purchase.purchase_id)) == 1


async def test_a_claim_carried_in_the_background_leaves_nothing_pending(world: World) -> None:
    """The background work runs: one vend, and no pending claim for the sweeper."""
    world.provider.settle(TRANS_ID, amount=AMOUNT, receipt=TRANS_ID)
    claim = world.provider.customer_claim(TRANS_ID, amount=AMOUNT, account=world.drns[0])
    work: list[Callable[[], Awaitable[None]]] = []
    await world.vending.on_payment_notice(claim, background=work.append)
    [carry] = work
    await carry()
    (purchase,) = await world.ledger.find_purchases(meter=world.drns[0])
    assert (await world.ledger.get_purchase(purchase.purchase_id)).state is PurchaseState.VENDED
    world.clock.advance(61)
    assert (await _sweeper(world).sweep_once()).claims == 0
