"""Errors of the STS token engine, standalone because ``gateway.sts`` imports nothing of ours.

```
StsError
  UnsupportedAlgorithm     EA09, DKGA01, DKGA03 or an unknown code: refused, never guessed
  InvalidField             a token field or identifier is out of range (field, value)
    InvalidKey             wrong key length, or a DKGA02 vending key without odd DES parity
    AmountNotEncodable     an amount above the largest the 16-bit (or 20-bit currency) field holds
  TidRangeExhausted        the key's base-date TID range has ended: a rollover key change is due
  KeyExpired               the TID's top 8 bits exceed the key's KEN (key expiry number)
  TokenFormatError         not 20 digits, or a value >= 2**66
  CrcMismatch              decoded block's CRC differs (wrong key, or a mistyped digit)
  UnsupportedToken         a class/subclass this engine does not build or decode
  UnknownKey               no vending key is loaded for a meter's (SGC, KRN)
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


class KeyExpired(StsError):
    """The token's TID is past the key's expiry: ``tid >> 16`` exceeds the KEN (docs/sts.md §8).

    Attributes:
        tid: the token identifier.
        ken: the key expiry number of the key.
    """

    def __init__(self, tid: int, ken: int) -> None:
        super().__init__(
            f"TID {tid} is past the key's expiry: its top 8 bits ({tid >> 16}) exceed KEN {ken};"
            " the meter needs a key change to a key with a later expiry"
        )
        self.tid = tid
        self.ken = ken


class UnsupportedToken(StsError):
    """The token class/subclass is reserved or proprietary: not built, not decoded.

    Attributes:
        token_class: the 2-bit token class.
        subclass: the 4-bit token subclass.
    """

    def __init__(self, token_class: int, subclass: int) -> None:
        super().__init__(f"token class {token_class} subclass {subclass} is not supported")
        self.token_class = token_class
        self.subclass = subclass


class UnknownKey(StsError):
    """No vending key is loaded for the meter's supply group (SGC) and key revision (KRN).

    Attributes:
        sgc: the supply group code asked for.
        krn: the key revision number asked for.
    """

    def __init__(self, sgc: str, krn: int) -> None:
        super().__init__(f"no vending key is loaded for SGC {sgc} KRN {krn}")
        self.sgc = sgc
        self.krn = krn
