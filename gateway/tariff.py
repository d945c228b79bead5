"""Money to units: a meter's tariff turns what the customer pays into tenths of a kWh.

The customer pays ``amount``. A fixed charge per purchase comes off first; what remains includes
VAT, so the energy part is ``(amount - fixed) / (1 + vat)``; that buys ``energy / price`` kWh,
rounded *down* to 0.1 kWh (the STS credit unit), so a customer is never vended more than was paid.
Above 1,638.3 kWh (16,383 units) a token can only carry every 10th, 100th or 1000th unit (the
STS amount's 14-bit mantissa and decimal exponent): the units are rounded down again, to the
largest amount a token carries exactly, so the quote, the ledger, the SMS and the meter's credit
are one number (docs/architecture.md invariant 8).
``Decimal`` appears only inside this arithmetic; amounts in and out are integer minor units.

```
TariffError                  gateway.errors.GatewayError
  CurrencyMismatch           the amount is not in the tariff's currency
  AmountBelowMinimum         below the tariff's minimum purchase (``minimum`` attribute)
  AmountAboveMaximum         above the tariff's maximum purchase (``maximum`` attribute)
    AmountBuysTooMuch        it buys more than one token can carry (over 1,820,162.4 kWh)
  AmountBuysNothing          after the fixed charge and VAT it buys less than 0.1 kWh
    AmountAllToDebt          the meter's debt recovery leaves too little to buy 0.1 kWh
```

Debt recovery (XMLVend's ``DebtRecoveryTx``): a meter may owe the utility money. Each purchase
gives ``DebtTerms.recovery(amount)`` of its amount to that debt, *before* the fixed charge and
VAT, so ``energy + vat + fixed_charge + debt_recovered == amount`` exactly. The recovery is the
purchase's share at ``rate_basis_points`` rounded down, raised to the per-purchase minimum,
lowered to the per-purchase cap, and never more than what is owed nor than the amount itself.
An amount that would go (almost) entirely to the debt is refused with ``AmountAllToDebt``, which
names the smallest amount that buys energy: a token of zero units is never vended.
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


class AmountAllToDebt(AmountBuysNothing):
    """What the debt recovery leaves of the amount buys less than one unit.

    Attributes:
        amount: what the customer offered. ``recovered``: what would go to the debt.
        balance: what the meter owes. ``minimum``: the smallest amount in the tariff's range that
            buys energy after recovery (None when none does: the whole range goes to the debt).
    """

    def __init__(
        self, amount: Money, recovered: Money, balance: Money, minimum: Money | None
    ) -> None:
        needs = f"; the smallest amount that buys energy is {minimum}" if minimum else ""
        super().__init__(
            f"{amount}: {recovered} goes to the meter's debt of {balance}, too little is left"
            f" for 0.1 kWh{needs}"
        )
        self.amount = amount
        self.recovered = recovered
        self.balance = balance
        self.minimum = minimum


@dataclass(frozen=True, slots=True, kw_only=True)
class DebtTerms:
    """A meter's debt as a purchase sees it: what is owed and how each purchase recovers it.

    Attributes:
        balance_minor: what the meter owes, in minor units of ``currency`` (never negative).
        rate_basis_points: the share of each purchase taken (2500 = 25 %, 10000 = all of it).
        min_per_purchase_minor: take at least this much from each purchase (0: no minimum).
        cap_per_purchase_minor: take at most this much from each purchase (None: no cap).
    """

    balance_minor: int
    currency: str
    rate_basis_points: int
    min_per_purchase_minor: int = 0
    cap_per_purchase_minor: int | None = None

    def __post_init__(self) -> None:
        if self.balance_minor < 0:
            raise ValueError(f"a debt balance cannot be negative, got {self.balance_minor}")
        if not 0 <= self.rate_basis_points <= _BASIS_POINTS:
            raise ValueError(f"rate must be 0 to 10000 basis points, got {self.rate_basis_points}")
        if self.min_per_purchase_minor < 0:
            raise ValueError("the per-purchase minimum cannot be negative")
        cap = self.cap_per_purchase_minor
        if cap is not None and (cap <= 0 or cap < self.min_per_purchase_minor):
            raise ValueError(f"the per-purchase cap must be positive and >= the minimum, got {cap}")

    @property
    def balance(self) -> Money:
        """What the meter owes."""
        return Money(self.balance_minor, self.currency)

    def recovery(self, amount_minor: int) -> int:
        """The minor units of a purchase of ``amount_minor`` that go to the debt.

        ``floor(amount * rate)``, at least the minimum, at most the cap, what is owed and the
        amount itself.
        """
        share = amount_minor * self.rate_basis_points // int(_BASIS_POINTS)
        share = max(share, self.min_per_purchase_minor)
        if self.cap_per_purchase_minor is not None:
            share = min(share, self.cap_per_purchase_minor)
        return max(0, min(share, self.balance_minor, amount_minor))


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
    carries exactly; ``energy + vat + fixed_charge + debt_recovered`` equals ``amount`` exactly.
    ``debt_recovered`` and ``debt_remaining`` (what the meter still owes after this purchase) are
    None when the meter owes nothing.
    """

    amount: Money
    fixed_charge: Money
    vat: Money
    energy: Money
    units: int
    tariff_id: str
    debt_recovered: Money | None = None
    debt_remaining: Money | None = None

    @property
    def debt_recovered_minor(self) -> int:
        """What goes to the meter's debt, in minor units (0 without a debt)."""
        return self.debt_recovered.amount_minor if self.debt_recovered is not None else 0

    @property
    def kwh(self) -> Decimal:
        """The energy bought, in kWh (one decimal)."""
        return Decimal(self.units) / UNITS_PER_KWH


def quote(tariff: Tariff, amount: Money, *, debt: DebtTerms | None = None) -> Quote:
    """Turn ``amount`` into units under ``tariff``, rounding down to what a token carries.

    Down to 0.1 kWh, and above 16,383 units down to the STS amount's step (10, 100 or 1000
    units): never more than was paid for, and exactly what the token will credit.

    With ``debt`` (the meter owes money), its recovery comes off the amount first.

    Raises:
        CurrencyMismatch: ``amount`` (or the debt) is not in the tariff's currency.
        AmountBelowMinimum, AmountAboveMaximum: outside the tariff's purchase range.
        AmountAllToDebt: the debt recovery leaves too little to buy 0.1 kWh.
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
    if debt is None or debt.balance_minor == 0:
        return price(tariff, amount)
    if debt.currency != tariff.currency:
        raise CurrencyMismatch(f"the debt is in {debt.currency}, tariff {tariff.tariff_id} not")
    recovered = debt.recovery(amount.amount_minor)
    if recovered > 0 and _units(tariff, amount.amount_minor - recovered) <= 0:
        raise AmountAllToDebt(
            amount,
            Money(recovered, tariff.currency),
            debt.balance,
            _smallest_buying(tariff, debt, amount.amount_minor + 1),
        )
    return price(
        tariff, amount, debt_recovered_minor=recovered, debt_balance_minor=debt.balance_minor
    )


def _units(tariff: Tariff, after_debt: int) -> int:
    """The units ``after_debt`` minor units buy after the fixed charge and VAT (0 if none)."""
    net = after_debt - tariff.fixed_charge_minor
    if net <= 0:
        return 0
    vat_factor = 1 + Decimal(tariff.vat_basis_points) / _BASIS_POINTS
    return int(
        (Decimal(net) / vat_factor * UNITS_PER_KWH / tariff.price_per_kwh_minor).to_integral_value(
            ROUND_DOWN
        )
    )


def _smallest_buying(tariff: Tariff, debt: DebtTerms, low: int) -> Money | None:
    """The smallest amount in [``low``, maximum] that still buys energy after recovery.

    What is left after recovery never shrinks as the amount grows, so a binary search finds it.
    """
    high = tariff.max_purchase_minor
    if low > high or _units(tariff, high - debt.recovery(high)) <= 0:
        return None
    while low < high:
        middle = (low + high) // 2
        if _units(tariff, middle - debt.recovery(middle)) > 0:
            high = middle
        else:
            low = middle + 1
    return Money(low, tariff.currency)


def price(
    tariff: Tariff,
    amount: Money,
    *,
    debt_recovered_minor: int = 0,
    debt_balance_minor: int = 0,
) -> Quote:
    """The breakdown of ``amount``, ``debt_recovered_minor`` of it going to a debt.

    ``debt_balance_minor`` is what the meter owed before this purchase. No purchase-range checks:
    the vend step re-prices a purchase already accepted.

    Steps: (1) the debt recovery comes off the amount; (2) the fixed charge; (3) what remains
    includes VAT: energy = remains / (1 + vat); (4) units = energy / price, rounded down to what
    a token carries (``round_units_down``).

    Raises:
        AmountBuysNothing: what is left buys less than 0.1 kWh.
    """
    if not 0 <= debt_recovered_minor <= min(amount.amount_minor, max(debt_balance_minor, 0)):
        raise ValueError(f"cannot recover {debt_recovered_minor} of {amount} from that debt")
    net = amount.amount_minor - debt_recovered_minor - tariff.fixed_charge_minor
    if net <= 0:
        raise AmountBuysNothing(f"{amount} does not cover the fixed charge of tariff {tariff.name}")
    vat_factor = 1 + Decimal(tariff.vat_basis_points) / _BASIS_POINTS
    energy_exact = Decimal(net) / vat_factor
    paid_for = int(
        (energy_exact * UNITS_PER_KWH / tariff.price_per_kwh_minor).to_integral_value(ROUND_DOWN)
    )
    if paid_for > UNITS_MAX:
        most = UNITS_MAX * vat_factor * tariff.price_per_kwh_minor / UNITS_PER_KWH
        most_minor = (
            int(most.to_integral_value(ROUND_DOWN))
            + tariff.fixed_charge_minor
            + debt_recovered_minor
        )
        raise AmountBuysTooMuch(amount, Money(most_minor, tariff.currency))
    units = round_units_down(max(paid_for, 0))
    if units <= 0:
        raise AmountBuysNothing(f"{amount} buys less than 0.1 kWh under tariff {tariff.name}")
    energy_minor = int(energy_exact.to_integral_value(ROUND_DOWN))
    in_debt = debt_balance_minor > 0
    return Quote(
        amount=amount,
        fixed_charge=Money(tariff.fixed_charge_minor, tariff.currency),
        vat=Money(net - energy_minor, tariff.currency),
        energy=Money(energy_minor, tariff.currency),
        units=units,
        tariff_id=tariff.tariff_id,
        debt_recovered=Money(debt_recovered_minor, tariff.currency) if in_debt else None,
        debt_remaining=(
            Money(debt_balance_minor - debt_recovered_minor, tariff.currency) if in_debt else None
        ),
    )
