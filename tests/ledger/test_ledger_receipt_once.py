"""A provider's receipt pays for one purchase only (migration 0003), on every backend.

Issue 17 (1): an M-Pesa STK receipt already vended came back as a C2B confirmation's ``TransID``
for another meter, and was vended again. The ledger refuses any second payment row that proves
the same (provider, receipt), whatever its reference or route: ``ReceiptReused``, nothing written.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from gateway.ledger import (
    C2B_VALIDATION_KEEP_S,
    STATUS_ACCEPTED,
    STATUS_CONTRADICTED,
    STATUS_EARLY_MAX,
    STATUS_EARLY_MAX_BYTES,
    STATUS_HELD,
    STATUS_QUERY_KEEP_S,
    STATUS_UNMATCHED,
    Ledger,
    NotFound,
    PaymentRecordState,
    PurchaseState,
    ReceiptReused,
)
from gateway.money import Money
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

    assert await answer(conversation_id="AG_2") == STATUS_HELD  # no such query (yet): held
    assert await answer(conversation_id="AG_2") == STATUS_UNMATCHED  # one held result per id
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


_IDS = {"provider": "daraja", "originator_id": "O-1", "transaction_id": "QAB1CD2EF3"}


@pytest.mark.parametrize(
    ("claimed", "verdict"),
    [
        ({}, STATUS_ACCEPTED),
        ({"transaction_id": "QZZZZZZZZZ"}, STATUS_CONTRADICTED),
        ({"originator_id": "O-forged"}, STATUS_UNMATCHED),
        ({"provider": "other"}, STATUS_UNMATCHED),
    ],
)
async def test_a_result_before_its_query_is_held_and_judged_when_the_query_is_recorded(
    ledger: Ledger, claimed: dict[str, str], verdict: str
) -> None:
    """Issue 14 (3): Daraja's result may come before we record the query its ids name."""
    result = await ledger.answer_status_query(
        conversation_id="AG_1", result=b'{"Result":1}', **(_IDS | claimed)
    )
    assert result == STATUS_HELD
    assert await ledger.held_status_outcome("AG_1") is None
    assert await ledger.status_query_result("AG_1") is None
    assert await ledger.record_status_query(conversation_id="AG_1", **_IDS) == verdict
    assert await ledger.held_status_outcome("AG_1") == verdict
    stored = await ledger.status_query_result("AG_1")
    assert stored == (b'{"Result":1}' if verdict == STATUS_ACCEPTED else None)
    # Judged once: recording again, or the same result again, changes nothing.
    assert await ledger.record_status_query(conversation_id="AG_1", **_IDS) is None
    again = await ledger.answer_status_query(conversation_id="AG_1", result=b"{}", **_IDS)
    assert again == (STATUS_UNMATCHED if verdict == STATUS_ACCEPTED else STATUS_ACCEPTED)


async def test_held_results_are_capped_in_size_and_count(ledger: Ledger) -> None:
    """Forged results for made-up ids cannot fill the ledger: too big, or too many, unmatched."""
    big = b"x" * (STATUS_EARLY_MAX_BYTES + 1)
    assert await ledger.answer_status_query(conversation_id="AG_big", result=big, **_IDS) == (
        STATUS_UNMATCHED
    )
    for n in range(STATUS_EARLY_MAX):
        held = await ledger.answer_status_query(conversation_id=f"AG_{n}", result=b"{}", **_IDS)
        assert held == STATUS_HELD
    over = await ledger.answer_status_query(conversation_id="AG_over", result=b"{}", **_IDS)
    assert over == STATUS_UNMATCHED
    # A query recorded for one of them still binds it.
    assert await ledger.record_status_query(conversation_id="AG_7", **_IDS) == STATUS_ACCEPTED


async def test_a_result_racing_its_query_is_never_lost(ledger: Ledger) -> None:
    """The result's write and the query's recording at once (several PostgreSQL connections).

    Whichever commits first, the query ends answered, once. Before: on PostgreSQL both could
    miss the other's uncommitted row and the result was dropped as unmatched.
    """

    async def pair(n: int) -> tuple[str, str | None]:
        conversation = f"AG_race_{n}"
        answered, recorded = await asyncio.gather(
            ledger.answer_status_query(conversation_id=conversation, result=b"{}", **_IDS),
            ledger.record_status_query(conversation_id=conversation, **_IDS),
        )
        assert await ledger.status_query_result(conversation) == b"{}"
        return answered, recorded

    outcomes = await asyncio.gather(*(pair(n) for n in range(40)))
    for answered, recorded in outcomes:
        # Either the result found the query, or it was held and the query's recording took it.
        assert (answered, recorded) in {(STATUS_ACCEPTED, None), (STATUS_HELD, STATUS_ACCEPTED)}


async def test_old_status_queries_are_dropped(ledger: Ledger, clock: FakeClock) -> None:
    """A query asked more than STATUS_QUERY_KEEP_S ago is gone once another is recorded."""
    ids = {"provider": "daraja", "originator_id": "O-1", "transaction_id": "QAB1CD2EF3"}
    await ledger.record_status_query(conversation_id="AG_old", **ids)
    clock.advance(STATUS_QUERY_KEEP_S + 1)
    await ledger.record_status_query(conversation_id="AG_new", **ids)
    # Its late result names no query now: held for a query that will never be recorded again.
    assert await ledger.answer_status_query(conversation_id="AG_old", result=b"late", **ids) == (
        STATUS_HELD
    )
    assert await ledger.status_query_result("AG_old") is None
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


async def test_a_c2b_validation_is_kept_once_per_trans_id(ledger: Ledger, clock: FakeClock) -> None:
    """Issue 14: what the validation said of a TransID (the first one), until it is too old."""
    amount = Money.of("100", "KES")
    assert await ledger.c2b_validation("daraja", "QAB1CD2EF3") is None
    await ledger.record_c2b_validation(
        provider="daraja", trans_id="QAB1CD2EF3", account="04000000028", amount=amount, payer=None
    )
    await ledger.record_c2b_validation(  # a second validation of the same TransID: ignored
        provider="daraja", trans_id="QAB1CD2EF3", account="04000000010", amount=amount, payer=None
    )
    kept = await ledger.c2b_validation("daraja", "QAB1CD2EF3")
    assert kept is not None
    assert (kept.account, kept.amount, kept.payer) == ("04000000028", amount, None)
    assert await ledger.c2b_validation("other", "QAB1CD2EF3") is None
    clock.advance(C2B_VALIDATION_KEEP_S + 1)
    await ledger.record_c2b_validation(
        provider="daraja", trans_id="QZZ1CD2EF3", account="04000000028", amount=amount, payer=None
    )
    assert await ledger.c2b_validation("daraja", "QAB1CD2EF3") is None
