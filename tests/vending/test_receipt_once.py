"""One provider receipt pays for one purchase, whatever provider or route (issue 17, 1).

The saga is provider-agnostic: a MoMo ``financialTransactionId`` or an Airtel id that a status
answer reports for a second purchase is refused exactly as a reused M-Pesa receipt is.
"""

from __future__ import annotations

from gateway.ledger import PaymentRecordState, PurchaseState
from gateway.money import Money
from gateway.payments import PaymentNotice, PaymentState, ProviderReference
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


async def test_a_paybill_claim_the_record_contradicts_takes_no_receipt(world: World) -> None:
    """A C2B claim checked only at confirmation (the provider was out): it takes nothing.

    The confirmation says KES 116 for the meter; the provider's record of the TransID says KES
    50 (a replayed receipt with a made-up amount). Before: a REFUND_PENDING purchase holding the
    receipt, so that the receipt's real payment could not be proven. Now PAYMENT_FAILED (for an
    operator: its confirmation said money moved), the security event, and the receipt free.
    """
    world.provider.unavailable_queries = 1  # the check before opening the purchase fails
    claim = PaymentNotice(
        provider=world.provider.name,
        reference=ProviderReference("QK71XYZ001"),
        claimed_state=PaymentState.SUCCEEDED,
        amount=AMOUNT_FOR_TESTS,
        receipt="QK71XYZ001",
        account_reference=world.drns[1],
        is_customer_initiated=True,
        raw=b'{"TransID":"QK71XYZ001"}',
    )
    await world.vending.on_payment_notice(claim)
    [opened] = await world.ledger.find_purchases(meter=world.drns[1], limit=5)
    world.provider.settle("QK71XYZ001", amount=Money(5000, "KES"), receipt="QK71XYZ001")

    refused = await world.vending.confirm(opened.purchase_id)

    assert refused.state is PurchaseState.PAYMENT_FAILED
    assert await world.ledger.get_vend(opened.purchase_id) is None
    kinds = [e.kind for e in await world.ledger.timeline(opened.purchase_id)]
    assert "payment_claim_contradicted" in kinds
    record = await world.ledger.get_payment(world.provider.name, "QK71XYZ001")
    assert record is not None
    assert record.state is PaymentRecordState.PENDING
    # The receipt still proves the payment it belongs to.
    owner, owner_ref = await _prompted(world, "owner", world.drns[0])
    world.provider.settle(owner_ref, amount=AMOUNT_FOR_TESTS, receipt="QK71XYZ001")
    assert (await world.vending.confirm(owner)).state is PurchaseState.VENDED
