"""The token CRC (IEC 62055-41; SPEC.md §4).

The CRC is CRC-16 with polynomial x^16 + x^15 + x^2 + 1, processed reflected (0xA001), initial
value 0xFFFF and no final XOR (the parameters known as CRC-16/MODBUS). Its input is the 50-bit
value ``class << 48 | subclass << 44 | payload`` as 7 big-endian bytes; currency tokens (class 0,
subclasses 4-7) use "CRC_C", the same CRC over those 7 bytes followed by one byte 0x01. The result
is stored byte-swapped in the block's 16 low bits.

Check value (STSA wiki, "Key Expiry Number"): class 0, subclass 0, RND 0b0101, TID
0b110000000010101001010101, amount 0b0010011100010000 gives the CRC field 0x1970.
"""

from __future__ import annotations

from typing import Final

# x^16 + x^15 + x^2 + 1, bit-reversed for LSB-first processing.
POLYNOMIAL: Final = 1 + 2**2 + 2**15 + 2**16
REFLECTED_POLYNOMIAL: Final = 0xA001
INITIAL: Final = 0xFFFF
CURRENCY_SUFFIX: Final = 0x01  # the extra byte of CRC_C


def _table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ REFLECTED_POLYNOMIAL if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE: Final = _table()


def crc16(data: bytes, crc: int = INITIAL) -> int:
    """CRC-16/MODBUS of ``data``, continuing from ``crc`` (0xFFFF for a fresh CRC)."""
    table = _TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


def crc_field(head: int, *, currency: bool = False) -> int:
    """The 16-bit CRC field for the 50-bit token head ``class << 48 | subclass << 44 | payload``.

    ``currency`` selects CRC_C (currency transfer tokens, class 0 subclasses 4-7). The result is
    already byte-swapped, ready for bits 15..0 of the data block.
    """
    table = _TABLE
    crc = INITIAL
    for shift in (48, 40, 32, 24, 16, 8, 0):
        crc = (crc >> 8) ^ table[(crc ^ (head >> shift)) & 0xFF]
    if currency:
        crc = (crc >> 8) ^ table[(crc ^ CURRENCY_SUFFIX) & 0xFF]
    return (crc & 0xFF) << 8 | crc >> 8
