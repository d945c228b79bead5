"""Choosing the block cipher of an encryption algorithm (EA) code (docs/sts.md §5).

```
EA07  STA, the Standard Transfer Algorithm   8-byte decoder key    gateway.sts.ea07
EA09  DEA                                    refused: no working public definition (SPEC §5.3)
EA11  MISTY1 (RFC 2994)                      16-byte decoder key   gateway.sts.ea11
```
"""

from __future__ import annotations

from enum import IntEnum
from typing import Protocol

from gateway.sts.ea07 import StaCipher, StaTables
from gateway.sts.ea11 import Misty1Cipher
from gateway.sts.errors import InvalidKey, UnsupportedAlgorithm

__all__ = [
    "BlockCipher",
    "EncryptionAlgorithm",
    "decoder_key_length",
    "encryption_algorithm",
    "make_cipher",
]


class BlockCipher(Protocol):
    """A 64-bit block cipher bound to one decoder key."""

    def encrypt(self, block: int) -> int:
        """Encrypt a 64-bit block given as an int in ``0 .. 2**64-1``."""
        ...

    def decrypt(self, block: int) -> int:
        """Decrypt a 64-bit block: the inverse of :meth:`encrypt`."""
        ...


class EncryptionAlgorithm(IntEnum):
    """Encryption algorithm codes this engine implements (EA09, DEA, is not one of them)."""

    EA07 = 7
    EA11 = 11


_KEY_LENGTHS = {EncryptionAlgorithm.EA07: 8, EncryptionAlgorithm.EA11: 16}
_INT_TYPES = (int, EncryptionAlgorithm)  # not bool, not float: 7.0 is not an EA code


def encryption_algorithm(ea: int) -> EncryptionAlgorithm:
    """The :class:`EncryptionAlgorithm` of code ``ea``.

    Raises:
        UnsupportedAlgorithm: ``ea`` is 9 (DEA) or not a known code.
    """
    if isinstance(ea, bool) or not isinstance(ea, int):
        raise UnsupportedAlgorithm(f"encryption algorithm code must be 7 or 11, got {ea!r}")
    if ea == 9:
        raise UnsupportedAlgorithm(
            "EA09 (DEA) is not supported: no working public definition of it exists and current "
            "STSA pages list only EA07 (STA) and EA11 (MISTY1)"
        )
    try:
        return EncryptionAlgorithm(ea)
    except ValueError:
        raise UnsupportedAlgorithm(
            f"encryption algorithm EA{ea:02d} is unknown: this engine implements EA07 (STA) and "
            "EA11 (MISTY1)"
        ) from None


def decoder_key_length(ea: int) -> int:
    """The decoder key length in bytes for algorithm ``ea``: 8 for EA07, 16 for EA11.

    Raises:
        UnsupportedAlgorithm: ``ea`` is 9 (DEA) or not a known code.
    """
    return _KEY_LENGTHS[encryption_algorithm(ea)]


def make_cipher(
    ea: int, decoder_key: bytes, *, sta_tables: StaTables = StaTables.REAL
) -> BlockCipher:
    """A block cipher for algorithm ``ea`` bound to ``decoder_key``.

    Args:
        ea: the encryption algorithm code, 7 or 11.
        decoder_key: 8 bytes for EA07, 16 for EA11, most significant byte first.
        sta_tables: the STA tables (EA07 only; ``SAMPLE`` is for the IEC test example).

    Raises:
        UnsupportedAlgorithm: ``ea`` is 9 (DEA) or unknown.
        InvalidKey: the key length does not match the algorithm.
    """
    if type(decoder_key) is bytes:  # the common case, checked cheaply: a cipher per token
        if ea == 7 and type(ea) in _INT_TYPES and len(decoder_key) == 8:
            return StaCipher(decoder_key, sta_tables)
        if ea == 11 and type(ea) in _INT_TYPES and len(decoder_key) == 16:
            return Misty1Cipher(decoder_key)
    algorithm = encryption_algorithm(ea)
    expected = _KEY_LENGTHS[algorithm]
    if not isinstance(decoder_key, bytes | bytearray) or len(decoder_key) != expected:
        length = len(decoder_key) if isinstance(decoder_key, bytes | bytearray) else None
        raise InvalidKey(
            "decoder_key",
            "<redacted>",
            f"{algorithm.name} needs a {expected}-byte decoder key, got {length} bytes",
        )
    if algorithm is EncryptionAlgorithm.EA07:
        return StaCipher(bytes(decoder_key), sta_tables)
    return Misty1Cipher(bytes(decoder_key))
