"""Debt recovery and free basic electricity in the ledger, on every backend (``ledger`` fixture)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.ledger import (
    ConfirmedPayment,
    FbeDraft,
    Ledger,
    MessageKind,
    MeterNumber,
    NotFound,
    Purchase,
    PurchaseDraft,
    PurchaseState,
    TidConflict,
    VendConflict,
    VendDraft,
    new_purchase_id,
)
from gateway.money import Money
from gateway.phone import Msisdn
from tests.ledger.ledger_support import TARIFF, meter_record

PHONE = Msisdn("+254712345678")
METER = MeterNumber("01234567890")
TOKEN = "12345678901234567890"
FBE_TOKEN = "55555555555555555555"
_FRESH_METERS = itertools.count(20_000_000_000)


async def paid(
    ledger: Ledger, key: str, *, amount: int = 10000, recovery: int = 0, meter: str = METER
) -> Purchase:
    """A paid purchase whose quote planned ``recovery`` for the meter's debt."""
    purchase = await ledger.open_purchase(
        PurchaseDraft(
            purchase_id=new_purchase_id(),
            channel="ussd",
            phone=PHONE,
            meter=MeterNumber(meter),
            amount=Money(amount, "KES"),
            units=30,
            tariff_id=TARIFF.tariff_id,
            idempotency_key=key,
            provider="fakepay",
            debt_recovery_minor=recovery,
        ),
        actor="test",
    )
    await ledger.attach_payment(
        purchase.purchase_id, provider="fakepay", reference="R-" + key, actor="test"
    )
    return await ledger.mark_paid(
        purchase.purchase_id,
        ConfirmedPayment(
            provider="fakepay",
            reference="R-" + key,
            amount=Money(amount, "KES"),
            payer=PHONE,
            receipt="RC" + key,
        ),
        actor="test",
    )


def vend(purchase: Purchase, *, tid: int, expected: int | None, **extra: object) -> VendDraft:
    """A vend draft for ``purchase``."""
    draft = VendDraft(
        purchase_id=purchase.purchase_id,
        meter=purchase.meter,
        tid=tid,
        expected_last_tid=expected,
        token=TOKEN,
        units=purchase.units,
        receipt="RC",
        recipient=purchase.phone,
        message="Token",
    )
    return dataclasses.replace(draft, **extra)  # type: ignore[arg-type]


async def test_set_show_and_clear_a_debt_each_leave_an_event(ledger: Ledger) -> None:
    """A debt is set, changed and cleared (balance 0, terms kept); each change is an event."""
    assert await ledger.get_debt(METER) is None
    debt = await ledger.set_debt(
        METER, balance=Money(50000, "KES"), rate_basis_points=2500, actor="ops", reason="arrears"
    )
    assert debt.balance == Money(50000, "KES")
    assert debt.terms.recovery(10000) == 2500
    await ledger.set_debt(
        METER,
        balance=Money(60000, "KES"),
        rate_basis_points=2000,
        cap_per_purchase_minor=5000,
        actor="ops",
    )
    cleared = await ledger.clear_debt(METER, actor="ops", reason="written off")
    assert cleared.balance == Money(0, "KES")
    assert cleared.rate_basis_points == 2000
    assert (await ledger.get_debt(METER)) == cleared
    set_events = await ledger.events(kind="debt_set")
    assert [(e.data["balance_before_minor"], e.data["balance_minor"]) for e in set_events] == [
        (50000, 60000),
        (0, 50000),
    ]
    [clear] = await ledger.events(kind="debt_cleared")
    assert (clear.data["balance_before_minor"], clear.data["reason"]) == (60000, "written off")


async def test_debt_errors(ledger: Ledger) -> None:
    """No such meter, no debt to clear, invalid terms: refused, nothing written."""
    with pytest.raises(NotFound):
        await ledger.set_debt(
            "99999999999", balance=Money(1, "KES"), rate_basis_points=1, actor="ops"
        )
    with pytest.raises(NotFound):
        await ledger.clear_debt(METER, actor="ops")
    with pytest.raises(ValueError, match="basis points"):
        await ledger.set_debt(METER, balance=Money(1, "KES"), rate_basis_points=10001, actor="x")
    assert await ledger.events(kind="debt_set") == []


async def test_vend_recovers_once_with_its_row_and_event(ledger: Ledger) -> None:
    """The vend takes the recovery off the balance; a replay recovers nothing more."""
    await ledger.set_debt(METER, balance=Money(5000, "KES"), rate_basis_points=3000, actor="ops")
    purchase = await paid(ledger, "a", recovery=3000)
    assert purchase.debt_recovery_minor == 3000
    draft = vend(purchase, tid=10, expected=None, debt_recovery_minor=3000)
    draft = dataclasses.replace(draft, expected_debt_balance_minor=5000)
    first = await ledger.record_vend(draft, actor="saga")
    replay = await ledger.record_vend(draft, actor="saga")
    assert (first.replayed, replay.replayed) == (False, True)
    debt = await ledger.get_debt(METER)
    assert debt is not None
    assert (debt.balance.amount_minor, debt.recovered_total_minor) == (2000, 3000)
    recovery = await ledger.get_debt_recovery(purchase.purchase_id)
    assert recovery is not None
    assert (recovery.amount, recovery.balance_after) == (Money(3000, "KES"), Money(2000, "KES"))
    assert await ledger.debt_recoveries(METER) == [recovery]
    kinds = [e.kind for e in await ledger.timeline(purchase.purchase_id)]
    assert kinds.count("debt_recovered") == 1


async def test_vend_from_a_stale_debt_balance_is_refused_whole(ledger: Ledger) -> None:
    """A balance moved since it was read: VendConflict (a TidConflict), nothing is written."""
    await ledger.set_debt(METER, balance=Money(5000, "KES"), rate_basis_points=3000, actor="ops")
    purchase = await paid(ledger, "a", recovery=3000)
    draft = vend(
        purchase, tid=10, expected=None, debt_recovery_minor=3000, expected_debt_balance_minor=4000
    )
    with pytest.raises(VendConflict) as caught:
        await ledger.record_vend(draft, actor="saga")
    assert isinstance(caught.value, TidConflict)
    assert caught.value.retryable
    assert (await ledger.get_purchase(purchase.purchase_id)).state is PurchaseState.PAID
    assert (await ledger.get_meter(METER)).last_tid is None
    assert await ledger.get_debt_recovery(purchase.purchase_id) is None


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    initial=st.integers(1, 100_000),
    asks=st.lists(st.integers(1, 60_000), min_size=1, max_size=5),
)
async def test_balance_is_initial_minus_recovered_never_negative(
    ledger: Ledger, initial: int, asks: list[int]
) -> None:
    """Σ recovered == initial - balance; a recovery above the balance is refused, never negative."""
    meter = MeterNumber(f"{next(_FRESH_METERS):011d}")  # a fresh meter per example
    await ledger.put_meter(meter_record(meter))
    await ledger.set_debt(meter, balance=Money(initial, "KES"), rate_basis_points=5000, actor="o")
    key = new_purchase_id()
    last_tid: int | None = None
    recovered = 0
    for n, ask in enumerate(asks):
        purchase = await paid(ledger, f"{key}{n}", amount=ask, meter=meter)
        debt = await ledger.get_debt(meter)
        assert debt is not None
        balance = debt.balance.amount_minor
        draft = vend(
            purchase,
            tid=(last_tid or 0) + 1,
            expected=last_tid,
            debt_recovery_minor=ask,
            expected_debt_balance_minor=balance,
        )
        if ask > balance:
            with pytest.raises(ValueError, match="cannot recover"):
                await ledger.record_vend(draft, actor="saga")
            continue
        await ledger.record_vend(draft, actor="saga")
        last_tid = draft.tid
        recovered += ask
    debt = await ledger.get_debt(meter)
    assert debt is not None
    assert debt.balance.amount_minor == initial - recovered >= 0
    rows = await ledger.debt_recoveries(meter, limit=100)
    assert sum(r.amount.amount_minor for r in rows) == recovered == debt.recovered_total_minor


async def test_fbe_allowance_due_and_issued_once_per_meter_month(ledger: Ledger) -> None:
    """FBE is due while the month's token is not issued; the second of a month is refused."""
    assert await ledger.fbe_due(METER, "2026-03") == 0
    await ledger.set_fbe_allowance(TARIFF.tariff_id, 500, actor="ops")
    assert await ledger.fbe_allowance(TARIFF.tariff_id) == 500
    assert await ledger.fbe_due(METER, "2026-03") == 500
    first = await paid(ledger, "a")
    fbe = FbeDraft(month="2026-03", tid=11, token=FBE_TOKEN, units=500, message="FBE token")
    await ledger.record_vend(vend(first, tid=10, expected=None, fbe=fbe), actor="saga")
    assert (await ledger.get_meter(METER)).last_tid == 11
    assert await ledger.fbe_due(METER, "2026-03") == 0
    assert await ledger.fbe_due(METER, "2026-04") == 500
    kinds = [m.kind for m in await ledger.outbox_for(first.purchase_id)]
    assert sorted(kinds) == sorted([MessageKind.TOKEN, MessageKind.FBE])
    [issue] = await ledger.fbe_issues(METER)
    assert (issue.month, issue.tid, issue.units, issue.purchase_id) == (
        "2026-03",
        11,
        500,
        first.purchase_id,
    )
    second = await paid(ledger, "b")
    again = FbeDraft(month="2026-03", tid=13, token=FBE_TOKEN, units=500, message="FBE token")
    with pytest.raises(VendConflict):
        await ledger.record_vend(vend(second, tid=12, expected=11, fbe=again), actor="saga")
    assert (await ledger.get_purchase(second.purchase_id)).state is PurchaseState.PAID
    assert (await ledger.get_meter(METER)).last_tid == 11
    assert len(await ledger.events(kind="fbe_issued")) == 1
    await ledger.set_fbe_allowance(TARIFF.tariff_id, 0, actor="ops")
    assert await ledger.fbe_due(METER, "2026-05") == 0
    assert len(await ledger.events(kind="fbe_allowance_set")) == 2


async def test_fbe_allowance_for_an_unknown_tariff(ledger: Ledger) -> None:
    """No such tariff: NotFound."""
    with pytest.raises(NotFound):
        await ledger.set_fbe_allowance("nope", 100, actor="ops")
