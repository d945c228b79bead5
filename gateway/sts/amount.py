"""Transfer amounts: the exponent/mantissa encodings of IEC 62055-41 (docs/sts.md §3.1).

Units amount (16 bits; class 0 subclasses 0-3, and the power limits of class 2 subclasses 0
and 6): exponent ``e`` (bits 15..14) and mantissa ``m`` (bits 13..0) stand for::

    t = m * 10**e + OFFSET[e],    OFFSET[e] = sum(2**14 * 10**(n - 1) for n in 1..e)

so the four ranges are contiguous, from 0 to 18 201 624 base units. Encoding rounds **up** (the
customer gets at most one step more, never less) and may carry into the next exponent
(180 223 encodes as e=2, m=0, i.e. 180 224). Above 16 383 not every amount is encodable (steps
of 10, 100, 1000): a seller rounds what was paid for *down* with :func:`round_units_down`, so
the token carries exactly the units sold.

Currency amount (20 bits; class 0 subclasses 4-7): sign (1 = negative), 5-bit exponent and
14-bit mantissa, in units of 0.00001 of the currency. Positive amounts round up, negative
amounts round their magnitude down: both in the customer's favour.
"""

from __future__ import annotations

from typing import Final

from gateway.sts.bits import Field, Layout, pack, unpack
from gateway.sts.errors import AmountNotEncodable

MANTISSA_BITS: Final = 14
MANTISSA_MAX: Final = 2**MANTISSA_BITS - 1  # 16383

#: The 16-bit units amount field, as the standard draws it.
UNITS_AMOUNT: Final = Layout("amount", Field("exponent", 2), Field("mantissa", 14))

#: The 20-bit currency amount value (sign, exponent, mantissa) before it is spread over the
#: block (docs/sts.md §3.1: S and e4..e2 sit in the RND nibble, e1 e0 and m in the amount field).
CURRENCY_AMOUNT: Final = Layout(
    "currency amount", Field("sign", 1), Field("exponent", 5), Field("mantissa", 14)
)


def _offsets(count: int) -> tuple[int, ...]:
    # OFFSET[e] = sum_{n=1..e} 2^14 * 10^(n-1)
    return tuple(
        sum(2**MANTISSA_BITS * 10 ** (n - 1) for n in range(1, e + 1)) for e in range(count)
    )


_POWERS: Final[tuple[int, ...]] = tuple(10**e for e in range(32))
UNITS_OFFSETS: Final = _offsets(4)  # (0, 16384, 180224, 1818624)
CURRENCY_OFFSETS: Final = _offsets(32)

#: The largest units amount: 18 201 624 base units (1 820 162.4 kWh).
UNITS_MAX: Final = MANTISSA_MAX * 10**3 + UNITS_OFFSETS[3]
#: The largest currency magnitude, in 0.00001 currency units.
CURRENCY_MAX: Final = MANTISSA_MAX * 10**31 + CURRENCY_OFFSETS[31]


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _choose(magnitude: int, offsets: tuple[int, ...], *, round_up: bool) -> tuple[int, int]:
    """The smallest exponent whose mantissa fits, and that mantissa."""
    for exponent, offset in enumerate(offsets):
        scale = _POWERS[exponent]
        if round_up:
            mantissa = max(0, _ceil_div(magnitude - offset, scale))
        else:
            if magnitude < offset:
                break  # cannot happen for contiguous ranges; kept as a guard
            mantissa = (magnitude - offset) // scale
        if mantissa <= MANTISSA_MAX:
            return exponent, mantissa
    raise AssertionError("caller checked the maximum")  # pragma: no cover


def encode_units(units: int) -> int:
    """The 16-bit amount field for ``units`` base units, rounded up to the next encodable value.

    Raises:
        AmountNotEncodable: ``units`` is negative or above :data:`UNITS_MAX`.
    """
    if units < 0:
        raise AmountNotEncodable("amount", units, "a units amount cannot be negative")
    if units > UNITS_MAX:
        raise AmountNotEncodable(
            "amount", units, f"the largest encodable units amount is {UNITS_MAX} base units"
        )
    if units <= MANTISSA_MAX:  # e = 0, m = t: most credits, kept fast for bulk vending
        return units
    exponent, mantissa = _choose(units, UNITS_OFFSETS, round_up=True)
    return pack(UNITS_AMOUNT, {"exponent": exponent, "mantissa": mantissa})


def decode_units(field: int) -> int:
    """The amount in base units that the 16-bit amount ``field`` stands for."""
    parts = unpack(UNITS_AMOUNT, field)
    exponent = parts["exponent"]
    return parts["mantissa"] * _POWERS[exponent] + UNITS_OFFSETS[exponent]


def round_units(units: int) -> int:
    """The amount a token for ``units`` actually carries: the smallest encodable value >= units."""
    return decode_units(encode_units(units))


def round_units_down(units: int) -> int:
    """The largest encodable units amount not above ``units`` (what a seller may sell).

    Every value from 0 to 16 383 is encodable; above, the steps are 10, 100 and 1000 units.
    ``round_units(round_units_down(u)) == round_units_down(u) <= u`` for every ``u >= 0``.

    Raises:
        AmountNotEncodable: ``units`` is negative or above :data:`UNITS_MAX`.
    """
    if units < 0:
        raise AmountNotEncodable("amount", units, "a units amount cannot be negative")
    if units > UNITS_MAX:
        raise AmountNotEncodable(
            "amount", units, f"the largest encodable units amount is {UNITS_MAX} base units"
        )
    exponent, mantissa = _choose(units, UNITS_OFFSETS, round_up=False)
    return mantissa * _POWERS[exponent] + UNITS_OFFSETS[exponent]


def encode_currency(amount: int) -> int:
    """The 20-bit currency value (sign, exponent, mantissa) for ``amount`` 0.00001 units.

    Rounds in the customer's favour: a credit up, a debit's magnitude down.

    Raises:
        AmountNotEncodable: the magnitude is above :data:`CURRENCY_MAX` (after rounding).
    """
    negative = amount < 0
    magnitude = -amount if negative else amount
    if magnitude > CURRENCY_MAX:
        raise AmountNotEncodable(
            "amount",
            amount,
            f"the largest encodable currency magnitude is {CURRENCY_MAX} (0.00001 units)",
        )
    exponent, mantissa = _choose(magnitude, CURRENCY_OFFSETS, round_up=not negative)
    return pack(
        CURRENCY_AMOUNT, {"sign": int(negative), "exponent": exponent, "mantissa": mantissa}
    )


def decode_currency(value: int) -> int:
    """The signed amount, in 0.00001 currency units, that the 20-bit currency ``value`` holds."""
    parts = unpack(CURRENCY_AMOUNT, value)
    exponent = parts["exponent"]
    magnitude = parts["mantissa"] * _POWERS[exponent] + CURRENCY_OFFSETS[exponent]
    return -magnitude if parts["sign"] else magnitude


def round_currency(amount: int) -> int:
    """The amount a currency token for ``amount`` carries (rounded in the customer's favour)."""
    return decode_currency(encode_currency(amount))
