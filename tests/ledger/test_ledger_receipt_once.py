"""A provider's receipt pays for one purchase only (migration 0003), on every backend.

Issue 17 (1): an M-Pesa STK receipt already vended came back as a C2B confirmation's ``TransID``
for another meter, and was vended again. The ledger refuses any second payment row that proves
the same (provider, receipt), whatever its reference or route: ``ReceiptReused``, nothing written.
"""

from __future__ import annotations

import dataclasses

import pytest

from gateway.ledger import (
    STATUS_ACCEPTED,
    STATUS_CONTRADICTED,
    STATUS_QUERY_KEEP_S,
    STATUS_UNMATCHED,
    Ledger,
    NotFound,
    PaymentRecordState,
    PurchaseState,
    ReceiptReused,
)
from tests.ledger.ledger_support import FakeClock
from tests.ledger.test_ledger_contract import draft, payment, vend_draft


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


async def test_a_status_result_is_accepted_once_for_the_query_it_names(ledger: Ledger) -> None:
    """Issue 17 (2): results bind to our acknowledged query by both ids, once, same transaction."""
    await ledger.record_status_query(
        provider="daraja", conversation_id="AG_1", originator_id="O-1", transaction_id="QAB1CD2EF3"
    )
    await ledger.record_status_query(  # a retried write is harmless
        provider="daraja", conversation_id="AG_1", originator_id="O-1", transaction_id="QAB1CD2EF3"
    )
    assert await ledger.status_query_result("AG_1") is None

    async def answer(**change: str) -> str:
        ids = {
            "provider": "daraja",
            "conversation_id": "AG_1",
            "originator_id": "O-1",
            "transaction_id": "QAB1CD2EF3",
        }
        return await ledger.answer_status_query(**(ids | change), result=b"forged")

    assert await answer(conversation_id="AG_2") == STATUS_UNMATCHED
    assert await answer(originator_id="O-2") == STATUS_UNMATCHED
    assert await answer(provider="other") == STATUS_UNMATCHED
    assert await answer(transaction_id="QZZZZZZZZZ") == STATUS_CONTRADICTED
    assert await ledger.status_query_result("AG_1") is None  # none of those was stored

    assert (
        await ledger.answer_status_query(
            provider="daraja",
            conversation_id="AG_1",
            originator_id="O-1",
            transaction_id="QAB1CD2EF3",
            result=b'{"Result":{}}',
        )
        == STATUS_ACCEPTED
    )
    assert await ledger.status_query_result("AG_1") == b'{"Result":{}}'
    assert await answer() == STATUS_UNMATCHED  # one use only: a replay stores nothing
    assert await ledger.status_query_result("AG_1") == b'{"Result":{}}'


async def test_old_status_queries_are_dropped(ledger: Ledger, clock: FakeClock) -> None:
    """A query asked more than STATUS_QUERY_KEEP_S ago is gone once another is recorded."""
    ids = {"provider": "daraja", "originator_id": "O-1", "transaction_id": "QAB1CD2EF3"}
    await ledger.record_status_query(conversation_id="AG_old", **ids)
    clock.advance(STATUS_QUERY_KEEP_S + 1)
    await ledger.record_status_query(conversation_id="AG_new", **ids)
    assert await ledger.answer_status_query(conversation_id="AG_old", result=b"late", **ids) == (
        STATUS_UNMATCHED
    )
    assert await ledger.answer_status_query(conversation_id="AG_new", result=b"{}", **ids) == (
        STATUS_ACCEPTED
    )


async def test_a_proven_receipt_replaces_a_claimed_one_and_stays_unique(ledger: Ledger) -> None:
    """prove_receipt puts the provider's receipt on a payment row; one already used is refused."""
    first = await _awaiting(ledger, "k1", "ws_CO_1")
    claimed = dataclasses.replace(payment("ws_CO_1"), receipt=None)
    await ledger.mark_paid(first, claimed, actor="saga")
    await ledger.prove_receipt("fakepay", "ws_CO_1", "QAB1CD2EF3")
    row = await ledger.get_payment("fakepay", "ws_CO_1")
    assert row is not None
    assert row.receipt == "QAB1CD2EF3"

    second = await _awaiting(ledger, "k2", "ws_CO_2")
    await ledger.mark_paid(second, dataclasses.replace(payment("ws_CO_2"), receipt=None), actor="s")
    with pytest.raises(ReceiptReused):
        await ledger.prove_receipt("fakepay", "ws_CO_2", "QAB1CD2EF3")
    with pytest.raises(NotFound):
        await ledger.prove_receipt("fakepay", "ws_CO_9", "QZZ1CD2EF3")
