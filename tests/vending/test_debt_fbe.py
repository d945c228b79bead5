"""Debt recovery and free basic electricity through the saga, real ledger and token engine."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.ports import Quote, RefusalReason, Refused
from gateway.customer_services import SagaCustomerServices
from gateway.ledger import MessageKind, MeterNumber, Purchase, PurchaseState
from gateway.money import Money
from gateway.sts import CreditAdded, MeterEmulator, Verdict
from gateway.tariff import AmountAllToDebt
from gateway.vending import fbe_message, token_message
from tests.vending.vending_support import (
    PHONE,
    VENDING_KEY,
    World,
    make_drn,
    meter_record,
    profile_of,
)

# KES 145 with 20 % to the debt: KES 29 recovered, KES 116 buys 4.0 kWh (KES 25/kWh + 16 % VAT).
AMOUNT = Money(14500, "KES")
_FRESH = itertools.count(500)


async def bought(world: World, key: str, amount: Money = AMOUNT) -> Purchase:
    """A purchase started, prompted, paid and confirmed (vended)."""
    purchase = await world.vending.start_purchase(
        channel="ussd", phone=PHONE, meter=world.drns[0], amount=amount, idempotency_key=key
    )
    purchase = await world.vending.request_payment(purchase.purchase_id)
    assert purchase.provider_reference is not None
    world.provider.settle(purchase.provider_reference, amount=amount, receipt="RC" + key)
    return await world.vending.confirm(purchase.purchase_id)


def emulator(world: World) -> MeterEmulator:
    """A meter emulator keyed like the first meter."""
    return MeterEmulator.for_profile(profile_of(meter_record(world.drns[0])), VENDING_KEY)


async def test_quote_shows_and_vend_recovers_the_debt_once(world: World) -> None:
    """The quote plans KES 29; the vend recovers it, the SMS says so; a replay recovers nothing."""
    await world.ledger.set_debt(
        world.drns[0], balance=Money(50000, "KES"), rate_basis_points=2000, actor="ops"
    )
    priced = await world.vending.quote(world.drns[0], AMOUNT)
    assert (priced.units, priced.debt_recovered, priced.debt_remaining) == (
        40,
        Money(2900, "KES"),
        Money(47100, "KES"),
    )
    purchase = await bought(world, "a")
    assert purchase.state is PurchaseState.VENDED
    assert purchase.debt_recovery_minor == 2900
    vend = await world.vending.vend(purchase.purchase_id)  # a replay
    response = emulator(world).enter(vend.token)
    assert response.verdict is Verdict.ACCEPTED
    assert isinstance(response.change, CreditAdded)
    assert response.change.amount == 40
    debt = await world.ledger.get_debt(world.drns[0])
    assert debt is not None
    assert debt.balance == Money(47100, "KES")
    (message,) = await world.ledger.outbox_for(purchase.purchase_id)
    assert "Debt recovered KES 29.00, remaining KES 471.00." in message.body
    assert len(message.body) <= 306
    kinds = [e.kind for e in await world.ledger.timeline(purchase.purchase_id)]
    assert kinds.count("debt_recovered") == 1
    reprint = await world.vending.reprint(purchase.purchase_id)
    assert "KES 29.00" in reprint.body


async def test_a_debt_cleared_before_the_vend_gives_the_money_to_energy(world: World) -> None:
    """Planned KES 29, but the debt was written off meanwhile: KES 145 buys 5.0 kWh, not 4.0."""
    await world.ledger.set_debt(
        world.drns[0], balance=Money(50000, "KES"), rate_basis_points=2000, actor="ops"
    )
    purchase = await world.vending.start_purchase(
        channel="ussd", phone=PHONE, meter=world.drns[0], amount=AMOUNT, idempotency_key="b"
    )
    assert purchase.units == 40
    await world.ledger.clear_debt(world.drns[0], actor="ops")
    purchase = await world.vending.request_payment(purchase.purchase_id)
    assert purchase.provider_reference is not None
    world.provider.settle(purchase.provider_reference, amount=AMOUNT)
    await world.vending.confirm(purchase.purchase_id)
    vend = await world.ledger.get_vend(purchase.purchase_id)
    assert vend is not None
    # KES 145 / 1.16 = KES 125 of energy = 5.0 kWh at KES 25/kWh.
    assert vend.units == 50
    assert await world.ledger.get_debt_recovery(purchase.purchase_id) is None


async def test_an_amount_that_would_all_go_to_the_debt_is_refused(world: World) -> None:
    """At 100 % recovery of KES 100 owed, KES 50 is refused with the least amount that buys."""
    await world.ledger.set_debt(
        world.drns[0], balance=Money(10000, "KES"), rate_basis_points=10000, actor="ops"
    )
    with pytest.raises(AmountAllToDebt) as caught:
        await world.vending.quote(world.drns[0], Money(5000, "KES"))
    assert caught.value.minimum == Money(10290, "KES")
    assert await world.ledger.find_purchases(meter=world.drns[0]) == []


async def test_fbe_comes_with_the_first_purchase_of_the_month_only(world: World) -> None:
    """5.0 kWh of FBE: its own token and SMS with the month's first vend; not with the second."""
    await world.ledger.set_fbe_allowance("domestic", 50, actor="ops")
    first = await bought(world, "a", Money(11600, "KES"))
    second = await bought(world, "b", Money(11600, "KES"))
    [issue] = await world.ledger.fbe_issues(world.drns[0])
    assert (issue.month, issue.units, issue.purchase_id) == ("2026-03", 50, first.purchase_id)
    vend = await world.ledger.get_vend(first.purchase_id)
    assert vend is not None
    assert issue.tid > vend.tid
    meter = emulator(world)
    for token, units in ((vend.token, 40), (issue.token, 50)):
        response = meter.enter(token)
        assert response.verdict is Verdict.ACCEPTED
        assert isinstance(response.change, CreditAdded)
        assert response.change.amount == units
    kinds = sorted(m.kind for m in await world.ledger.outbox_for(first.purchase_id))
    assert kinds == sorted([MessageKind.TOKEN, MessageKind.FBE])
    assert [m.kind for m in await world.ledger.outbox_for(second.purchase_id)] == [
        MessageKind.TOKEN
    ]
    later = await world.ledger.get_vend(second.purchase_id)
    assert later is not None
    assert later.tid > issue.tid  # the FBE token's TID is never reused


async def test_fbe_month_is_the_utility_timezone_month(world: World) -> None:
    """At 22:30 UTC on 31 March it is already April in Nairobi (UTC+3): the April allowance."""
    await world.ledger.set_fbe_allowance("domestic", 50, actor="ops")
    world.clock.now = datetime(2026, 3, 31, 22, 30, tzinfo=UTC)
    await bought(world, "a", Money(11600, "KES"))
    [issue] = await world.ledger.fbe_issues(world.drns[0])
    assert issue.month == "2026-04"


def test_messages_in_every_language_fit() -> None:
    """The debt sentence and the FBE SMS exist in en/sw/fr and stay within their segments."""
    for language in ("en", "sw", "fr"):
        text = token_message(
            token="1" * 20,
            units=1234567,
            amount=Money(123456789, "KES"),
            meter="1234567890123",
            receipt="RKTQDM7W6SXX",
            language=language,
            key_change_tokens=("2" * 20, "3" * 20),
            debt_recovered=Money(123456789, "KES"),
            debt_remaining=Money(123456789, "KES"),
        )
        assert len(text) <= 306
        assert text.count("1,234,567.89") == 3
        fbe = fbe_message(
            token="4" * 20, units=500, month="2026-03", meter="1234567890123", language=language
        )
        assert "4444-4444" in fbe
        assert "50.0" in fbe
        assert len(fbe) <= 160


async def test_customer_services_pass_the_debt_and_the_all_to_debt_refusal_on(world: World) -> None:
    """The channels' quote carries the debt figures; a too-small amount is refused with a limit."""
    services = SagaCustomerServices(world.vending)
    meter = MeterNumber(world.drns[0])
    await world.ledger.set_debt(
        meter, balance=Money(10000, "KES"), rate_basis_points=10000, actor="o"
    )
    refused = await services.quote(meter, Money(5000, "KES"))
    assert refused == Refused(reason=RefusalReason.ALL_TO_DEBT, limit=Money(10290, "KES"))
    priced = await services.quote(meter, Money(20000, "KES"))
    assert isinstance(priced, Quote)
    assert priced.debt_recovered is not None
    assert (priced.debt_recovered, priced.debt_remaining) == (Money(10000, "KES"), Money(0, "KES"))
    assert priced.energy + priced.tax + priced.fees + priced.debt_recovered == Money(20000, "KES")


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(gaps_h=st.lists(st.integers(0, 24 * 40), min_size=1, max_size=6))
async def test_fbe_at_most_once_per_meter_month(world: World, gaps_h: list[int]) -> None:
    """Purchases hours or weeks apart: one FBE token per calendar month with a vend, never two."""
    await world.ledger.set_fbe_allowance("domestic", 50, actor="ops")
    drn = make_drn(next(_FRESH))
    await world.ledger.put_meter(meter_record(drn))
    months: set[str] = set()
    for n, gap in enumerate(gaps_h):
        world.clock.advance(gap * 3600)
        purchase = await world.vending.start_purchase(
            channel="ussd", phone=PHONE, meter=drn, amount=Money(11600, "KES"),
            idempotency_key=f"{drn}-{n}",
        )  # fmt: skip
        purchase = await world.vending.request_payment(purchase.purchase_id)
        assert purchase.provider_reference is not None
        world.provider.settle(purchase.provider_reference, amount=Money(11600, "KES"))
        await world.vending.confirm(purchase.purchase_id)
        months.add(world.clock.now.astimezone(ZoneInfo("Africa/Nairobi")).strftime("%Y-%m"))
    issues = await world.ledger.fbe_issues(drn, limit=100)
    assert sorted(i.month for i in issues) == sorted(months)
    assert len({i.tid for i in issues}) == len(issues)


async def test_concurrent_first_purchases_of_the_month_get_one_fbe(world: World) -> None:
    """Two purchases of one meter paid at once: two credit tokens, one FBE token, distinct TIDs."""
    await world.ledger.set_fbe_allowance("domestic", 50, actor="ops")
    started = []
    for key in ("x", "y"):
        purchase = await world.vending.start_purchase(
            channel="ussd", phone=PHONE, meter=world.drns[1], amount=Money(11600, "KES"),
            idempotency_key=key,
        )  # fmt: skip
        purchase = await world.vending.request_payment(purchase.purchase_id)
        assert purchase.provider_reference is not None
        world.provider.settle(purchase.provider_reference, amount=Money(11600, "KES"))
        started.append(purchase.purchase_id)
    await asyncio.gather(*(world.vending.confirm(p) for p in started))
    issues = await world.ledger.fbe_issues(world.drns[1])
    vends = [await world.ledger.get_vend(p) for p in started]
    tids = [v.tid for v in vends if v is not None] + [i.tid for i in issues]
    assert len(issues) == 1
    assert len(set(tids)) == 3


async def test_two_purchases_planned_against_one_small_debt_never_overrecover(
    world: World,
) -> None:
    """KES 40 owed, two KES 145 purchases each planned KES 29: the second recovers only KES 11.

    The second's KES 134 left buys 134 / 1.16 / 25 = 4.6 kWh; the balance ends at exactly 0.
    """
    await world.ledger.set_debt(
        world.drns[2], balance=Money(4000, "KES"), rate_basis_points=2000, actor="ops"
    )
    opened = []
    for key in ("p", "q"):
        purchase = await world.vending.start_purchase(
            channel="ussd", phone=PHONE, meter=world.drns[2], amount=AMOUNT, idempotency_key=key
        )
        assert purchase.debt_recovery_minor == 2900
        purchase = await world.vending.request_payment(purchase.purchase_id)
        assert purchase.provider_reference is not None
        world.provider.settle(purchase.provider_reference, amount=AMOUNT)
        opened.append(purchase.purchase_id)
    await asyncio.gather(*(world.vending.confirm(p) for p in opened))
    debt = await world.ledger.get_debt(world.drns[2])
    assert debt is not None
    assert (debt.balance.amount_minor, debt.recovered_total_minor) == (0, 4000)
    recovered = sorted(
        r.amount.amount_minor for r in await world.ledger.debt_recoveries(world.drns[2])
    )
    assert recovered == [1100, 2900]
    vends = [await world.ledger.get_vend(p) for p in opened]
    assert sorted(v.units for v in vends if v is not None) == [40, 46]
