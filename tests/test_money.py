from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.money import Money


def test_money_from_major_units_is_exact() -> None:
    """``Money.of('49.50', 'KES')`` is 4950 minor units."""
    assert Money.of("49.50", "KES") == Money(4950, "KES")
    assert str(Money(4950, "KES")) == "KES 49.50"


def test_too_many_decimals_are_refused() -> None:
    """An amount finer than the currency's minor unit is an error, never rounded silently."""
    with pytest.raises(ValueError, match="decimals"):
        Money.of("1.005", "KES")


@pytest.mark.parametrize("text", ["1e999999999", "1e-999999999", "NaN", "Infinity", "", "12a"])
def test_absurd_amounts_are_value_errors(text: str) -> None:
    """Overflowing, underflowing and non-numeric amounts are refused with ValueError."""
    with pytest.raises(ValueError, match=r"amount|decimals"):
        Money.of(text, "KES")


def test_currencies_do_not_mix() -> None:
    """Adding KES to UGX raises."""
    with pytest.raises(ValueError, match="cannot combine"):
        _ = Money(1, "KES") + Money(1, "UGX")


def test_float_is_refused() -> None:
    """A float amount is a type error: money is never a float."""
    with pytest.raises(TypeError):
        Money(1.5, "KES")  # type: ignore[arg-type]


@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_major_round_trips(minor: int) -> None:
    """Minor units → major → minor gives the same amount."""
    money = Money(minor, "KES")
    assert Money.of(money.major, "KES") == money
    assert money.major == Decimal(minor) / 100
