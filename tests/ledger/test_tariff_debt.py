"""Debt recovery in the quote: exact money, recovered first, never more than owed or paid."""

from __future__ import annotations

from decimal import ROUND_DOWN, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.money import Money
from gateway.sts.amount import UNITS_MAX
from gateway.tariff import (
    AmountAllToDebt,
    AmountBuysNothing,
    AmountBuysTooMuch,
    DebtTerms,
    Tariff,
    price,
    quote,
)


def tariff(price_minor: int = 2500, vat: int = 1600, fixed: int = 0) -> Tariff:
    """A KES tariff (purchases KES 1 to KES 100,000)."""
    return Tariff(
        tariff_id="t",
        name="T",
        currency="KES",
        price_per_kwh_minor=price_minor,
        vat_basis_points=vat,
        fixed_charge_minor=fixed,
        min_purchase_minor=100,
        max_purchase_minor=10_000_000,
    )


def debt(balance: int, rate: int, minimum: int = 0, cap: int | None = None) -> DebtTerms:
    """KES debt terms."""
    return DebtTerms(
        balance_minor=balance,
        currency="KES",
        rate_basis_points=rate,
        min_per_purchase_minor=minimum,
        cap_per_purchase_minor=cap,
    )


def test_worked_example() -> None:
    """KES 145 with 20 % to a KES 500 debt: KES 29 recovered, KES 116 buys 4.0 kWh + KES 16 VAT."""
    q = quote(tariff(), Money(14500, "KES"), debt=debt(50000, 2000))
    assert q.debt_recovered == Money(2900, "KES")
    assert q.debt_remaining == Money(47100, "KES")
    assert q.units == 40
    assert q.energy == Money(10000, "KES")
    assert q.vat == Money(1600, "KES")


def test_recovery_is_capped_by_the_cap_and_the_balance() -> None:
    """20 % of KES 1,000 is KES 200; the cap says KES 50; a KES 30 debt takes KES 30."""
    assert debt(10**9, 2000, cap=5000).recovery(100000) == 5000
    assert debt(3000, 2000, cap=5000).recovery(100000) == 3000
    assert debt(10**9, 100, minimum=2000).recovery(10000) == 2000


def test_no_debt_leaves_the_quote_as_it_was() -> None:
    """A zero balance quotes exactly as without a debt, with no debt fields."""
    plain = quote(tariff(), Money(11600, "KES"))
    owed_nothing = quote(tariff(), Money(11600, "KES"), debt=debt(0, 5000))
    assert plain == owed_nothing
    assert plain.debt_recovered is None


def test_amount_all_to_debt_names_the_smallest_amount_that_buys() -> None:
    """At 100 % to a KES 100 debt, KES 50 buys nothing; KES 100.29 is the least that buys 0.1 kWh.

    0.1 kWh at KES 25/kWh is KES 2.50 of energy, KES 2.90 with VAT: 100 + 2.90 = KES 102.90.
    """
    with pytest.raises(AmountAllToDebt) as caught:
        quote(tariff(), Money(5000, "KES"), debt=debt(10000, 10000))
    assert caught.value.recovered == Money(5000, "KES")
    assert caught.value.minimum == Money(10290, "KES")
    assert isinstance(caught.value, AmountBuysNothing)
    bought = quote(tariff(), Money(10290, "KES"), debt=debt(10000, 10000))
    assert bought.units == 1
    with pytest.raises(AmountAllToDebt):
        quote(tariff(), Money(10289, "KES"), debt=debt(10000, 10000))


@given(
    amount=st.integers(100, 10_000_000),
    balance=st.integers(0, 10**8),
    rate=st.integers(0, 10_000),
    minimum=st.integers(0, 5_000),
    cap_extra=st.none() | st.integers(0, 10**6),
    fixed=st.integers(0, 2_000),
    vat=st.integers(0, 3_000),
    price_minor=st.integers(1, 100_000),
)
def test_money_is_exact_and_recovery_bounded(
    amount: int,
    balance: int,
    rate: int,
    minimum: int,
    cap_extra: int | None,
    fixed: int,
    vat: int,
    price_minor: int,
) -> None:
    """Energy + VAT + fixed + recovered == paid; recovered <= paid, <= owed; units rounded down."""
    cap = None if cap_extra is None else max(1, minimum) + cap_extra
    terms = debt(balance, rate, minimum, cap)
    paid = Money(amount, "KES")
    try:
        q = quote(tariff(price_minor, vat, fixed), paid, debt=terms)
    except AmountBuysNothing:
        return
    except AmountBuysTooMuch:  # only when the rest buys more than a token carries
        rest = Decimal(amount - terms.recovery(amount) - fixed) / (1 + Decimal(vat) / 10_000)
        assert int((rest * 10 / price_minor).to_integral_value(ROUND_DOWN)) > UNITS_MAX
        return
    recovered = q.debt_recovered_minor
    assert q.energy.amount_minor + q.vat.amount_minor + q.fixed_charge.amount_minor + recovered == (
        amount
    )
    assert 0 <= recovered <= min(amount, balance)
    assert recovered <= max(amount * rate // 10_000, minimum)
    if cap is not None:
        assert recovered <= cap
    if balance:
        assert q.debt_remaining == Money(balance - recovered, "KES")
    # Independently: the units the rest buys, rounded down, then down to what a token carries.
    net = Decimal(amount - recovered - fixed) / (1 + Decimal(vat) / 10_000)
    assert q.units == _carried_floor(int((net * 10 / price_minor).to_integral_value(ROUND_DOWN)))


def _carried_floor(units: int) -> int:
    """The largest STS amount ``m * 10^e + offset(e)`` (14-bit ``m``) not above ``units``."""
    for e in range(4):
        offset = sum(2**14 * 10 ** (n - 1) for n in range(1, e + 1))
        mantissa = (units - offset) // 10**e
        if mantissa <= 16383:
            return mantissa * 10**e + offset
    raise AssertionError(units)


@given(
    amount=st.integers(100, 1_000_000), balance=st.integers(1, 10**6), rate=st.integers(1, 10_000)
)
def test_minimum_named_is_the_least_that_buys(amount: int, balance: int, rate: int) -> None:
    """When refused, the named minimum buys and one minor unit less does not."""
    terms = debt(balance, rate)
    refused: AmountAllToDebt | None = None
    try:
        quote(tariff(), Money(amount, "KES"), debt=terms)
    except AmountAllToDebt as exc:
        refused = exc
    except AmountBuysNothing:
        return  # too little even without a debt
    if refused is None:
        return
    minimum = refused.minimum
    assert minimum is not None
    assert minimum.amount_minor > amount
    assert quote(tariff(), minimum, debt=terms).units > 0
    with pytest.raises(AmountBuysNothing):
        quote(tariff(), minimum - Money(1, "KES"), debt=terms)


def test_price_refuses_recovering_more_than_owed() -> None:
    """The vend step's re-pricing cannot recover more than the balance."""
    with pytest.raises(ValueError, match="cannot recover"):
        price(tariff(), Money(10000, "KES"), debt_recovered_minor=600, debt_balance_minor=500)
