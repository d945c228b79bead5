"""Checks on what customers type: meter numbers, amounts, nicknames.

A meter number (DRN) is 11 or 13 digits whose last digit is a Luhn check digit (IEC 62055-41
prints it that way on the meter). The check is written here, small, because flows import nothing
of the gateway but value types.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Final

from flows.ports import MeterNumber
from gateway.values.money import Money, currency_exponent

METER_LENGTHS: Final = (11, 13)
NICKNAME_MAX: Final = 12
_SEPARATORS: Final = str.maketrans("", "", " -.")


class MeterProblem(StrEnum):
    """Why typed text is not a meter number."""

    FORMAT = "format"  # not 11 or 13 digits
    CHECK_DIGIT = "check_digit"  # right length, wrong Luhn check digit


def luhn_check_digit(payload: str) -> int:
    """The Luhn digit that makes ``payload + digit`` valid; ``payload`` holds only digits."""
    total = 0
    for position, char in enumerate(reversed(payload)):
        digit = int(char)
        if position % 2 == 0:  # doubled: these sit at odd positions once the check digit is added
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return (10 - total % 10) % 10


def parse_meter(text: str) -> MeterNumber | MeterProblem:
    """The meter number in ``text`` (spaces, dashes and dots ignored), or what is wrong with it."""
    digits = text.translate(_SEPARATORS)
    if len(digits) not in METER_LENGTHS or not (digits.isascii() and digits.isdigit()):
        return MeterProblem.FORMAT
    if luhn_check_digit(digits[:-1]) != int(digits[-1]):
        return MeterProblem.CHECK_DIGIT
    return MeterNumber(digits)


def parse_amount(text: str, currency: str) -> Money | None:
    """An amount typed in major units (``500``, ``500.50``, ``1,000``), or None if it is not one.

    Refuses zero, negatives, exponents and more decimals than ``currency`` has.
    """
    cleaned = text.strip().replace(",", "")
    if not cleaned or len(cleaned) > 15 or not cleaned.isascii():
        return None
    if not all(ch.isdigit() or ch == "." for ch in cleaned) or cleaned.count(".") > 1:
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    minor = value.scaleb(currency_exponent(currency))
    if minor <= 0 or minor != minor.to_integral_value():
        return None
    return Money(int(minor), currency)


def parse_nickname(text: str) -> str | None:
    """A nickname for a saved meter: 1 to 12 ASCII letters, digits or spaces; None otherwise."""
    name = " ".join(text.split())
    if not 1 <= len(name) <= NICKNAME_MAX:
        return None
    if not all(ch.isascii() and (ch.isalnum() or ch == " ") for ch in name):
        return None
    if name in {"0", "00"}:
        return None
    return name
