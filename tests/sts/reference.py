"""A second, deliberately plain STS implementation written from docs/sts.md alone (test helper).

Nothing here is imported by the product, and nothing of the product is imported here except
the MISTY1 block cipher (:class:`gateway.sts.ea11.Misty1Cipher`, itself checked against the
RFC 2994 test vectors in ``test_ea11.py``). Everything else is written straight from the SPEC
text, one section at a time, the slow and obvious way: bit loops, explicit shifts at the bit
positions the SPEC tables print, the printed STA tables copied again from SPEC §5.1, the CRC
bit by bit, the amount rules as literal ``ceil``/``floor`` searches. It is a yardstick for the
property tests of ``test_reference.py``, so it favours being obviously right over being fast.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from Crypto.Cipher import DES

from gateway.sts.ea11 import Misty1Cipher

M64 = (1 << 64) - 1
POW10: list[int] = [10**n for n in range(33)]

# --- SPEC §5.1 tables, copied from the SPEC text (index = input nibble / input bit) -----------

REAL_S1 = [14, 10, 7, 9, 12, 3, 2, 5, 13, 0, 15, 1, 4, 8, 6, 11]
REAL_S2 = [12, 8, 2, 13, 7, 6, 1, 3, 11, 5, 9, 15, 0, 4, 10, 14]
REAL_P = [
    55, 42, 10, 18, 24, 21, 44, 35, 2, 22, 56, 43, 27, 58, 9, 50,
    6, 36, 12, 61, 37, 38, 53, 16, 62, 3, 7, 4, 32, 20, 63, 25,
    51, 52, 54, 33, 49, 19, 46, 29, 48, 31, 23, 30, 41, 28, 13, 5,
    40, 60, 39, 11, 15, 17, 1, 0, 57, 34, 59, 8, 47, 14, 45, 26,
]  # fmt: skip
REAL_S2_INV = [12, 6, 2, 7, 13, 9, 5, 4, 1, 10, 14, 8, 0, 3, 15, 11]
REAL_S1_INV = [9, 11, 6, 5, 12, 7, 14, 2, 13, 3, 1, 15, 4, 8, 0, 10]
REAL_P_INV = [
    55, 54, 8, 25, 27, 47, 16, 26, 59, 14, 2, 51, 18, 46, 61, 52,
    23, 53, 3, 37, 29, 5, 9, 42, 4, 31, 63, 12, 45, 39, 43, 41,
    28, 35, 57, 7, 17, 20, 21, 50, 48, 44, 1, 11, 6, 62, 38, 60,
    40, 36, 15, 32, 33, 22, 34, 0, 10, 56, 13, 58, 49, 19, 24, 30,
]  # fmt: skip
SAMPLE_S1 = [12, 10, 8, 4, 3, 15, 0, 2, 14, 1, 5, 13, 6, 9, 7, 11]
SAMPLE_S2 = [6, 9, 7, 4, 3, 10, 12, 14, 2, 13, 1, 15, 0, 11, 8, 5]
SAMPLE_P = [
    29, 27, 34, 9, 16, 62, 55, 2, 40, 49, 38, 25, 33, 61, 30, 23,
    1, 41, 21, 57, 42, 15, 5, 58, 19, 53, 22, 17, 48, 28, 24, 39,
    3, 60, 36, 14, 11, 52, 54, 12, 31, 51, 10, 26, 0, 45, 37, 43,
    44, 6, 59, 4, 7, 35, 56, 50, 13, 18, 32, 47, 46, 63, 20, 8,
]  # fmt: skip
SAMPLE_P_INV = [
    44, 16, 7, 32, 51, 22, 49, 52, 63, 3, 42, 36, 39, 56, 35, 21,
    4, 27, 57, 24, 62, 18, 26, 15, 30, 11, 43, 1, 29, 0, 14, 40,
    58, 12, 2, 53, 34, 46, 10, 31, 8, 17, 20, 47, 48, 45, 60, 59,
    28, 9, 55, 41, 37, 25, 38, 6, 54, 19, 23, 50, 33, 13, 5, 61,
]  # fmt: skip


def invert(table: list[int]) -> list[int]:
    """The inverse of a permutation table."""
    out = [0] * len(table)
    for i, v in enumerate(table):
        out[v] = i
    return out


@dataclass(frozen=True)
class Tables:
    """One STA table set: S1, S2, P and their inverses."""

    s1: list[int]
    s2: list[int]
    p: list[int]
    s1_inv: list[int]
    s2_inv: list[int]
    p_inv: list[int]


REAL = Tables(REAL_S1, REAL_S2, REAL_P, REAL_S1_INV, REAL_S2_INV, REAL_P_INV)
SAMPLE = Tables(SAMPLE_S1, SAMPLE_S2, SAMPLE_P, invert(SAMPLE_S1), invert(SAMPLE_S2), SAMPLE_P_INV)


def ror64(x: int, n: int) -> int:
    """Rotate a 64-bit value right by ``n``."""
    return ((x >> n) | (x << (64 - n))) & M64


def rol64(x: int, n: int) -> int:
    """Rotate a 64-bit value left by ``n``."""
    return ((x << n) | (x >> (64 - n))) & M64


def sta_encrypt(block: int, key: int, t: Tables = REAL) -> int:
    """SPEC §5.1 encryption, bit by bit."""
    k = ror64(~key & M64, 12)
    d = block
    for _ in range(16):
        sub = 0
        for i in range(16):
            nibble = (d >> (4 * i)) & 0xF
            box = t.s2 if (k >> (4 * i + 3)) & 1 else t.s1
            sub |= box[nibble] << (4 * i)
        perm = 0
        for j in range(64):
            if (sub >> j) & 1:
                perm |= 1 << t.p[j]
        d = perm
        k = rol64(k, 1)
    return d


def sta_decrypt(block: int, key: int, t: Tables = REAL) -> int:
    """SPEC §5.1 decryption, the "meter style" formulation (raw key, ROR by 1 each round)."""
    k = key
    d = block
    for _ in range(16):
        perm = 0
        for j in range(64):
            if (d >> t.p[j]) & 1:  # inverse permutation: bit j <- bit P[j]
                perm |= 1 << j
        sub = 0
        for i in range(16):
            nibble = (perm >> (4 * i)) & 0xF
            box = t.s1_inv if (k >> (4 * i)) & 1 else t.s2_inv
            sub |= box[nibble] << (4 * i)
        d = sub
        k = ror64(k, 1)
    return d


def encrypt(ea: int, key: bytes, block: int, tables: Tables = REAL) -> int:
    """EA07 (STA, 8-byte key) or EA11 (MISTY1, 16-byte key)."""
    if ea == 7:
        return sta_encrypt(block, int.from_bytes(key, "big"), tables)
    return Misty1Cipher(key).encrypt(block)


def decrypt(ea: int, key: bytes, block: int, tables: Tables = REAL) -> int:
    """Inverse of :func:`encrypt`."""
    if ea == 7:
        return sta_decrypt(block, int.from_bytes(key, "big"), tables)
    return Misty1Cipher(key).decrypt(block)


# --- SPEC §4 CRC --------------------------------------------------------------------------------


def crc16_bitwise(data: bytes) -> int:
    """CRC-16, polynomial 0x8005 reflected (0xA001), init 0xFFFF, no final XOR, bit by bit."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def crc_field(token_class: int, subclass: int, payload: int, *, currency: bool) -> int:
    """Byte-swapped CRC of ``class<<48 | subclass<<44 | payload`` (7 bytes; CRC_C adds 0x01)."""
    data = (token_class << 48 | subclass << 44 | payload).to_bytes(7, "big")
    if currency:
        data += b"\x01"
    crc = crc16_bitwise(data)
    return (crc & 0xFF) << 8 | crc >> 8


# --- SPEC §3.1 amounts --------------------------------------------------------------------------

OFFSET = [0, 16384, 180224, 1818624]
UNITS_MAX = 16383 * 1000 + 1818624  # 18 201 624


def offset(e: int) -> int:
    """sum_{n=1..e} 2^14 * 10^(n-1)."""
    return sum(2**14 * 10 ** (n - 1) for n in range(1, e + 1))


class NotEncodable(ValueError):
    """The reference cannot encode this value."""


def units_field(t: int) -> int:
    """Smallest e with m = ceil((t - OFFSET[e]) / 10^e) <= 16383; field = e<<14 | m."""
    if t < 0 or t > UNITS_MAX:
        raise NotEncodable(t)
    for e in range(4):
        num = t - OFFSET[e]
        m = -((-num) // POW10[e])  # ceil
        m = max(m, 0)
        if m <= 16383:
            return e << 14 | m
    raise NotEncodable(t)


def units_value(field: int) -> int:
    """The units value ``t = m * 10^e + OFFSET[e]`` of a 16-bit amount field."""
    e, m = field >> 14, field & 0x3FFF
    return m * POW10[e] + OFFSET[e]


CURRENCY_MAX = 16383 * 10**31 + offset(31)


def currency_value20(amount: int) -> int:
    """The 20-bit S|e(5)|m(14) value: positive ceil, negative magnitude floor."""
    negative = amount < 0
    mag = -amount if negative else amount
    if mag > CURRENCY_MAX:
        raise NotEncodable(amount)
    for e in range(32):
        num = mag - offset(e)
        if negative:
            m = num // POW10[e]
            if m < 0:
                continue
        else:
            m = max(-((-num) // POW10[e]), 0)
        if m <= 16383:
            return int(negative) << 19 | e << 14 | m
    raise NotEncodable(amount)


def currency_amount(v20: int) -> int:
    """Signed amount from the 20-bit value."""
    s, e, m = v20 >> 19, (v20 >> 14) & 0x1F, v20 & 0x3FFF
    mag = m * POW10[e] + offset(e)
    return -mag if s else mag


# --- SPEC §3 blocks -----------------------------------------------------------------------------


def _bits(value: int, width: int, name: str) -> int:
    if not 0 <= value < 1 << width:
        raise NotEncodable(f"{name}={value} does not fit {width} bits")
    return value


def payload_of(  # noqa: C901, PLR0911 - one branch per SPEC §3 row, on purpose
    fields: dict[str, object], ea: int | None
) -> tuple[int, int, int, bool]:
    """(class, subclass, 44-bit payload, currency?) for a docs/sts-vectors.md ``fields`` object."""
    c = int(fields["class"])  # type: ignore[call-overload]
    s = int(fields["subclass"])  # type: ignore[call-overload]

    def i(name: str, default: int | None = None) -> int:
        raw = fields.get(name, default)
        if isinstance(raw, str):
            return int(raw, 16)
        assert isinstance(raw, int)
        return raw

    def rnd_tid(value16: int) -> int:
        return (
            _bits(i("rnd", 0), 4, "rnd") << 40
            | _bits(i("tid"), 24, "tid") << 16
            | _bits(value16, 16, "value")
        )

    if c == 0 and 0 <= s <= 3:
        return c, s, rnd_tid(units_field(i("amount"))), False
    if c == 0 and 4 <= s <= 7:
        v = currency_value20(i("amount"))
        sign, e, m = v >> 19, (v >> 14) & 0x1F, v & 0x3FFF
        # block bits: 59 S, 58..56 e4..e2, 55..32 TID, 31..30 e1 e0, 29..16 m  (payload = >>16)
        p = sign << 43 | (e >> 2) << 40 | _bits(i("tid"), 24, "tid") << 16 | (e & 3) << 14 | m
        return c, s, p, True
    if c == 1 and s == 0:
        return (
            c,
            s,
            _bits(i("control"), 36, "control") << 8 | _bits(i("manufacturer_code", 0), 8, "mfr"),
            False,
        )
    if c == 1 and s == 1:
        return (
            c,
            s,
            _bits(i("control"), 28, "control") << 16 | _bits(i("manufacturer_code", 0), 16, "mfr"),
            False,
        )
    if c == 2 and s in (0, 6):
        return c, s, rnd_tid(units_field(i("amount"))), False
    if c == 2 and s == 1:
        return c, s, rnd_tid(i("register")), False
    if c == 2 and s in (2, 7, 10):
        return c, s, rnd_tid(i("value")), False
    if c == 2 and s == 5:
        return c, s, rnd_tid(0), False
    if c == 2 and s == 3:
        p = (
            _bits(i("kenho"), 4, "kenho") << 40
            | _bits(i("krn"), 4, "krn") << 36
            | _bits(i("ro", 0), 1, "ro") << 35
            | _bits(i("three_kct", 0), 1, "3kct") << 34
            | _bits(i("kt"), 2, "kt") << 32
            | _bits(i("nkho"), 32, "nkho")
        )
        return c, s, p, False
    if c == 2 and s == 4:
        p = (
            _bits(i("kenlo"), 4, "kenlo") << 40
            | _bits(i("ti"), 8, "ti") << 32
            | _bits(i("nklo"), 32, "nklo")
        )
        return c, s, p, False
    if c == 2 and s in (8, 9):
        return c, s, _bits(i("payload"), 44, "payload"), False
    raise NotEncodable(f"class {c} subclass {s}")


def data_block(fields: dict[str, object], ea: int | None = None) -> int:
    """The clear 64-bit block: subclass<<60 | payload<<16 | CRC field."""
    c, s, p, currency = payload_of(fields, ea)
    return s << 60 | p << 16 | crc_field(c, s, p, currency=currency)


# --- SPEC §7 transposition and digits -----------------------------------------------------------


def insert_class(cipher_block: int, token_class: int) -> int:
    """66-bit T: bits 28, 27 <- class bits 1, 0; bits 65, 64 <- old bits 28, 27."""
    b28, b27 = (cipher_block >> 28) & 1, (cipher_block >> 27) & 1
    t = cipher_block & ~(1 << 28) & ~(1 << 27)
    t |= ((token_class >> 1) & 1) << 28 | (token_class & 1) << 27
    return t | b28 << 65 | b27 << 64


def remove_class(t: int) -> tuple[int, int]:
    """(class, 64-bit block) from the 66-bit T."""
    token_class = (t >> 27) & 3
    c = t & M64 & ~(1 << 28) & ~(1 << 27)
    c |= ((t >> 65) & 1) << 28 | ((t >> 64) & 1) << 27
    return token_class, c


def token(
    fields: dict[str, object], ea: int | None, key: bytes | None, tables: Tables = REAL
) -> tuple[int, str]:
    """(data block, 20 digits) for ``fields``; class 1 is not encrypted."""
    block = data_block(fields, ea)
    token_class = int(fields["class"])  # type: ignore[call-overload]
    if token_class == 1:
        c = block
    else:
        assert ea is not None
        assert key is not None
        c = encrypt(ea, key, block, tables)
    return block, str(insert_class(c, token_class)).zfill(20)


def decode(
    digits: str, ea: int | None, key: bytes | None, tables: Tables = REAL
) -> tuple[int, int]:
    """(class, clear block) of a token, CRC not checked."""
    t = int(digits)
    token_class, c = remove_class(t)
    if token_class == 1:
        return token_class, c
    assert ea is not None
    assert key is not None
    return token_class, decrypt(ea, key, c, tables)


# --- SPEC §6 identity and DKGA ------------------------------------------------------------------


def luhn(digits: str) -> str:
    """Luhn check digit for ``digits`` (double every second digit from the right end)."""
    total = 0
    for pos, ch in enumerate(reversed(digits)):
        d = int(ch)
        if pos % 2 == 0:
            d = d * 2
            d = d - 9 if d > 9 else d
        total += d
    return str((10 - total % 10) % 10)


def pan(iin: str, drn: str) -> str:
    """IIN + DRN + Luhn digit over the 17 digits."""
    return iin + drn + luhn(iin + drn)


def dkga02(vk: bytes, iin: str, drn: str, kt: int, sgc: str, ti: str, krn: int) -> bytes:
    """SPEC §6.2."""
    if len(iin) == 6:
        pan_block = iin[1:] + ("0" * 11 if kt == 3 else drn)
    else:
        pan_block = iin[1:] + ("0" * 13 if kt == 3 else drn)
    assert len(pan_block) == 16
    control = f"{kt}{sgc}{ti}{krn}FFFFFF"
    x = int(pan_block, 16) ^ int(control, 16)
    xb = x.to_bytes(8, "big")
    e = int.from_bytes(DES.new(vk, DES.MODE_ECB).encrypt(xb), "big")  # noqa: S304 - the SPEC's DES
    return (e ^ x ^ int.from_bytes(vk, "big")).to_bytes(8, "big")


def dkga04(  # noqa: PLR0913, PLR0917 - the SPEC's inputs in its order
    vk: bytes, iin: str, drn: str, kt: int, sgc: str, ti: str, krn: int, bd: int, ea: int
) -> bytes:
    """SPEC §6.3, the message table row by row."""
    m = bytearray()
    m += b"\x04"
    m += b"\x02" + b"04"
    m += b"\x02" + str(bd)[2:].encode()
    m += b"\x02" + (b"07" if ea == 7 else b"11")
    m += b"\x02" + ti.encode()
    m += b"\x00"
    m += b"\x04"
    m += b"\x06" + sgc.encode()
    m += b"\x01" + str(kt).encode()
    m += b"\x01" + str(krn).encode()
    m += b"\x12" + pan(iin, drn).encode()
    bits = 64 if ea == 7 else 128
    m += bits.to_bytes(4, "big")
    return hmac.new(vk, bytes(m), hashlib.sha256).digest()[: bits // 8]


def decoder_key(meter: dict[str, object], ea: int) -> bytes:
    """DK for a docs/sts-vectors.md ``meter`` object."""
    vk = bytes.fromhex(str(meter["vending_key"]))
    args = (
        vk,
        str(meter["iin"]),
        str(meter["drn"]),
        int(meter["key_type"]),  # type: ignore[call-overload]
        str(meter["sgc"]),
        str(meter["tariff_index"]),
        int(meter["krn"]),  # type: ignore[call-overload]
    )
    if meter["dkga"] == 2:
        return dkga02(*args)
    return dkga04(*args, int(meter["base_date"]), ea)  # type: ignore[call-overload]


# --- SPEC §9 key change sets --------------------------------------------------------------------


def key_change_set(  # noqa: PLR0913 - the SPEC §9 attributes
    *,
    ea: int,
    new_key: bytes,
    ken: int,
    krn: int,
    kt: int,
    ti: int,
    sgc: int,
    ro: int,
    three_kct: int,
) -> list[dict[str, object]]:
    """The ``fields`` of the KCT set (EA07: 3, 4 [+ 8 if three_kct]; EA11: 3, 4, 8, 9)."""
    nkho = int.from_bytes(new_key[0:4], "big")
    nklo = int.from_bytes(new_key[4:8] if ea == 7 else new_key[12:16], "big")
    out: list[dict[str, object]] = [
        {
            "class": 2,
            "subclass": 3,
            "kenho": ken >> 4,
            "krn": krn,
            "ro": ro,
            "three_kct": three_kct if ea == 7 else 0,
            "kt": kt,
            "nkho": f"{nkho:x}",
        },
        {"class": 2, "subclass": 4, "kenlo": ken & 15, "ti": ti, "nklo": f"{nklo:x}"},
    ]
    if ea == 7:
        if three_kct:
            out.append({"class": 2, "subclass": 8, "payload": f"{sgc << 20:x}"})
    else:
        low = (sgc & 0xFFF) << 32 | int.from_bytes(new_key[4:8], "big")
        high = (sgc >> 12) << 32 | int.from_bytes(new_key[8:12], "big")
        out.append({"class": 2, "subclass": 8, "payload": f"{low:x}"})
        out.append({"class": 2, "subclass": 9, "payload": f"{high:x}"})
    return out
