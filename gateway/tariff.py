"""Money to units: a meter's tariff turns what the customer pays into tenths of a kWh.

The customer pays ``amount``. A fixed charge per purchase comes off first; what remains includes
VAT, so the energy part is ``(amount - fixed) / (1 + vat)``; that buys ``energy / price`` kWh,
rounded *down* to 0.1 kWh (the STS credit unit), so a customer is never vended more than was paid.
Above 1,638.3 kWh (16,383 units) a token can only carry every 10th, 100th or 1000th unit (the
STS amount's 14-bit mantissa and decimal exponent): the units are rounded down again, to the
largest amount a token carries exactly, so the quote, the ledger, the SMS and the meter's credit
are one number (DESIGN.md invariant 8).
``Decimal`` appears only inside this arithmetic; amounts in and out are integer minor units.

```
TariffError                  gateway.errors.GatewayError
  CurrencyMismatch           the amount is not in the tariff's currency
  AmountBelowMinimum         below the tariff's minimum purchase (``minimum`` attribute)
  AmountAboveMaximum         above the tariff's maximum purchase (``maximum`` attribute)
  AmountBuysNothing          after the fixed charge and VAT it buys less than 0.1 kWh
    AmountBuysTooMuch        it buys more than one token can carry (over 1,820,162.4 kWh)
```
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from typing import Final

from gateway.errors import GatewayError
from gateway.money import Money
from gateway.sts.amount import UNITS_MAX, round_units_down

#: One STS credit unit is 0.1 kWh (IEC 62055-41, electricity transfer amount resolution).
UNITS_PER_KWH: Final = 10
_BASIS_POINTS: Final = Decimal(10_000)


class TariffError(GatewayError):
    """An amount cannot be sold under the tariff; the message says why, for operators."""


class CurrencyMismatch(TariffError):
    """The amount's currency is not the tariff's."""


class AmountBelowMinimum(TariffError):
    """The amount is below the tariff's minimum purchase."""

    def __init__(self, amount: Money, minimum: Money) -> None:
        super().__init__(f"{amount} is below the minimum purchase of {minimum}")
        self.amount = amount
        self.minimum = minimum


class AmountAboveMaximum(TariffError):
    """The amount is above the tariff's maximum purchase."""

    def __init__(self, amount: Money, maximum: Money) -> None:
        super().__init__(f"{amount} is above the maximum purchase of {maximum}")
        self.amount = amount
        self.maximum = maximum


class AmountBuysNothing(TariffError):
    """After the fixed charge and VAT the amount buys less than one unit (0.1 kWh)."""


class AmountBuysTooMuch(AmountAboveMaximum):
    """The amount buys more units than one STS token carries; ``maximum`` is the most it may be."""

    def __init__(self, amount: Money, maximum: Money) -> None:
        TariffError.__init__(
            self,
            f"{amount} buys more than one token carries ({UNITS_MAX} units); the most one"
            f" purchase may be is {maximum}",
        )
        self.amount = amount
        self.maximum = maximum


@dataclass(frozen=True, slots=True, kw_only=True)
class Tariff:
    """The price of energy for a group of meters.

    Attributes:
        tariff_id: the utility's identifier for the tariff.
        price_per_kwh_minor: price of one kWh before VAT, in minor units of ``currency``.
        vat_basis_points: VAT rate in basis points (1600 = 16 %), included in what customers pay.
        fixed_charge_minor: charge taken from every purchase before energy (VAT-inclusive).
        min_purchase_minor, max_purchase_minor: the accepted purchase range, inclusive.
    """

    tariff_id: str
    name: str
    currency: str
    price_per_kwh_minor: int
    vat_basis_points: int = 0
    fixed_charge_minor: int = 0
    min_purchase_minor: int
    max_purchase_minor: int

    def __post_init__(self) -> None:
        if self.price_per_kwh_minor <= 0:
            raise ValueError(
                f"price_per_kwh_minor must be positive, got {self.price_per_kwh_minor}"
            )
        if self.vat_basis_points < 0 or self.fixed_charge_minor < 0:
            raise ValueError("VAT and fixed charge must not be negative")
        if not 0 < self.min_purchase_minor <= self.max_purchase_minor:
            raise ValueError(
                f"need 0 < minimum <= maximum, got {self.min_purchase_minor}"
                f" and {self.max_purchase_minor}"
            )

    @property
    def minimum(self) -> Money:
        """The smallest accepted purchase."""
        return Money(self.min_purchase_minor, self.currency)

    @property
    def maximum(self) -> Money:
        """The largest accepted purchase."""
        return Money(self.max_purchase_minor, self.currency)


@dataclass(frozen=True, slots=True, kw_only=True)
class Quote:
    """What an amount buys: the breakdown a receipt shows.

    ``units`` is in tenths of a kWh (the token's transfer amount), always an amount a token
    carries exactly; ``energy + vat + fixed_charge`` equals ``amount`` exactly.
    """

    amount: Money
    fixed_charge: Money
    vat: Money
    energy: Money
    units: int
    tariff_id: str

    @property
    def kwh(self) -> Decimal:
        """The energy bought, in kWh (one decimal)."""
        return Decimal(self.units) / UNITS_PER_KWH


def quote(tariff: Tariff, amount: Money) -> Quote:
    """Turn ``amount`` into units under ``tariff``, rounding down to what a token carries.

    Down to 0.1 kWh, and above 16,383 units down to the STS amount's step (10, 100 or 1000
    units): never more than was paid for, and exactly what the token will credit.

    Raises:
        CurrencyMismatch: ``amount`` is not in the tariff's currency.
        AmountBelowMinimum, AmountAboveMaximum: outside the tariff's purchase range.
        AmountBuysNothing: the amount is used up by the fixed charge and VAT.
        AmountBuysTooMuch: the units are more than one token can carry.
    """
    if amount.currency != tariff.currency:
        raise CurrencyMismatch(
            f"tariff {tariff.tariff_id} sells in {tariff.currency}, got {amount.currency}"
        )
    if amount.amount_minor < tariff.min_purchase_minor:
        raise AmountBelowMinimum(amount, tariff.minimum)
    if amount.amount_minor > tariff.max_purchase_minor:
        raise AmountAboveMaximum(amount, tariff.maximum)
    net = amount.amount_minor - tariff.fixed_charge_minor
    if net <= 0:
        raise AmountBuysNothing(f"{amount} does not cover the fixed charge of tariff {tariff.name}")
    vat_factor = 1 + Decimal(tariff.vat_basis_points) / _BASIS_POINTS
    energy_exact = Decimal(net) / vat_factor
    paid_for = int(
        (energy_exact * UNITS_PER_KWH / tariff.price_per_kwh_minor).to_integral_value(ROUND_DOWN)
    )
    if paid_for > UNITS_MAX:
        most = UNITS_MAX * vat_factor * tariff.price_per_kwh_minor / UNITS_PER_KWH
        most_minor = int(most.to_integral_value(ROUND_DOWN)) + tariff.fixed_charge_minor
        raise AmountBuysTooMuch(amount, Money(most_minor, tariff.currency))
    units = round_units_down(max(paid_for, 0))
    if units <= 0:
        raise AmountBuysNothing(f"{amount} buys less than 0.1 kWh under tariff {tariff.name}")
    energy_minor = int(energy_exact.to_integral_value(ROUND_DOWN))
    return Quote(
        amount=amount,
        fixed_charge=Money(tariff.fixed_charge_minor, tariff.currency),
        vat=Money(net - energy_minor, tariff.currency),
        energy=Money(energy_minor, tariff.currency),
        units=units,
        tariff_id=tariff.tariff_id,
    )
