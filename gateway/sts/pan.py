"""Meter identity: IIN, DRN and PAN (docs/sts.md §6.1).

* **IIN** (issuer identification number): 6 digits, normally ``600727``; the legacy 4-digit
  IIN ``0000`` also exists.
* **DRN** (decoder reference number, the "meter number"): with a 6-digit IIN, 11 digits =
  manufacturer code (2) + serial (8) + Luhn check digit; with a 4-digit IIN, 13 digits =
  manufacturer code (4) + serial (8) + Luhn check digit.
* **PAN** (primary account number): 18 digits = IIN + DRN + Luhn check digit over those 17.
"""

from __future__ import annotations

from gateway.sts.errors import InvalidField

__all__ = ["build_pan", "is_decimal", "luhn_check_digit", "validate_drn", "validate_iin"]


def is_decimal(text: object, length: int) -> bool:
    """Whether ``text`` is a str of exactly ``length`` ASCII digits (no signs, no spaces)."""
    return isinstance(text, str) and len(text) == length and text.isascii() and text.isdigit()


def luhn_check_digit(digits: str) -> str:
    """The Luhn (mod 10) check digit to append to ``digits``.

    Raises:
        InvalidField: ``digits`` is empty or not all ASCII digits.
    """
    if not (isinstance(digits, str) and digits and digits.isascii() and digits.isdigit()):
        raise InvalidField("digits", digits, "the Luhn check digit needs one or more digits")
    total = 0
    # The rightmost payload digit is doubled (it becomes the second digit once the check digit
    # is appended), then every second digit going left.
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2 == 0:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return str(-total % 10)


def validate_iin(iin: str) -> str:
    """Return ``iin`` if it is 6 digits (``600727``) or the legacy 4 digits (``0000``).

    Raises:
        InvalidField: otherwise.
    """
    if not (is_decimal(iin, 6) or is_decimal(iin, 4)):
        raise InvalidField("iin", iin, "an IIN is 6 digits (600727) or 4 digits (0000)")
    return iin


def validate_drn(drn: str, iin: str) -> str:
    """Return ``drn`` if it is a valid DRN for ``iin``.

    A DRN is 11 digits with a 6-digit IIN or 13 digits with a 4-digit IIN, its last digit the
    Luhn check digit of the others.

    Raises:
        InvalidField: ``iin`` is invalid, or ``drn`` has the wrong length, non-digits or a wrong
            check digit (the message gives the correct one).
    """
    validate_iin(iin)
    length = 11 if len(iin) == 6 else 13
    if not is_decimal(drn, length):
        raise InvalidField("drn", drn, f"with a {len(iin)}-digit IIN a DRN is {length} digits")
    expected = luhn_check_digit(drn[:-1])
    if drn[-1] != expected:
        raise InvalidField(
            "drn",
            drn,
            f"the Luhn check digit of {drn[:-1]} is {expected}, not {drn[-1]}",
        )
    return drn


def build_pan(iin: str, drn: str) -> str:
    """The 18-digit PAN of a meter: IIN + DRN + Luhn check digit over those 17 digits.

    Raises:
        InvalidField: ``iin`` or ``drn`` is invalid (see :func:`validate_drn`).
    """
    validate_drn(drn, iin)
    body = iin + drn  # 17 digits whichever IIN length: 6 + 11 or 4 + 13
    return body + luhn_check_digit(body)
