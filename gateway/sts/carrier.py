"""The numeric token carrier: 64-bit block ⇄ 66-bit token ⇄ 20 digits (docs/sts.md §7).

The two class bits are not encrypted. After encryption they are put into bits 28 and 27 of the
64-bit cipher block, and the two bits they displace move to bits 65 and 64 ("class-bit
transposition"). The 66-bit result is written as 20 decimal digits, zero-padded
(2**66 - 1 = 73786976294838206463 has 20 digits), and usually shown in groups of four.
"""

from __future__ import annotations

from typing import Final

from gateway.sts.errors import InvalidField, TokenFormatError

TOKEN_DIGITS: Final = 20
TOKEN_BITS: Final = 66
TOKEN_LIMIT: Final = 2**TOKEN_BITS  # a token's value is below this
BLOCK_MASK: Final = 2**64 - 1
# Block bits 28 and 27 swap places with class bits 1 and 0.
_LOW: Final = 27
_PAIR_MASK: Final = 0b11 << _LOW


def insert_class(block: int, token_class: int) -> int:
    """The 66-bit token for the 64-bit (cipher) ``block`` of class ``token_class``.

    Raises:
        InvalidField: ``block`` is not 64 bits or ``token_class`` is not 0..3.
    """
    if not 0 <= block <= BLOCK_MASK:
        raise InvalidField("data_block", block, "must be a 64-bit value")
    if not 0 <= token_class <= 3:
        raise InvalidField("class", token_class, "the token class is 2 bits (0..3)")
    return transpose(block, token_class)


def transpose(block: int, token_class: int) -> int:
    """:func:`insert_class` for values already known to be in range (the vending hot path)."""
    return (block & _PAIR_MASK) << (64 - _LOW) | (block & ~_PAIR_MASK) | token_class << _LOW


def extract_class(token: int) -> tuple[int, int]:
    """Split a 66-bit token into ``(token_class, block)``, undoing :func:`insert_class`.

    Raises:
        TokenFormatError: ``token`` is negative or not below 2**66.
    """
    if not 0 <= token < TOKEN_LIMIT:
        raise TokenFormatError(f"a token is below 2**66 = {TOKEN_LIMIT}, got {token}")
    token_class = (token & _PAIR_MASK) >> _LOW
    block = (token & BLOCK_MASK & ~_PAIR_MASK) | (token >> 64) << _LOW
    return token_class, block


def to_digits(token: int) -> str:
    """The 20-digit text of a 66-bit token value."""
    if not 0 <= token < TOKEN_LIMIT:
        raise TokenFormatError(f"a token is below 2**66 = {TOKEN_LIMIT}, got {token}")
    return f"{token:020d}"


def normalize_digits(text: str) -> str:
    """Strip the spaces and dashes people type between groups, leaving the bare digits."""
    return "".join(text.split()).replace("-", "")


def from_digits(text: str) -> int:
    """The 66-bit value of a 20-digit token (groups separated by spaces or dashes are accepted).

    Raises:
        TokenFormatError: not exactly 20 ASCII digits, or a value of 2**66 or more.
    """
    digits = normalize_digits(text)
    if len(digits) != TOKEN_DIGITS or not (digits.isascii() and digits.isdigit()):
        raise TokenFormatError(
            f"a token is exactly {TOKEN_DIGITS} digits, got {len(digits)} characters"
            + ("" if digits.isascii() and digits.isdigit() else " including non-digits")
        )
    value = int(digits)
    if value >= TOKEN_LIMIT:
        raise TokenFormatError(
            f"a token's value must be below 2**66 = {TOKEN_LIMIT}; these 20 digits are larger"
        )
    return value


def group_digits(digits: str, size: int = 4, separator: str = " ") -> str:
    """``digits`` in groups of ``size`` for display: ``"1234 5678 9012 3456 7890"``."""
    return separator.join(digits[i : i + size] for i in range(0, len(digits), size))


def mask_digits(digits: str) -> str:
    """``digits`` with all but the last four hidden, for logs: ``"****-****-****-****-7890"``."""
    visible = digits[-4:]
    hidden = "*" * (len(digits) - len(visible))
    return group_digits(hidden + visible, separator="-")
