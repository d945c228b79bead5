"""Decoder key generation (DKGA, docs/sts.md §6.2-§6.4) and validation of the meter key attributes.

The decoder key (DK) of a meter is derived from the vending key (VK) of its supply group and the
meter's identity and key attributes:

* **KT** key type: 0 DITK (initialisation), 1 DDTK (default), 2 DUTK (unique), 3 DCTK (common).
* **SGC** supply group code: 6 decimal digits.   **TI** tariff index: 2 decimal digits.
* **KRN** key revision number: 1..9.   **BD** base date: 1993, 2014 or 2035.
* **EA** encryption algorithm: 7 (STA, 8-byte DK) or 11 (MISTY1, 16-byte DK).

```
DKGA01  legacy DES variant     refused (UnsupportedAlgorithm): unverified public sources only
DKGA02  DES, 8-byte VK         DK = DES(VK, X) ^ X ^ VK, X = PANBlock ^ ControlBlock; EA07 only
DKGA03  triple DES             refused (UnsupportedAlgorithm): unverified public sources only
DKGA04  HMAC-SHA-256, 20-byte VK   DK = leftmost 8 or 16 bytes of HMAC(VK, message of §6.3)
```
"""

from __future__ import annotations

import hashlib
import hmac

from Crypto.Cipher import DES

from gateway.sts.cipher import EncryptionAlgorithm, encryption_algorithm
from gateway.sts.errors import InvalidField, InvalidKey, UnsupportedAlgorithm
from gateway.sts.pan import build_pan, is_decimal, validate_drn, validate_iin

__all__ = [
    "BASE_DATES",
    "DCTK",
    "derive_decoder_key",
    "has_odd_parity",
    "validate_base_date",
    "validate_key_type",
    "validate_krn",
    "validate_sgc",
    "validate_tariff_index",
]

BASE_DATES = (1993, 2014, 2035)
"""The TID base dates (SPEC §8): an attribute of the vending key."""

DCTK = 3
"""Key type 3, the common key: DKGA02 derives it without the DRN."""

_DKGA02_VK_LENGTH = 8
_DKGA04_VK_LENGTH = 20


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_sgc(sgc: str) -> str:
    """Return ``sgc`` if it is a supply group code: 6 decimal digits; else raise InvalidField."""
    if not is_decimal(sgc, 6):
        raise InvalidField("sgc", sgc, "a supply group code is 6 decimal digits")
    return sgc


def validate_tariff_index(ti: str) -> str:
    """Return ``ti`` if it is a tariff index: 2 decimal digits (00-99); else raise InvalidField."""
    if not is_decimal(ti, 2):
        raise InvalidField("tariff_index", ti, "a tariff index is 2 decimal digits, 00 to 99")
    return ti


def validate_krn(krn: int) -> int:
    """Return ``krn`` if it is a key revision number, an int 1..9; else raise InvalidField."""
    if not (_is_int(krn) and 1 <= krn <= 9):
        raise InvalidField("krn", krn, "a key revision number is an integer from 1 to 9")
    return krn


def validate_key_type(kt: int) -> int:
    """Return ``kt`` if it is a key type, an int 0..3; else raise InvalidField."""
    if not (_is_int(kt) and 0 <= kt <= DCTK):
        raise InvalidField("key_type", kt, "a key type is 0 (DITK), 1 (DDTK), 2 (DUTK) or 3 (DCTK)")
    return kt


def validate_base_date(bd: int) -> int:
    """Return ``bd`` if it is a base date year, 1993, 2014 or 2035; else raise InvalidField."""
    if not (_is_int(bd) and bd in BASE_DATES):
        raise InvalidField("base_date", bd, "a base date is 1993, 2014 or 2035")
    return bd


def has_odd_parity(key: bytes) -> bool:
    """Whether every byte of ``key`` has an odd number of set bits (DES key parity)."""
    return all(byte.bit_count() % 2 == 1 for byte in key)


def _vending_key(vending_key: bytes, length: int, dkga: int) -> bytes:
    if not isinstance(vending_key, bytes | bytearray) or len(vending_key) != length:
        got = (
            f"{len(vending_key)} bytes"
            if isinstance(vending_key, bytes | bytearray)
            else f"a {type(vending_key).__name__}"
        )
        raise InvalidKey(
            "vending_key",
            "<redacted>",
            f"DKGA{dkga:02d} needs a {length}-byte vending key, got {got}",
        )
    return bytes(vending_key)


def _dkga02(
    vending_key: bytes, iin: str, drn: str, key_type: int, sgc: str, tariff_index: str, krn: int
) -> bytes:
    """SPEC §6.2: DK = DES_encrypt(key=VK, data=X) ^ X ^ VK with X = PANBlock ^ ControlBlock."""
    if not has_odd_parity(vending_key):
        raise InvalidKey(
            "vending_key",
            "<redacted>",
            "a DKGA02 vending key is a DES key and every byte must have odd parity",
        )
    # PANBlock: the IIN without its first digit (6-digit IIN) or first two (4-digit IIN's last
    # 3 digits) followed by the DRN; 16 digits read as 8 bytes. KT 3 (DCTK) zeroes the DRN.
    drn_digits = "0" * len(drn) if key_type == DCTK else drn
    pan_block = bytes.fromhex(iin[-(16 - len(drn)) :] + drn_digits)
    # ControlBlock: KT(1) SGC(6) TI(2) KRN(1) FFFFFF, 16 hex digits.
    control_block = bytes.fromhex(f"{key_type}{sgc}{tariff_index}{krn}FFFFFF")
    x = bytes(a ^ b for a, b in zip(pan_block, control_block, strict=True))
    # Single DES in ECB on one block is what DKGA02 is (SPEC §6.2), not a choice of ours.
    encrypted = DES.new(vending_key, DES.MODE_ECB).encrypt(x)  # noqa: S304
    return bytes(e ^ a ^ v for e, a, v in zip(encrypted, x, vending_key, strict=True))


def _dkga04(
    vending_key: bytes,
    pan: str,
    key_type: int,
    sgc: str,
    tariff_index: str,
    krn: int,
    base_date: int,
    ea: EncryptionAlgorithm,
) -> bytes:
    """SPEC §6.3: leftmost 8/16 bytes of HMAC-SHA-256(VK, label ‖ 0x00 ‖ context ‖ L)."""
    key_bits = 64 if ea is EncryptionAlgorithm.EA07 else 128

    def item(text: str) -> bytes:
        return bytes([len(text)]) + text.encode("ascii")

    message = b"".join(
        (
            b"\x04",  # number of label items
            item("04"),  # DKGA number
            item(f"{base_date % 100:02d}"),
            item(f"{ea.value:02d}"),
            item(tariff_index),
            b"\x00",
            b"\x04",  # number of context items
            item(sgc),
            item(str(key_type)),
            item(str(krn)),
            item(pan),
            key_bits.to_bytes(4, "big"),
        )
    )
    return hmac.new(vending_key, message, hashlib.sha256).digest()[: key_bits // 8]


def derive_decoder_key(  # noqa: PLR0913 - the standard's inputs, all keyword-only
    *,
    dkga: int,
    vending_key: bytes,
    iin: str,
    drn: str,
    key_type: int,
    sgc: str,
    tariff_index: str,
    krn: int,
    base_date: int,
    ea: int,
) -> bytes:
    """Derive a meter's decoder key from the vending key and the meter's attributes.

    Args:
        dkga: the decoder key generation algorithm, 2 or 4.
        vending_key: 8 bytes with odd DES parity for DKGA02; 20 bytes for DKGA04.
        iin: issuer identification number, 6 digits (or legacy 4).
        drn: decoder reference number, 11 digits (13 with a 4-digit IIN), Luhn-checked.
        key_type: 0..3; 3 (DCTK) zeroes the DRN in the DKGA02 PAN block.
        sgc: supply group code, 6 digits.
        tariff_index: 2 digits.
        krn: key revision number, 1..9.
        base_date: 1993, 2014 or 2035 (hashed in by DKGA04, checked but unused by DKGA02).
        ea: 7 (DK of 8 bytes) or 11 (16 bytes, DKGA04 only).

    Returns:
        The decoder key, most significant byte first: 8 bytes for EA07, 16 for EA11.

    Raises:
        UnsupportedAlgorithm: DKGA01, DKGA03 or an unknown DKGA; EA09 or an unknown EA; DKGA02
            with EA11.
        InvalidKey: the vending key has the wrong length, or (DKGA02) lacks odd DES parity.
        InvalidField: an identifier or attribute is malformed (the field is named).
    """
    if not _is_int(dkga) or dkga not in (2, 4):
        if _is_int(dkga) and dkga in (1, 3):
            raise UnsupportedAlgorithm(
                f"DKGA{dkga:02d} is not supported: it is not recommended by the STSA and no "
                "verified public definition exists; use DKGA02 or DKGA04"
            )
        raise UnsupportedAlgorithm(
            f"decoder key generation algorithm {dkga!r} is unknown: this engine implements "
            "DKGA02 and DKGA04"
        )
    algorithm = encryption_algorithm(ea)
    validate_iin(iin)
    validate_drn(drn, iin)
    validate_key_type(key_type)
    validate_sgc(sgc)
    validate_tariff_index(tariff_index)
    validate_krn(krn)
    validate_base_date(base_date)
    if dkga == 2:
        if algorithm is not EncryptionAlgorithm.EA07:
            raise UnsupportedAlgorithm(
                f"DKGA02 derives 8-byte keys for EA07 only, not {algorithm.name}; use DKGA04"
            )
        key = _vending_key(vending_key, _DKGA02_VK_LENGTH, dkga)
        return _dkga02(key, iin, drn, key_type, sgc, tariff_index, krn)
    key = _vending_key(vending_key, _DKGA04_VK_LENGTH, dkga)
    pan = build_pan(iin, drn)
    return _dkga04(key, pan, key_type, sgc, tariff_index, krn, base_date, algorithm)
