"""A provider's receipt pays for one purchase only (migration 0003), on every backend.

Issue 17 (1): an M-Pesa STK receipt already vended came back as a C2B confirmation's ``TransID``
for another meter, and was vended again. The ledger refuses any second payment row that proves
the same (provider, receipt), whatever its reference or route: ``ReceiptReused``, nothing written.
"""

from __future__ import annotations

import dataclasses

import pytest
from test_ledger_contract import draft, payment, vend_draft

from gateway.ledger import Ledger, PaymentRecordState, PurchaseState, ReceiptReused


async def _awaiting(ledger: Ledger, key: str, reference: str) -> str:
    purchase = await ledger.open_purchase(draft(key), actor="test")
    await ledger.attach_payment(
        purchase.purchase_id, provider="fakepay", reference=reference, actor="test"
    )
    return purchase.purchase_id


async def test_a_receipt_proves_one_payment_only(ledger: Ledger) -> None:
    """A second reference claiming a proven receipt is refused by mark_paid and record_vend."""
    first = await _awaiting(ledger, "k1", "ws_CO_1")
    stk = dataclasses.replace(payment("ws_CO_1"), receipt="QAB1CD2EF3")
    await ledger.mark_paid(first, stk, actor="saga")

    second = await _awaiting(ledger, "k2", "QAB1CD2EF3")  # the receipt re-posted as a C2B TransID
    c2b = dataclasses.replace(payment("QAB1CD2EF3"), receipt="QAB1CD2EF3")
    with pytest.raises(ReceiptReused) as caught:
        await ledger.mark_paid(second, c2b, actor="saga")
    assert caught.value.key == "fakepay:QAB1CD2EF3"
    purchase = await ledger.get_purchase(second)
    with pytest.raises(ReceiptReused):
        await ledger.record_vend(
            vend_draft(purchase, tid=100, expected=None), actor="saga", payment=c2b
        )
    with pytest.raises(ReceiptReused):
        await ledger.mark_payment_mismatch(second, c2b, expected=purchase.amount, actor="saga")
    # Nothing of the refused claims was written.
    assert (await ledger.get_purchase(second)).state is PurchaseState.AWAITING_PAYMENT
    assert await ledger.get_vend(second) is None
    row = await ledger.get_payment("fakepay", "QAB1CD2EF3")
    assert row is not None
    assert row.state is PaymentRecordState.PENDING
    assert (await ledger.get_meter(purchase.meter)).last_tid is None


async def test_the_same_payment_confirmed_again_is_not_a_reuse(ledger: Ledger) -> None:
    """The row that owns the receipt may be settled again (a retried confirmation)."""
    first = await _awaiting(ledger, "k1", "REF1")
    await ledger.mark_paid(first, payment("REF1"), actor="saga")
    purchase = await ledger.get_purchase(first)
    outcome = await ledger.record_vend(
        vend_draft(purchase, tid=100, expected=None), actor="saga", payment=payment("REF1")
    )
    assert outcome.purchase.state is PurchaseState.VENDED
    other = await _awaiting(ledger, "k2", "REF2")  # another receipt: no conflict
    assert (await ledger.mark_paid(other, payment("REF2"), actor="saga")).state is (
        PurchaseState.PAID
    )
