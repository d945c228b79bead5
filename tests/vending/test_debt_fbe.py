"""Debt recovery and free basic electricity through the saga, real ledger and token engine."""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.ports import Quote, RefusalReason, Refused
from gateway.customer_services import SagaCustomerServices
from gateway.ledger import (
    ConfirmedPayment,
    LedgerUnavailable,
    MessageKind,
    MeterNumber,
    Purchase,
    PurchaseState,
    open_postgres_ledger,
)
from gateway.ledger.postgres import create_schema, drop_schema
from gateway.money import Money
from gateway.payments import PaymentNotice, PaymentState, ProviderReference
from gateway.sts import CreditAdded, LocalTokenEngine, MeterEmulator, Verdict
from gateway.tariff import AmountAllToDebt
from gateway.vending import Vending, fbe_message, token_message
from tests.vending.vending_support import (
    PHONE,
    TARIFF,
    VENDING_KEY,
    FakeClock,
    FakeProvider,
    World,
    build_vending,
    make_drn,
    meter_record,
    profile_of,
    seed,
)

_POSTGRES_URL = "postgresql://127.0.0.1:5432/test"

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


@pytest.mark.parametrize(
    ("price_per_kwh_minor", "fixed_charge_minor", "units"),
    [
        (2500, 0, 50),  # the tariff kept: KES 145 / 1.16 / 25 = 5.0 kWh
        (5000, 0, 40),  # the price doubled: 2.5 kWh now, but 4.0 was quoted and paid for
        (2500, 20000, 40),  # a fixed charge above the amount: it would buy nothing now
    ],
)
async def test_a_debt_shrunk_and_a_tariff_changed_before_the_vend_never_give_less_than_quoted(
    world: World, price_per_kwh_minor: int, fixed_charge_minor: int, units: int
) -> None:
    """Quoted 4.0 kWh (KES 29 to the debt); the debt is cleared and the tariff changes; paid.

    Less went to the debt than planned, so the purchase buys at least what its quote promised:
    never fewer units than quoted (nor a vend failure of a paid purchase), the SMS says them.
    """
    await world.ledger.set_debt(
        world.drns[0], balance=Money(50000, "KES"), rate_basis_points=2000, actor="ops"
    )
    purchase = await world.vending.start_purchase(
        channel="ussd", phone=PHONE, meter=world.drns[0], amount=AMOUNT, idempotency_key="t"
    )
    assert purchase.units == 40
    await world.ledger.clear_debt(world.drns[0], actor="ops")
    await world.ledger.put_tariff(
        replace(
            TARIFF,
            price_per_kwh_minor=price_per_kwh_minor,
            fixed_charge_minor=fixed_charge_minor,
            max_purchase_minor=3_500_000,
        )
    )
    purchase = await world.vending.request_payment(purchase.purchase_id)
    assert purchase.provider_reference is not None
    world.provider.settle(purchase.provider_reference, amount=AMOUNT)
    confirmed = await world.vending.confirm(purchase.purchase_id)
    assert confirmed.state is PurchaseState.VENDED
    vend = await world.ledger.get_vend(purchase.purchase_id)
    assert vend is not None
    assert vend.units == units
    (message,) = await world.ledger.outbox_for(purchase.purchase_id)
    assert f"{units // 10}.{units % 10} kWh" in message.body
    assert isinstance(emulator(world).enter(vend.token).change, CreditAdded)


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


async def test_fbe_waits_for_a_purchase_with_a_phone_to_send_it_to(world: World) -> None:
    """A C2B payment with a masked MSISDN vends a HELD token, but leaves the month's FBE.

    The FBE token's SMS would be held with no reprint for it (an operator reads out only the
    credit token), and the month's FBE would be spent: the next purchase from a phone gets it.
    """
    await world.ledger.set_fbe_allowance("domestic", 50, actor="ops")
    world.provider.settle("RKTMASKED2", amount=Money(11600, "KES"), payer=None)
    await world.vending.on_payment_notice(
        PaymentNotice(
            provider=world.provider.name,
            reference=ProviderReference("RKTMASKED2"),
            claimed_state=PaymentState.SUCCEEDED,
            amount=Money(11600, "KES"),
            payer=None,  # Daraja v2 masks the MSISDN: 25470****149
            account_reference=world.drns[0],
            is_customer_initiated=True,
            raw=b'{"TransID":"RKTMASKED2","MSISDN":"25470****149"}',
        )
    )
    (held,) = await world.ledger.find_purchases(meter=world.drns[0])
    assert held.state is PurchaseState.VENDED
    assert [m.kind for m in await world.ledger.outbox_for(held.purchase_id)] == [MessageKind.TOKEN]
    assert await world.ledger.fbe_issues(world.drns[0]) == []
    purchase = await bought(world, "after-c2b", Money(11600, "KES"))
    (issue,) = await world.ledger.fbe_issues(world.drns[0])
    assert issue.purchase_id == purchase.purchase_id
    kinds = [m.kind for m in await world.ledger.outbox_for(purchase.purchase_id)]
    assert kinds == [MessageKind.TOKEN, MessageKind.FBE]


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
    services = SagaCustomerServices(world.vending, world.ledger)
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


async def test_two_instances_vend_one_meter_debt_and_fbe_once_units_agree(world: World) -> None:
    """Two saga instances (own locks) on one SQLite ledger: see ``_race_three``."""
    await _race_three(world, build_vending(world.ledger, world.provider, world.clock))


@pytest.mark.postgres
async def test_two_instances_on_postgres_vend_debt_and_fbe_once() -> None:
    """Two saga instances, each with its own PostgreSQL pool on one schema: see ``_race_three``."""
    schema = f"t_{uuid.uuid4().hex}"
    try:
        await create_schema(_POSTGRES_URL, schema)
    except LedgerUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL at {_POSTGRES_URL} does not answer ({exc})")
    clock, provider = FakeClock(), FakeProvider()
    try:
        async with (
            open_postgres_ledger(_POSTGRES_URL, clock=clock, schema=schema, max_size=4) as one,
            open_postgres_ledger(_POSTGRES_URL, clock=clock, schema=schema, max_size=4) as two,
        ):
            drns = [make_drn(i) for i in range(1, 4)]
            await seed(one, drns)
            vending = build_vending(one, provider, clock)
            world = World(one, vending, provider, clock, LocalTokenEngine([VENDING_KEY]), drns)
            await _race_three(world, build_vending(two, provider, clock))
    finally:
        await drop_schema(_POSTGRES_URL, schema)


async def _race_three(world: World, other: Vending) -> None:
    """Two saga instances race on three paid purchases of one meter, each vended three times.

    One token per purchase, the debt recovered once per purchase and never past the balance, one
    FBE token, TIDs distinct and the meter's last TID the highest; each vend's units are its SMS's
    and what the meter credits (docs/architecture.md, invariant 8).
    """
    await world.ledger.set_fbe_allowance("domestic", 50, actor="ops")
    await world.ledger.set_debt(
        world.drns[0], balance=Money(7000, "KES"), rate_basis_points=2000, actor="ops"
    )
    opened = []
    for key in ("r1", "r2", "r3"):
        purchase = await world.vending.start_purchase(
            channel="ussd", phone=PHONE, meter=world.drns[0], amount=AMOUNT, idempotency_key=key
        )
        purchase = await world.vending.request_payment(purchase.purchase_id)
        assert purchase.provider_reference is not None
        world.provider.settle(purchase.provider_reference, amount=AMOUNT)
        await world.ledger.mark_paid(
            purchase.purchase_id,
            ConfirmedPayment(
                provider="fakepay",
                reference=purchase.provider_reference,
                amount=AMOUNT,
                payer=None,
                receipt="RC" + key,
            ),
            actor="test",
        )
        opened.append(purchase.purchase_id)
    await asyncio.gather(
        *(saga.vend(p) for p in opened for saga in (world.vending, other, world.vending))
    )
    debt = await world.ledger.get_debt(world.drns[0])
    assert debt is not None
    recovered = sorted(
        r.amount.amount_minor for r in await world.ledger.debt_recoveries(world.drns[0])
    )
    assert recovered == [1200, 2900, 2900]
    assert (debt.balance.amount_minor, debt.recovered_total_minor) == (0, 7000)
    (fbe,) = await world.ledger.fbe_issues(world.drns[0])
    meter = emulator(world)
    tids = [fbe.tid]
    for purchase_id in opened:
        vend = await world.ledger.get_vend(purchase_id)
        assert vend is not None
        tids.append(vend.tid)
        messages = await world.ledger.outbox_for(purchase_id)
        token_sms = [m for m in messages if m.kind is MessageKind.TOKEN]
        assert len(token_sms) == 1
        assert f"{vend.units // 10}.{vend.units % 10}" in token_sms[0].body
        response = meter.enter(vend.token)
        assert isinstance(response.change, CreditAdded)
        assert response.change.amount == vend.units
        kinds = [e.kind for e in await world.ledger.timeline(purchase_id)]
        assert kinds.count("debt_recovered") == 1
    assert len(set(tids)) == len(tids)
    record = await world.ledger.get_meter(world.drns[0])
    assert record.last_tid == max(tids)
    fbe_sms = [
        m for p in opened for m in await world.ledger.outbox_for(p) if m.kind is MessageKind.FBE
    ]
    assert len(fbe_sms) == 1
    assert isinstance(meter.enter(fbe.token).change, CreditAdded)
