"""One provider receipt pays for one purchase, whatever provider or route (issue 17, 1).

The saga is provider-agnostic: a MoMo ``financialTransactionId`` or an Airtel id that a status
answer reports for a second purchase is refused exactly as a reused M-Pesa receipt is.
"""

from __future__ import annotations

from gateway.ledger import PurchaseState
from gateway.payments import PaymentState
from tests.vending.vending_support import AMOUNT_FOR_TESTS, PHONE, World


async def _prompted(world: World, key: str, meter: str) -> tuple[str, str]:
    purchase = await world.vending.start_purchase(
        channel="ussd", phone=PHONE, meter=meter, amount=AMOUNT_FOR_TESTS, idempotency_key=key
    )
    purchase = await world.vending.request_payment(purchase.purchase_id)
    assert purchase.provider_reference is not None
    return purchase.purchase_id, purchase.provider_reference


async def test_a_receipt_reported_for_a_second_purchase_never_vends(world: World) -> None:
    """The second purchase whose proof names the first one's receipt: refund_pending, no token."""
    first, first_ref = await _prompted(world, "one", world.drns[0])
    second, second_ref = await _prompted(world, "two", world.drns[1])
    for reference in (first_ref, second_ref):
        world.provider.settle(
            reference, PaymentState.SUCCEEDED, amount=AMOUNT_FOR_TESTS, receipt="MP260314.0926.A1"
        )
    assert (await world.vending.confirm(first)).state is PurchaseState.VENDED
    refused = await world.vending.confirm(second)

    assert refused.state is PurchaseState.REFUND_PENDING
    assert await world.ledger.get_vend(second) is None
    assert "payment_receipt_reused" in [e.kind for e in await world.ledger.timeline(second)]
    # Asked again (the sweeper, a redelivered callback): still no token.
    assert (await world.vending.confirm(second)).state is PurchaseState.REFUND_PENDING
    assert await world.ledger.get_vend(second) is None
