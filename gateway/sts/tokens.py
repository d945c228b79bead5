"""What a token says, per class and subclass, and its 64-bit data block (docs/sts.md §2-§3, §7, §9).

Every token is ``class(2) | subclass(4) | payload(44) | CRC(16)``. The 64-bit data block
(subclass, payload, CRC) is encrypted with the decoder key for classes 0 and 2; class 1 goes in
clear. The block layouts below are the standard's tables written as data, most significant
field first, and one :func:`~gateway.sts.bits.pack`/:func:`~gateway.sts.bits.unpack` pair reads
them all. The CRC slot is named ``_crc``: it is computed (:mod:`gateway.sts.crc`), never given.

Token contents are frozen dataclasses, one per shape (:data:`TokenFields`). Their ``to_json``
and :func:`fields_from_json` use the ``fields`` shapes of ``docs/sts-vectors.md``.

Vocabulary: RND a random nibble; TID the token identifier (minutes since the base date, see
:mod:`gateway.sts.tid`); KEN key expiry number (split in KENHO/KENLO, high/low nibbles);
KRN key revision number; KT key type; TI tariff index; NKHO/NKLO new key high/low order part;
RO TID-rollover flag; SGC supply group code.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Final

from gateway.sts.amount import decode_currency, decode_units, encode_currency, encode_units
from gateway.sts.bits import Field, Layout, pack, unpack
from gateway.sts.carrier import extract_class, from_digits, transpose
from gateway.sts.cipher import BlockCipher
from gateway.sts.crc import crc_field
from gateway.sts.errors import (
    CrcMismatch,
    InvalidField,
    InvalidKey,
    UnsupportedToken,
)


class TokenClass(IntEnum):
    """The 2-bit token class."""

    TRANSFER_CREDIT = 0
    METER_TEST = 1  # InitiateMeterTest/Display: not meter-specific, not encrypted
    MANAGEMENT = 2  # meter-specific management, including key change
    RESERVED = 3


class CreditSubclass(IntEnum):
    """Class 0 subclasses: which register a credit goes to (units 0-3, currency 4-7)."""

    ELECTRICITY = 0  # 0.1 kWh
    WATER = 1  # 0.1 m³
    GAS = 2  # 0.1 m³
    TIME = 3  # 0.1 min
    ELECTRICITY_CURRENCY = 4  # 0.00001 currency units, signed
    WATER_CURRENCY = 5
    GAS_CURRENCY = 6
    TIME_CURRENCY = 7

    @property
    def is_currency(self) -> bool:
        """Whether the amount is in currency (sign + 5-bit exponent, CRC_C)."""
        return self >= CreditSubclass.ELECTRICITY_CURRENCY


class MeterTestSubclass(IntEnum):
    """Class 1 subclasses: width of the manufacturer code."""

    SHORT_MANUFACTURER_CODE = 0  # 2-digit code, 11-digit DRN meters
    LONG_MANUFACTURER_CODE = 1  # 4-digit code, 13-digit DRN meters


class ManagementSubclass(IntEnum):
    """Class 2 subclasses."""

    SET_MAXIMUM_POWER_LIMIT = 0
    CLEAR_CREDIT = 1
    SET_TARIFF_RATE = 2
    SET_1ST_SECTION_DECODER_KEY = 3
    SET_2ND_SECTION_DECODER_KEY = 4
    CLEAR_TAMPER_CONDITION = 5
    SET_MAXIMUM_PHASE_POWER_UNBALANCE_LIMIT = 6
    SET_WATER_METER_FACTOR = 7
    SET_3RD_SECTION_DECODER_KEY = 8
    SET_4TH_SECTION_DECODER_KEY = 9
    EXTENDED = 10  # STS202-5 extended token set [1]


#: Class 2 subclasses that carry a TID (the key-change sections do not).
TID_MANAGEMENT_SUBCLASSES: Final = frozenset({0, 1, 2, 5, 6, 7, 10})
#: The key-change sections (class 2).
KEY_CHANGE_SUBCLASSES: Final = frozenset({3, 4, 8, 9})
#: ClearCredit register value meaning "every register".
ALL_REGISTERS: Final = 0xFFFF

# --- Layouts of the 64-bit data block, most significant field first (docs/sts.md §3) ------------

#: Class 0 subclasses 0-3 and class 2 subclasses 0, 1, 2, 5, 6, 7, 10: RND TID value.
RND_TID_VALUE: Final = Layout(
    "RND/TID/value block",
    Field("subclass", 4),
    Field("rnd", 4),
    Field("tid", 24),
    Field("value", 16),
    Field("_crc", 16),
)
#: Class 0 subclasses 4-7: the RND nibble holds the sign and high exponent bits.
CURRENCY_BLOCK: Final = Layout(
    "currency block",
    Field("subclass", 4),
    Field("sign", 1),
    Field("exponent_high", 3),  # e4 e3 e2
    Field("tid", 24),
    Field("exponent_low", 2),  # e1 e0
    Field("mantissa", 14),
    Field("_crc", 16),
)
#: Class 1 subclass 0: 36-bit control field, 2-digit (8-bit) manufacturer code.
TEST_SHORT_BLOCK: Final = Layout(
    "test block (2-digit manufacturer code)",
    Field("subclass", 4),
    Field("control", 36),
    Field("manufacturer_code", 8),
    Field("_crc", 16),
)
#: Class 1 subclass 1: 28-bit control field, 4-digit (16-bit) manufacturer code.
TEST_LONG_BLOCK: Final = Layout(
    "test block (4-digit manufacturer code)",
    Field("subclass", 4),
    Field("control", 28),
    Field("manufacturer_code", 16),
    Field("_crc", 16),
)
#: Class 2 subclass 3: Set1stSectionDecoderKey.
KEY_SECTION_1_BLOCK: Final = Layout(
    "1st key section block",
    Field("subclass", 4),
    Field("kenho", 4),
    Field("krn", 4),
    Field("ro", 1),
    Field("three_kct", 1),
    Field("kt", 2),
    Field("nkho", 32),
    Field("_crc", 16),
)
#: Class 2 subclass 4: Set2ndSectionDecoderKey.
KEY_SECTION_2_BLOCK: Final = Layout(
    "2nd key section block",
    Field("subclass", 4),
    Field("kenlo", 4),
    Field("ti", 8),
    Field("nklo", 32),
    Field("_crc", 16),
)
#: Class 2 subclasses 8 and 9: a 44-bit payload whose meaning depends on the algorithm.
KEY_SECTION_EXTRA_BLOCK: Final = Layout(
    "3rd/4th key section block", Field("subclass", 4), Field("payload", 44), Field("_crc", 16)
)
#: Payload of subclass 8 under EA07 (the "3-KCT" SGC section): SGC in binary, then zeros.
STA_SGC_SECTION: Final = Layout("EA07 3rd key section", Field("sgc", 24), Field("_zero", 20))
#: Payload of subclasses 8 (SGC low 12 bits, key bytes 4..7) and 9 (SGC high 12 bits, key bytes
#: 8..11) under EA11.
MISTY_KEY_SECTION: Final = Layout(
    "EA11 3rd/4th key section", Field("sgc_part", 12), Field("key_part", 32)
)


def _hex(value: int, digits: int) -> str:
    return f"{value:0{digits}x}"


def _int_or_hex(data: Mapping[str, object], name: str) -> int:
    """A JSON field given as a hex string (any case/padding) or an integer."""
    raw = data.get(name)
    if isinstance(raw, bool):
        raise InvalidField(name, raw, "must be a hex string or an integer")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str):
        try:
            return int(raw, 16)
        except ValueError:
            raise InvalidField(name, raw, "must be hexadecimal") from None
    raise InvalidField(name, raw, "is missing or not a hex string")


def _int(data: Mapping[str, object], name: str, default: int | None = None) -> int:
    """An integer field: a JSON number, or a string of decimal digits with an optional sign."""
    raw = data.get(name, default)
    if isinstance(raw, str):
        text = raw.strip()
        digits = text[1:] if text[:1] in "+-" else text
        if digits and digits.isascii() and digits.isdigit():
            return int(text)
    elif isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    raise InvalidField(name, raw, "is missing or not an integer")


def _subclass_in(name: str, subclass: int, allowed: Collection[int]) -> None:
    if subclass not in allowed:
        raise InvalidField("subclass", subclass, f"{name} tokens use subclass {sorted(allowed)}")


# --- Token contents ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class UnitsCredit:
    """Class 0 subclasses 0-3: a credit of ``amount`` base units (0.1 kWh, 0.1 m³, 0.1 min).

    When encoded, ``amount`` is rounded up to the next encodable value (docs/sts.md §3.1).
    """

    TOKEN_CLASS: ClassVar[int] = TokenClass.TRANSFER_CREDIT
    subclass: int = CreditSubclass.ELECTRICITY
    rnd: int
    tid: int
    amount: int

    def __post_init__(self) -> None:
        if not 0 <= self.subclass <= 3:  # inline: built once per vend
            _subclass_in("units credit", self.subclass, range(4))

    def block_values(self) -> dict[str, int]:
        """The data-block field values (CRC excluded)."""
        return {
            "subclass": self.subclass,
            "rnd": self.rnd,
            "tid": self.tid,
            "value": encode_units(self.amount),
        }

    def to_json(self) -> dict[str, object]:
        """The ``fields`` object of docs/sts-vectors.md."""
        return {
            "class": 0,
            "subclass": self.subclass,
            "rnd": self.rnd,
            "tid": self.tid,
            "amount": self.amount,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class CurrencyCredit:
    """Class 0 subclasses 4-7: a signed amount in 0.00001 currency units (no RND, CRC_C)."""

    TOKEN_CLASS: ClassVar[int] = TokenClass.TRANSFER_CREDIT
    subclass: int = CreditSubclass.ELECTRICITY_CURRENCY
    tid: int
    amount: int

    def __post_init__(self) -> None:
        _subclass_in("currency credit", self.subclass, range(4, 8))

    def block_values(self) -> dict[str, int]:
        """The data-block field values (CRC excluded)."""
        value = encode_currency(self.amount)
        return {
            "subclass": self.subclass,
            "sign": value >> 19,
            "exponent_high": (value >> 16) & 0b111,
            "tid": self.tid,
            "exponent_low": (value >> 14) & 0b11,
            "mantissa": value & 0x3FFF,
        }

    def to_json(self) -> dict[str, object]:
        """The ``fields`` object of docs/sts-vectors.md."""
        return {"class": 0, "subclass": self.subclass, "tid": self.tid, "amount": self.amount}


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterTest:
    """Class 1 subclasses 0/1: InitiateMeterTest/Display, not encrypted (docs/sts.md §3.2).

    ``control``: all ones = every test; bit n-1 = test/display n (1 load switch, 2 display,
    3 cumulative registers, 4 KRN and KT, 5 TI, … 18 DRN).
    """

    TOKEN_CLASS: ClassVar[int] = TokenClass.METER_TEST
    subclass: int = MeterTestSubclass.SHORT_MANUFACTURER_CODE
    control: int
    manufacturer_code: int = 0

    def __post_init__(self) -> None:
        _subclass_in("meter test", self.subclass, range(2))

    def block_values(self) -> dict[str, int]:
        """The data-block field values (CRC excluded)."""
        return {
            "subclass": self.subclass,
            "control": self.control,
            "manufacturer_code": self.manufacturer_code,
        }

    def to_json(self) -> dict[str, object]:
        """The ``fields`` object of docs/sts-vectors.md (``control`` in hex)."""
        width = 9 if self.subclass == MeterTestSubclass.SHORT_MANUFACTURER_CODE else 7
        return {
            "class": 1,
            "subclass": self.subclass,
            "control": _hex(self.control, width),
            "manufacturer_code": self.manufacturer_code,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class PowerLimit:
    """Class 2 subclass 0 (maximum power limit) or 6 (maximum phase power unbalance limit).

    ``amount`` is in watts, encoded like a units amount (rounded up).
    """

    TOKEN_CLASS: ClassVar[int] = TokenClass.MANAGEMENT
    subclass: int = ManagementSubclass.SET_MAXIMUM_POWER_LIMIT
    rnd: int
    tid: int
    amount: int

    def __post_init__(self) -> None:
        _subclass_in("power limit", self.subclass, (0, 6))

    def block_values(self) -> dict[str, int]:
        """The data-block field values (CRC excluded)."""
        return {
            "subclass": self.subclass,
            "rnd": self.rnd,
            "tid": self.tid,
            "value": encode_units(self.amount),
        }

    def to_json(self) -> dict[str, object]:
        """The ``fields`` object of docs/sts-vectors.md."""
        return {
            "class": 2,
            "subclass": self.subclass,
            "rnd": self.rnd,
            "tid": self.tid,
            "amount": self.amount,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ClearCredit:
    """Class 2 subclass 1: clear a credit register (0-7 as the class 0 subclasses, 0xFFFF all)."""

    TOKEN_CLASS: ClassVar[int] = TokenClass.MANAGEMENT
    subclass: int = ManagementSubclass.CLEAR_CREDIT
    rnd: int
    tid: int
    register: int

    def __post_init__(self) -> None:
        _subclass_in("clear credit", self.subclass, (1,))

    def block_values(self) -> dict[str, int]:
        """The data-block field values (CRC excluded)."""
        return {
            "subclass": self.subclass,
            "rnd": self.rnd,
            "tid": self.tid,
            "value": self.register,
        }

    def to_json(self) -> dict[str, object]:
        """The ``fields`` object of docs/sts-vectors.md."""
        return {
            "class": 2,
            "subclass": self.subclass,
            "rnd": self.rnd,
            "tid": self.tid,
            "register": self.register,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class RegisterSetting:
    """Class 2 subclass 2 (tariff rate), 7 (water meter factor) or 10 (extended): a raw value.

    The scaling of the 16-bit ``value`` is not known from public sources [?]; it is carried as is.
    """

    TOKEN_CLASS: ClassVar[int] = TokenClass.MANAGEMENT
    subclass: int
    rnd: int
    tid: int
    value: int

    def __post_init__(self) -> None:
        _subclass_in("register setting", self.subclass, (2, 7, 10))

    def block_values(self) -> dict[str, int]:
        """The data-block field values (CRC excluded)."""
        return {"subclass": self.subclass, "rnd": self.rnd, "tid": self.tid, "value": self.value}

    def to_json(self) -> dict[str, object]:
        """The ``fields`` object of docs/sts-vectors.md."""
        return {
            "class": 2,
            "subclass": self.subclass,
            "rnd": self.rnd,
            "tid": self.tid,
            "value": self.value,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ClearTamper:
    """Class 2 subclass 5: clear the tamper condition (the 16-bit field is zero)."""

    TOKEN_CLASS: ClassVar[int] = TokenClass.MANAGEMENT
    subclass: int = ManagementSubclass.CLEAR_TAMPER_CONDITION
    rnd: int
    tid: int

    def __post_init__(self) -> None:
        _subclass_in("clear tamper", self.subclass, (5,))

    def block_values(self) -> dict[str, int]:
        """The data-block field values (CRC excluded)."""
        return {"subclass": self.subclass, "rnd": self.rnd, "tid": self.tid, "value": 0}

    def to_json(self) -> dict[str, object]:
        """The ``fields`` object of docs/sts-vectors.md."""
        return {"class": 2, "subclass": self.subclass, "rnd": self.rnd, "tid": self.tid}


@dataclass(frozen=True, slots=True, kw_only=True)
class KeySection1:
    """Class 2 subclass 3: first key-change section, the new key's attributes and high half.

    ``nkho`` is the new decoder key's bytes 0..3 (most significant first) as an integer.
    """

    TOKEN_CLASS: ClassVar[int] = TokenClass.MANAGEMENT
    subclass: int = ManagementSubclass.SET_1ST_SECTION_DECODER_KEY
    kenho: int
    krn: int
    ro: int
    three_kct: int
    kt: int
    nkho: int

    def __post_init__(self) -> None:
        _subclass_in("1st key section", self.subclass, (3,))

    def block_values(self) -> dict[str, int]:
        """The data-block field values (CRC excluded)."""
        return {
            "subclass": self.subclass,
            "kenho": self.kenho,
            "krn": self.krn,
            "ro": self.ro,
            "three_kct": self.three_kct,
            "kt": self.kt,
            "nkho": self.nkho,
        }

    def to_json(self) -> dict[str, object]:
        """The ``fields`` object of docs/sts-vectors.md (``nkho`` in hex)."""
        return {
            "class": 2,
            "subclass": self.subclass,
            "kenho": self.kenho,
            "krn": self.krn,
            "ro": self.ro,
            "three_kct": self.three_kct,
            "kt": self.kt,
            "nkho": _hex(self.nkho, 8),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class KeySection2:
    """Class 2 subclass 4: second key-change section, KEN low nibble, TI and the key's low bytes.

    ``nklo`` is the new key's last 4 bytes (bytes 4..7 for EA07, 12..15 for EA11).
    """

    TOKEN_CLASS: ClassVar[int] = TokenClass.MANAGEMENT
    subclass: int = ManagementSubclass.SET_2ND_SECTION_DECODER_KEY
    kenlo: int
    ti: int
    nklo: int

    def __post_init__(self) -> None:
        _subclass_in("2nd key section", self.subclass, (4,))

    def block_values(self) -> dict[str, int]:
        """The data-block field values (CRC excluded)."""
        return {"subclass": self.subclass, "kenlo": self.kenlo, "ti": self.ti, "nklo": self.nklo}

    def to_json(self) -> dict[str, object]:
        """The ``fields`` object of docs/sts-vectors.md (``nklo`` in hex)."""
        return {
            "class": 2,
            "subclass": self.subclass,
            "kenlo": self.kenlo,
            "ti": self.ti,
            "nklo": _hex(self.nklo, 8),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class KeySectionExtra:
    """Class 2 subclass 8 or 9: third/fourth key-change section, a 44-bit ``payload``.

    Under EA07, subclass 8 is the "3-KCT" token: the new SGC in binary and 20 zero bits. Under
    EA11, subclass 8 holds the SGC's low 12 bits and key bytes 4..7, subclass 9 the SGC's high
    12 bits and key bytes 8..11. Use :meth:`sta_sgc` / :meth:`misty` to build them.
    """

    TOKEN_CLASS: ClassVar[int] = TokenClass.MANAGEMENT
    subclass: int = ManagementSubclass.SET_3RD_SECTION_DECODER_KEY
    payload: int

    def __post_init__(self) -> None:
        _subclass_in("3rd/4th key section", self.subclass, (8, 9))

    @classmethod
    def sta_sgc(cls, sgc: int) -> KeySectionExtra:
        """The EA07 3rd section carrying the new supply group code ``sgc`` (as a number)."""
        return cls(subclass=8, payload=pack(STA_SGC_SECTION, {"sgc": sgc}))

    @classmethod
    def misty(cls, subclass: int, sgc: int, new_key: bytes) -> KeySectionExtra:
        """The EA11 3rd (``subclass`` 8) or 4th (9) section for ``sgc`` and the 16-byte key."""
        if subclass == ManagementSubclass.SET_3RD_SECTION_DECODER_KEY:
            sgc_part, key_part = sgc & 0xFFF, new_key[4:8]
        else:
            sgc_part, key_part = sgc >> 12, new_key[8:12]
        payload = pack(
            MISTY_KEY_SECTION,
            {"sgc_part": sgc_part, "key_part": int.from_bytes(key_part, "big")},
        )
        return cls(subclass=subclass, payload=payload)

    def block_values(self) -> dict[str, int]:
        """The data-block field values (CRC excluded)."""
        return {"subclass": self.subclass, "payload": self.payload}

    def to_json(self) -> dict[str, object]:
        """The ``fields`` object of docs/sts-vectors.md (``payload`` in hex, 11 digits)."""
        return {"class": 2, "subclass": self.subclass, "payload": _hex(self.payload, 11)}


TokenFields = (
    UnitsCredit
    | CurrencyCredit
    | MeterTest
    | PowerLimit
    | ClearCredit
    | RegisterSetting
    | ClearTamper
    | KeySection1
    | KeySection2
    | KeySectionExtra
)
"""Any token's contents."""


# --- The registry: (class, subclass) → layout and constructors --------------------------------


@dataclass(frozen=True, slots=True)
class _Shape:
    layout: Layout
    from_values: Callable[[int, dict[str, int]], TokenFields]
    from_json: Callable[[int, Mapping[str, object]], TokenFields]
    currency: bool = False  # CRC_C


def _currency_from_values(subclass: int, v: dict[str, int]) -> TokenFields:
    value = v["sign"] << 19 | v["exponent_high"] << 16 | v["exponent_low"] << 14 | v["mantissa"]
    return CurrencyCredit(subclass=subclass, tid=v["tid"], amount=decode_currency(value))


_SHAPES: Final[dict[tuple[int, int], _Shape]] = {}
for _sub in range(4):
    _SHAPES[0, _sub] = _Shape(
        RND_TID_VALUE,
        lambda s, v: UnitsCredit(
            subclass=s, rnd=v["rnd"], tid=v["tid"], amount=decode_units(v["value"])
        ),
        lambda s, d: UnitsCredit(
            subclass=s, rnd=_int(d, "rnd", 0), tid=_int(d, "tid"), amount=_int(d, "amount")
        ),
    )
for _sub in range(4, 8):
    _SHAPES[0, _sub] = _Shape(
        CURRENCY_BLOCK,
        _currency_from_values,
        lambda s, d: CurrencyCredit(subclass=s, tid=_int(d, "tid"), amount=_int(d, "amount")),
        currency=True,
    )
for _sub, _layout in ((0, TEST_SHORT_BLOCK), (1, TEST_LONG_BLOCK)):
    _SHAPES[1, _sub] = _Shape(
        _layout,
        lambda s, v: MeterTest(
            subclass=s, control=v["control"], manufacturer_code=v["manufacturer_code"]
        ),
        lambda s, d: MeterTest(
            subclass=s,
            control=_int_or_hex(d, "control"),
            manufacturer_code=_int(d, "manufacturer_code", 0),
        ),
    )
for _sub in (0, 6):
    _SHAPES[2, _sub] = _Shape(
        RND_TID_VALUE,
        lambda s, v: PowerLimit(
            subclass=s, rnd=v["rnd"], tid=v["tid"], amount=decode_units(v["value"])
        ),
        lambda s, d: PowerLimit(
            subclass=s, rnd=_int(d, "rnd", 0), tid=_int(d, "tid"), amount=_int(d, "amount")
        ),
    )
_SHAPES[2, 1] = _Shape(
    RND_TID_VALUE,
    lambda s, v: ClearCredit(subclass=s, rnd=v["rnd"], tid=v["tid"], register=v["value"]),
    lambda s, d: ClearCredit(
        subclass=s, rnd=_int(d, "rnd", 0), tid=_int(d, "tid"), register=_int(d, "register")
    ),
)
for _sub in (2, 7, 10):
    _SHAPES[2, _sub] = _Shape(
        RND_TID_VALUE,
        lambda s, v: RegisterSetting(subclass=s, rnd=v["rnd"], tid=v["tid"], value=v["value"]),
        lambda s, d: RegisterSetting(
            subclass=s, rnd=_int(d, "rnd", 0), tid=_int(d, "tid"), value=_int(d, "value")
        ),
    )
_SHAPES[2, 5] = _Shape(
    RND_TID_VALUE,
    lambda s, v: ClearTamper(subclass=s, rnd=v["rnd"], tid=v["tid"]),
    lambda s, d: ClearTamper(subclass=s, rnd=_int(d, "rnd", 0), tid=_int(d, "tid")),
)
_SHAPES[2, 3] = _Shape(
    KEY_SECTION_1_BLOCK,
    lambda s, v: KeySection1(
        subclass=s,
        kenho=v["kenho"],
        krn=v["krn"],
        ro=v["ro"],
        three_kct=v["three_kct"],
        kt=v["kt"],
        nkho=v["nkho"],
    ),
    lambda s, d: KeySection1(
        subclass=s,
        kenho=_int(d, "kenho"),
        krn=_int(d, "krn"),
        ro=_int(d, "ro", 0),
        three_kct=_int(d, "three_kct", 0),
        kt=_int(d, "kt"),
        nkho=_int_or_hex(d, "nkho"),
    ),
)
_SHAPES[2, 4] = _Shape(
    KEY_SECTION_2_BLOCK,
    lambda s, v: KeySection2(subclass=s, kenlo=v["kenlo"], ti=v["ti"], nklo=v["nklo"]),
    lambda s, d: KeySection2(
        subclass=s, kenlo=_int(d, "kenlo"), ti=_int(d, "ti"), nklo=_int_or_hex(d, "nklo")
    ),
)
for _sub in (8, 9):
    _SHAPES[2, _sub] = _Shape(
        KEY_SECTION_EXTRA_BLOCK,
        lambda s, v: KeySectionExtra(subclass=s, payload=v["payload"]),
        lambda s, d: KeySectionExtra(subclass=s, payload=_int_or_hex(d, "payload")),
    )


def _is_currency(token_class: int, subclass: int) -> bool:
    return token_class == TokenClass.TRANSFER_CREDIT and 4 <= subclass <= 7


def is_supported(token_class: int, subclass: int) -> bool:
    """Whether this engine builds and decodes tokens of ``token_class``/``subclass``."""
    return (token_class, subclass) in _SHAPES


def fields_from_json(data: Mapping[str, object]) -> TokenFields:
    """Token contents from a docs/sts-vectors.md ``fields`` object (hex as strings or integers).

    A missing ``rnd`` is taken as 0.

    Raises:
        InvalidField: a field is missing or of the wrong type.
        UnsupportedToken: the class/subclass is not one this engine builds.
    """
    token_class = _int(data, "class")
    subclass = _int(data, "subclass")
    shape = _SHAPES.get((token_class, subclass))
    if shape is None:
        raise UnsupportedToken(token_class, subclass)
    return shape.from_json(subclass, data)


def encode_block(fields: TokenFields) -> int:
    """The clear 64-bit data block of ``fields``, CRC included.

    Raises:
        InvalidField: a field is out of range (``AmountNotEncodable`` for amounts).
    """
    token_class = fields.TOKEN_CLASS
    shape = _SHAPES[token_class, fields.subclass]
    block = pack(shape.layout, fields.block_values())
    return block | crc_field(token_class << 48 | block >> 16, currency=shape.currency)


def decode_block(token_class: int, block: int) -> TokenFields:
    """The contents of the clear 64-bit data ``block`` of a ``token_class`` token.

    Raises:
        CrcMismatch: the CRC field does not match (a wrong key, or a mistyped digit).
        UnsupportedToken: the CRC matches but the class/subclass is reserved or proprietary.
    """
    subclass = block >> 60
    shape = _SHAPES.get((token_class, subclass))
    # CRC_C for currency subclasses, also when the subclass is unknown to us (5-7 are currency).
    currency = shape.currency if shape is not None else _is_currency(token_class, subclass)
    expected = crc_field(token_class << 48 | block >> 16, currency=currency)
    if block & 0xFFFF != expected:
        raise CrcMismatch(
            f"the token's CRC is {block & 0xFFFF:04x}, its content gives {expected:04x}:"
            " it was made with another decoder key, or a digit is mistyped"
        )
    if shape is None:
        raise UnsupportedToken(token_class, subclass)
    return shape.from_values(subclass, unpack(shape.layout, block))


# --- Whole tokens -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenImage:
    """A token at every stage: its contents, its clear data block and its 66-bit value.

    ``fields`` are the contents as given to :func:`build_token` (amounts as asked, before
    rounding) or as read by :func:`decode_token` (amounts as carried).

    ``repr`` shows the contents and block but only the last four digits of the token.
    """

    fields: TokenFields
    data_block: int
    value: int

    @property
    def digits(self) -> str:
        """The token's 20 digits."""
        return f"{self.value:020d}"  # value < 2**66 by construction: always 20 digits

    @property
    def token_class(self) -> int:
        """The 2-bit token class."""
        return self.fields.TOKEN_CLASS

    def __repr__(self) -> str:
        return (
            f"TokenImage(fields={self.fields!r}, data_block={self.data_block:016x},"
            f" digits=****{self.digits[-4:]})"
        )


def needs_key(token_class: int) -> bool:
    """Whether tokens of ``token_class`` are encrypted (classes 0, 2 and reserved 3)."""
    return token_class != TokenClass.METER_TEST


def build_token(fields: TokenFields, cipher: BlockCipher | None) -> TokenImage:
    """Encode, encrypt (except class 1) and transpose ``fields`` into a token.

    ``cipher`` is the meter's decoder-key cipher; it may be ``None`` for class 1.

    Raises:
        InvalidField: a field is out of range.
        InvalidKey: a class 0 or 2 token was asked for without a cipher.
    """
    block = encode_block(fields)
    return TokenImage(fields, block, _seal(block, fields.TOKEN_CLASS, cipher))


def token_digits(fields: TokenFields, cipher: BlockCipher | None) -> str:
    """The 20 digits of the token for ``fields``: :func:`build_token` for bulk vending.

    Raises:
        InvalidField: a field is out of range.
        InvalidKey: a class 0 or 2 token was asked for without a cipher.
    """
    return f"{_seal(encode_block(fields), fields.TOKEN_CLASS, cipher):020d}"


def _seal(block: int, token_class: int, cipher: BlockCipher | None) -> int:
    # block is 64 bits (packed) and token_class 0..2 (a TokenFields class), so transpose is safe.
    if token_class == 1:  # class 1 (METER_TEST) is sent in clear
        return transpose(block, token_class)
    if cipher is None:
        raise InvalidKey("decoder_key", None, "class 0 and 2 tokens need a decoder key")
    return transpose(cipher.encrypt(block), token_class)


def decode_token(digits: str, cipher: BlockCipher | None) -> TokenImage:
    """Read a 20-digit token: remove the class bits, decrypt (except class 1), check the CRC.

    Raises:
        TokenFormatError: not 20 digits, or a value of 2**66 or more.
        InvalidKey: the token is encrypted and no cipher was given.
        CrcMismatch: the CRC does not match (another meter's key, or a typo).
        UnsupportedToken: a valid token of a class/subclass this engine does not know.
    """
    value = from_digits(digits)
    token_class, sent = extract_class(value)
    if needs_key(token_class):
        if cipher is None:
            raise InvalidKey(
                "decoder_key", None, f"a class {token_class} token needs a decoder key to decode"
            )
        block = cipher.decrypt(sent)
    else:
        block = sent
    return TokenImage(decode_block(token_class, block), block, value)
