"""Money to units under a tariff: rounded down, never more than was paid."""

from __future__ import annotations

import bisect
from decimal import Decimal

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.money import Money
from gateway.tariff import (
    AmountAboveMaximum,
    AmountBelowMinimum,
    AmountBuysNothing,
    AmountBuysTooMuch,
    CurrencyMismatch,
    Tariff,
    quote,
)


def _carried(field: int) -> int:
    """The units a 16-bit STS amount field carries, from docs/sts.md §3.1 (not from the engine)."""
    exponent, mantissa = field >> 14, field & 0x3FFF
    offset = sum(2**14 * 10 ** (n - 1) for n in range(1, exponent + 1))
    return mantissa * 10**exponent + offset


#: Every amount a token can carry, ascending.
CARRIED = sorted({_carried(field) for field in range(1 << 16)})


def tariff(price: int = 2500, vat: int = 1600, fixed: int = 0) -> Tariff:
    """A KES tariff with the given price, VAT and fixed charge."""
    return Tariff(
        tariff_id="t",
        name="T",
        currency="KES",
        price_per_kwh_minor=price,
        vat_basis_points=vat,
        fixed_charge_minor=fixed,
        min_purchase_minor=100,
        max_purchase_minor=10_000_000,
    )


def test_worked_example() -> None:
    """KES 116 at KES 25/kWh + 16 % VAT buys 100 KES of energy: 4.0 kWh, VAT KES 16."""
    q = quote(tariff(), Money(11600, "KES"))
    assert q.units == 40
    assert q.kwh == Decimal(4)
    assert q.vat == Money(1600, "KES")
    assert q.energy == Money(10000, "KES")


def test_fixed_charge_comes_off_first() -> None:
    """A KES 10 fixed charge leaves KES 100 for energy (no VAT): 4.0 kWh at KES 25."""
    q = quote(tariff(vat=0, fixed=1000), Money(11000, "KES"))
    assert (q.units, q.fixed_charge, q.energy) == (40, Money(1000, "KES"), Money(10000, "KES"))


@given(
    amount=st.integers(min_value=100, max_value=10_000_000),
    price=st.integers(min_value=1, max_value=100_000),
    vat=st.integers(min_value=0, max_value=5000),
    fixed=st.integers(min_value=0, max_value=5000),
)
@example(amount=11600, price=2500, vat=1600, fixed=0)
@example(amount=3_500_000, price=1000, vat=1600, fixed=0)  # 30,172.4 units paid for
@example(amount=10_000_000, price=300, vat=0, fixed=0)  # 333,333.3 units: steps of 100
@example(amount=10_000_000, price=50, vat=0, fixed=0)  # 2,000,000 units: steps of 1000
def test_units_never_exceed_what_was_paid(amount: int, price: int, vat: int, fixed: int) -> None:
    """Units a token carries, costing at most the amount; the next carried amount costs more."""
    try:
        q = quote(tariff(price, vat, fixed), Money(amount, "KES"))
    except (AmountBuysNothing, AmountBuysTooMuch):
        return
    factor = 1 + Decimal(vat) / 10_000

    def cost(units: int) -> Decimal:
        return Decimal(units) * price / 10 * factor + fixed

    assert q.units in CARRIED
    above = CARRIED[bisect.bisect_right(CARRIED, q.units)]
    assert cost(q.units) <= amount < cost(above)
    assert q.energy.amount_minor + q.vat.amount_minor + q.fixed_charge.amount_minor == amount


def test_a_quote_above_16383_units_is_what_the_token_carries() -> None:
    """Issue 16: KES 35,000 at KES 10/kWh + 16 % VAT pays for 30,172 units: quoted 30,164.

    A token carries 30,164 or 30,174 there (steps of 10 from 16,384): never 30,174.
    """
    q = quote(tariff(price=1000), Money(3_500_000, "KES"))
    assert q.units == 16384 + (30172 - 16384) // 10 * 10
    assert q.kwh == Decimal("3016.4")


def test_an_amount_buying_more_than_a_token_carries_is_refused() -> None:
    """Over 18,201,624 units (1,820,162.4 kWh) no token can carry it: refused with a reason."""
    with pytest.raises(AmountBuysTooMuch, match="more than one token carries") as refused:
        quote(tariff(price=1, vat=0), Money(2_000_000, "KES"))
    most = refused.value.maximum
    assert quote(tariff(price=1, vat=0), most).units <= 18_201_624
    with pytest.raises(AmountBuysTooMuch):
        quote(tariff(price=1, vat=0), Money(most.amount_minor + 1, "KES"))


def test_range_and_currency_are_enforced() -> None:
    """Below the minimum, above the maximum and in another currency are refused with reasons."""
    with pytest.raises(AmountBelowMinimum) as low:
        quote(tariff(), Money(99, "KES"))
    assert low.value.minimum == Money(100, "KES")
    with pytest.raises(AmountAboveMaximum):
        quote(tariff(), Money(10_000_001, "KES"))
    with pytest.raises(CurrencyMismatch):
        quote(tariff(), Money(5000, "UGX"))


def test_amount_eaten_by_fixed_charge_buys_nothing() -> None:
    """An amount no larger than the fixed charge is refused rather than vending zero units."""
    with pytest.raises(AmountBuysNothing):
        quote(tariff(fixed=5000), Money(5000, "KES"))
