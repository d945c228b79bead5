"""Money as integer minor units plus an ISO 4217 currency: never a float.

``Money(amount_minor=5000, currency="KES")`` is KES 50.00. Arithmetic only combines amounts of the
same currency; ``Decimal`` appears only inside tariff arithmetic and formatting.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Final

#: Minor units per major unit for the currencies we serve (ISO 4217 exponent). Unknown → 2.
_EXPONENT: Final[dict[str, int]] = {
    "KES": 2,
    "TZS": 2,
    "UGX": 0,
    "RWF": 0,
    "GHS": 2,
    "NGN": 2,
    "ZMW": 2,
    "MWK": 2,
    "XOF": 0,
    "XAF": 0,
    "EUR": 2,
    "USD": 2,
    "ZAR": 2,
}


def currency_exponent(currency: str) -> int:
    """Digits after the decimal point for ``currency`` (ISO 4217), 2 when unknown."""
    return _EXPONENT.get(currency, 2)


@dataclass(frozen=True, slots=True, order=True)
class Money:
    """An exact amount: ``amount_minor`` integer minor units of ``currency`` (ISO 4217 code)."""

    amount_minor: int
    currency: str

    def __post_init__(self) -> None:
        if isinstance(self.amount_minor, bool) or not isinstance(self.amount_minor, int):
            msg = f"amount_minor must be an int, got {type(self.amount_minor).__name__}"
            raise TypeError(msg)
        if len(self.currency) != 3 or not self.currency.isalpha() or not self.currency.isupper():
            msg = f"currency must be a 3-letter ISO 4217 code, got {self.currency!r}"
            raise ValueError(msg)

    @classmethod
    def of(cls, major: str | int | Decimal, currency: str) -> Money:
        """Money from a major-unit amount such as ``"50"`` or ``"49.50"``.

        Raises:
            ValueError: the amount has more decimals than the currency allows, or is not a number.
        """
        exponent = currency_exponent(currency)
        try:
            value = Decimal(str(major).strip())
        except ArithmeticError as exc:
            raise ValueError(f"not an amount: {major!r}") from exc
        if not value.is_finite():
            raise ValueError(f"not an amount: {major!r}")
        try:
            exact = value.quantize(Decimal(1).scaleb(-exponent))
        except ArithmeticError as exc:  # far too large for any amount
            raise ValueError(f"not an amount: {major!r}") from exc
        if exact != value:
            raise ValueError(f"{major!r} has more than {exponent} decimals for {currency}")
        return cls(int(exact.scaleb(exponent)), currency)

    @property
    def major(self) -> Decimal:
        """The amount in major units, exact."""
        return Decimal(self.amount_minor).scaleb(-currency_exponent(self.currency))

    def _same(self, other: Money) -> None:
        if other.currency != self.currency:
            msg = f"cannot combine {self.currency} with {other.currency}"
            raise ValueError(msg)

    def __add__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.amount_minor + other.amount_minor, self.currency)

    def __sub__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.amount_minor - other.amount_minor, self.currency)

    def __str__(self) -> str:
        exponent = currency_exponent(self.currency)
        return f"{self.currency} {self.major:,.{exponent}f}"
