"""Errors of the STS token engine, standalone because ``gateway.sts`` imports nothing of ours.

```
StsError
  UnsupportedAlgorithm     EA09, DKGA01, DKGA03 or an unknown code: refused, never guessed
  InvalidField             a token field or identifier is out of range (field, value)
    InvalidKey             wrong key length, or a DKGA02 vending key without odd DES parity
    AmountNotEncodable     an amount above the largest the 16-bit (or 20-bit currency) field holds
  TidRangeExhausted        the key's base-date TID range has ended: a rollover key change is due
  TokenFormatError         not 20 digits, or a value >= 2**66
  CrcMismatch              decoded block's CRC differs (wrong key, or a mistyped digit)
```

Messages say what was expected and what arrived; they are for operators and engineers, never
shown to a customer verbatim.
"""

from __future__ import annotations


class StsError(Exception):
    """Root of every error the STS engine raises."""


class UnsupportedAlgorithm(StsError):
    """An encryption or key-derivation algorithm this engine does not implement was asked for."""


class InvalidField(StsError):
    """A token field or meter identifier is malformed or out of range.

    Attributes:
        field: the field's name in the standard's vocabulary (``tid``, ``sgc``, ``drn`` …).
        value: what arrived, as given.
    """

    def __init__(self, field: str, value: object, problem: str) -> None:
        super().__init__(f"{field}: {problem} (got {value!r})")
        self.field = field
        self.value = value


class InvalidKey(InvalidField):
    """A vending or decoder key has the wrong length or (DKGA02) lacks odd DES parity."""


class AmountNotEncodable(InvalidField):
    """The amount is larger than the amount field can carry (or negative where not allowed)."""


class TidRangeExhausted(StsError):
    """The issue time is past the end of the key's base-date TID range (2**24 - 1 minutes).

    The meter needs a key change with the TID-rollover flag (RO = 1) to a later base date's key.
    """


class TokenFormatError(StsError):
    """The text is not a 20-digit token, or its value does not fit in 66 bits."""


class CrcMismatch(StsError):
    """The decrypted block's CRC does not match: the wrong key, or a mistyped digit."""
