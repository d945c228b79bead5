"""A meter emulator: decodes tokens and applies a meter's acceptance rules (docs/sts.md §9-§10).

It holds a decoder key and the key's attributes, a TID store and the registers a prepayment
meter keeps, and answers every token with a :class:`MeterResponse` whose :class:`Verdict` names
the outcome. The checks run in the order public meter firmware uses [1]:

1. 20 digits below 2**66, else ``FORMAT_ERROR``;
2. class bits removed, class 0/2 decrypted (class 1 is clear);
3. CRC, else ``CRC_ERROR`` (another meter's key, or a typo);
4. known class/subclass, else ``NOT_SUPPORTED``;
5. tokens with a TID: ``KEY_EXPIRED`` if ``tid >> 16 > KEN``; ``USED`` if the TID is in the
   store; ``OLD`` if the store is full and the TID is below its smallest; else the TID replaces
   the smallest;
6. credit refused with a default key (KT 1, DDTK): ``KEY_TYPE_REFUSED``;
7. key-change sections are not TID-checked. They are kept until the set is complete (EA07:
   3 + 4, + 8 when 3KCT = 1; EA11: 3 + 4 + 8 + 9). A first section (subclass 3) starts a set:
   sections kept from before it (a set left incomplete) are dropped, so a key is never
   assembled from two sets' sections (a key no token works under). A two-token EA07 set does
   not tell the meter its new SGC (it is part of the derived key); the emulator keeps the SGC
   it had. When the set is complete the new key and attributes are
   installed, and RO = 1 clears the TID store. A change to KT 0 is refused unless the key is
   KT 0, and KT 3 (common key) is refused by keypad meters. A complete set whose attributes
   cannot be a key's (KRN 0 or 10-15, TI above 99, SGC above 999999) is ``NOT_SUPPORTED``
   and the old key stays, as is a rollover (RO = 1) to the key the meter already holds
   (clearing the TID store under the same key would let every old token in again).

What a real meter displays for each outcome is meter-specific ("Err", "Used", "Old" …).
The emulator is an oracle for tests and engineering, not a certified meter.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from enum import StrEnum

from gateway.sts.bits import unpack
from gateway.sts.carrier import extract_class, from_digits
from gateway.sts.cipher import BlockCipher, EncryptionAlgorithm, make_cipher
from gateway.sts.dkga import derive_decoder_key
from gateway.sts.ea07 import StaTables
from gateway.sts.engine import MeterProfile, VendingKey
from gateway.sts.errors import CrcMismatch, InvalidField, TokenFormatError, UnsupportedToken
from gateway.sts.keychange import KeyAttributes
from gateway.sts.tid import BASE_DATES
from gateway.sts.tokens import (
    ALL_REGISTERS,
    MISTY_KEY_SECTION,
    STA_SGC_SECTION,
    ClearCredit,
    ClearTamper,
    CurrencyCredit,
    KeySection1,
    KeySection2,
    KeySectionExtra,
    MeterTest,
    PowerLimit,
    RegisterSetting,
    TokenFields,
    TokenImage,
    UnitsCredit,
    decode_block,
    needs_key,
)

DEFAULT_TID_STORE_DEPTH = 20
"""TIDs a meter remembers (the firmware seen keeps 20; the standard's minimum is unknown)."""

KT_DITK, KT_DDTK, KT_DUTK, KT_DCTK = 0, 1, 2, 3
CREDIT_REGISTERS = range(8)  # one per class 0 subclass


class Verdict(StrEnum):
    """How a meter answered a token. Two outcomes accept; every other one is a rejection."""

    ACCEPTED = "accepted"
    KEY_CHANGE_PENDING = "key_change_pending"  # a key-change section stored, set not complete
    FORMAT_ERROR = "format_error"  # not 20 digits, or >= 2**66
    CRC_ERROR = "crc_error"  # wrong key (another meter's) or a mistyped digit
    NOT_SUPPORTED = "not_supported"  # reserved/proprietary class or subclass, unknown register
    KEY_EXPIRED = "key_expired"  # TID >> 16 above the key's KEN
    USED = "used"  # TID already in the store
    OLD = "old"  # store full and TID below its smallest
    KEY_TYPE_REFUSED = "key_type_refused"  # credit with a DDTK, or a forbidden new key type

    @property
    def is_accepted(self) -> bool:
        """Whether the meter took the token (a stored key-change section counts)."""
        return self in (Verdict.ACCEPTED, Verdict.KEY_CHANGE_PENDING)


class Setting(StrEnum):
    """The management registers a meter keeps besides credit."""

    MAXIMUM_POWER_LIMIT = "maximum_power_limit"  # W
    PHASE_UNBALANCE_LIMIT = "phase_unbalance_limit"  # W
    TARIFF_RATE = "tariff_rate"  # raw 16-bit value
    WATER_METER_FACTOR = "water_meter_factor"  # raw 16-bit value
    EXTENDED = "extended"  # raw 16-bit value (STS202-5)


@dataclass(frozen=True, slots=True, kw_only=True)
class CreditAdded:
    """A credit (or, for currency, a signed amount) was added to ``register``."""

    register: int
    amount: int
    balance: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CreditCleared:
    """The listed credit registers were set to zero."""

    registers: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SettingChanged:
    """A management register took a new value."""

    setting: Setting
    value: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TamperCleared:
    """The tamper condition was cleared."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DisplayRequested:
    """A class 1 test/display was asked for (bit ``n-1`` of ``control`` = test ``n``)."""

    control: int
    manufacturer_code: int


@dataclass(frozen=True, slots=True, kw_only=True)
class KeySectionStored:
    """A key-change section was kept; the sections in ``missing`` are still to come."""

    subclass: int
    missing: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyChanged:
    """The set was complete: the new key and ``attributes`` are installed."""

    attributes: KeyAttributes
    rollover: bool


Change = (
    CreditAdded
    | CreditCleared
    | SettingChanged
    | TamperCleared
    | DisplayRequested
    | KeySectionStored
    | KeyChanged
)
"""What an accepted token changed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterResponse:
    """The meter's answer to one token.

    Attributes:
        verdict: the outcome.
        change: what was applied, for accepted tokens.
        token: the decoded token, once it got past the CRC check.
        reason: one sentence for engineers (why it was refused, or what happened).
    """

    verdict: Verdict
    change: Change | None = None
    token: TokenImage | None = None
    reason: str = ""

    @property
    def accepted(self) -> bool:
        """Whether the meter took the token."""
        return self.verdict.is_accepted


_TID_FIELDS = (UnitsCredit, CurrencyCredit, PowerLimit, ClearCredit, RegisterSetting, ClearTamper)
_TidToken = UnitsCredit | CurrencyCredit | PowerLimit | ClearCredit | RegisterSetting | ClearTamper


class MeterEmulator:
    """A prepayment meter as far as tokens go. Not thread-safe; one instance per meter.

    Args:
        decoder_key: the meter's decoder key (8 bytes EA07, 16 bytes EA11).
        attributes: the key's attributes (KT, KRN, TI, SGC, EA, KEN, base date).
        tid_store_depth: how many TIDs the meter remembers.
        keypad: a keypad meter refuses a key change to KT 3 (common key, card carriers only).
        sta_tables: STA tables for EA07.
    """

    def __init__(
        self,
        *,
        decoder_key: bytes,
        attributes: KeyAttributes,
        tid_store_depth: int = DEFAULT_TID_STORE_DEPTH,
        keypad: bool = True,
        sta_tables: StaTables = StaTables.REAL,
    ) -> None:
        if tid_store_depth < 1:
            raise ValueError("a TID store holds at least one TID")
        self._sta_tables = sta_tables
        self._attributes = attributes
        self._key = bytes(decoder_key)
        self._cipher: BlockCipher = make_cipher(attributes.ea, decoder_key, sta_tables=sta_tables)
        self._depth = tid_store_depth
        self._keypad = keypad
        self._tids: list[int] = []  # sorted ascending
        self._pending: dict[int, KeySection1 | KeySection2 | KeySectionExtra] = {}
        self.credit: dict[int, int] = dict.fromkeys(CREDIT_REGISTERS, 0)
        """Credit per register (class 0 subclass), in the subclass's base units."""
        self.settings: dict[Setting, int] = {}
        """Management registers set so far."""
        self.tampered = False
        """The tamper flag; a clear-tamper token resets it."""

    @classmethod
    def for_profile(
        cls,
        meter: MeterProfile,
        vending_key: VendingKey,
        *,
        tid_store_depth: int = DEFAULT_TID_STORE_DEPTH,
        keypad: bool = True,
        sta_tables: StaTables = StaTables.REAL,
    ) -> MeterEmulator:
        """An emulator keyed like ``meter`` would be, deriving its key from ``vending_key``."""
        decoder_key = derive_decoder_key(
            dkga=meter.dkga,
            vending_key=vending_key.key,
            iin=meter.iin,
            drn=meter.drn,
            key_type=meter.key_type,
            sgc=meter.sgc,
            tariff_index=meter.tariff_index,
            krn=meter.krn,
            base_date=meter.base_date,
            ea=meter.ea,
        )
        return cls(
            decoder_key=decoder_key,
            attributes=meter.key_attributes(),
            tid_store_depth=tid_store_depth,
            keypad=keypad,
            sta_tables=sta_tables,
        )

    def __repr__(self) -> str:
        return f"MeterEmulator(attributes={self._attributes!r}, tids={len(self._tids)})"

    @property
    def attributes(self) -> KeyAttributes:
        """The installed key's attributes."""
        return self._attributes

    @property
    def tids(self) -> tuple[int, ...]:
        """The TID store, ascending."""
        return tuple(self._tids)

    # --- the token path -----------------------------------------------------------------------

    def enter(self, digits: str) -> MeterResponse:
        """Key in a token; the meter answers with a verdict and, if accepted, the change."""
        try:
            token_class, sent = extract_class(from_digits(digits))
        except TokenFormatError as exc:
            return MeterResponse(verdict=Verdict.FORMAT_ERROR, reason=str(exc))
        block = self._cipher.decrypt(sent) if needs_key(token_class) else sent
        try:
            fields = decode_block(token_class, block)
        except CrcMismatch as exc:
            return MeterResponse(verdict=Verdict.CRC_ERROR, reason=str(exc))
        except UnsupportedToken as exc:
            return MeterResponse(verdict=Verdict.NOT_SUPPORTED, reason=str(exc))
        image = TokenImage(fields, block, from_digits(digits))
        response = self._apply(fields)
        return replace(response, token=image)

    def _apply(self, fields: TokenFields) -> MeterResponse:
        if isinstance(fields, MeterTest):
            return _accept(
                DisplayRequested(
                    control=fields.control, manufacturer_code=fields.manufacturer_code
                ),
                "test/display requested",
            )
        if isinstance(fields, KeySection1 | KeySection2 | KeySectionExtra):
            return self._key_section(fields)
        if isinstance(fields, ClearCredit) and not (
            fields.register in CREDIT_REGISTERS or fields.register == ALL_REGISTERS
        ):
            return MeterResponse(
                verdict=Verdict.NOT_SUPPORTED, reason=f"no credit register {fields.register}"
            )
        assert isinstance(fields, _TID_FIELDS)  # noqa: S101 - the union is exhausted above
        refusal = self._check_tid(fields.tid)
        if refusal is not None:
            return refusal
        if (
            isinstance(fields, UnitsCredit | CurrencyCredit)
            and self._attributes.key_type == KT_DDTK
        ):
            return MeterResponse(
                verdict=Verdict.KEY_TYPE_REFUSED,
                reason="a meter with a default key (KT 1, DDTK) takes no credit tokens",
            )
        self._remember(fields.tid)
        return self._apply_tid_token(fields)

    def _check_tid(self, tid: int) -> MeterResponse | None:
        ken = self._attributes.ken
        if tid >> 16 > ken:
            return MeterResponse(
                verdict=Verdict.KEY_EXPIRED,
                reason=f"TID {tid} is past the key's expiry (TID >> 16 = {tid >> 16} > KEN {ken})",
            )
        index = bisect.bisect_left(self._tids, tid)
        if index < len(self._tids) and self._tids[index] == tid:
            return MeterResponse(verdict=Verdict.USED, reason=f"TID {tid} was used before")
        if len(self._tids) >= self._depth and tid < self._tids[0]:
            return MeterResponse(
                verdict=Verdict.OLD,
                reason=f"TID {tid} is older than every TID in the full store (>= {self._tids[0]})",
            )
        return None

    def _remember(self, tid: int) -> None:
        if len(self._tids) >= self._depth:
            del self._tids[0]  # the smallest makes room
        bisect.insort(self._tids, tid)

    def _apply_tid_token(
        self,
        fields: UnitsCredit
        | CurrencyCredit
        | PowerLimit
        | ClearCredit
        | RegisterSetting
        | ClearTamper,
    ) -> MeterResponse:
        match fields:
            case UnitsCredit() | CurrencyCredit():
                self.credit[fields.subclass] += fields.amount
                return _accept(
                    CreditAdded(
                        register=fields.subclass,
                        amount=fields.amount,
                        balance=self.credit[fields.subclass],
                    ),
                    f"credit {fields.amount} to register {fields.subclass}",
                )
            case PowerLimit():
                setting = (
                    Setting.MAXIMUM_POWER_LIMIT
                    if fields.subclass == 0
                    else Setting.PHASE_UNBALANCE_LIMIT
                )
                return self._set(setting, fields.amount)
            case ClearCredit():
                registers = (
                    tuple(CREDIT_REGISTERS)
                    if fields.register == ALL_REGISTERS
                    else (fields.register,)
                )
                for register in registers:
                    self.credit[register] = 0
                return _accept(CreditCleared(registers=registers), "credit cleared")
            case RegisterSetting():
                setting = {
                    2: Setting.TARIFF_RATE,
                    7: Setting.WATER_METER_FACTOR,
                    10: Setting.EXTENDED,
                }[fields.subclass]
                return self._set(setting, fields.value)
            case ClearTamper():
                self.tampered = False
                return _accept(TamperCleared(), "tamper condition cleared")

    def _set(self, setting: Setting, value: int) -> MeterResponse:
        self.settings[setting] = value
        return _accept(SettingChanged(setting=setting, value=value), f"{setting} set to {value}")

    # --- key change ---------------------------------------------------------------------------

    def _is_misty(self) -> bool:
        return self._attributes.ea == EncryptionAlgorithm.EA11

    def _needed(self) -> set[int]:
        if self._is_misty():
            return {3, 4, 8, 9}
        first = self._pending.get(3)
        if isinstance(first, KeySection1) and first.three_kct:
            return {3, 4, 8}
        return {3, 4}

    def _key_section(self, fields: KeySection1 | KeySection2 | KeySectionExtra) -> MeterResponse:
        if isinstance(fields, KeySection1):
            self._pending.clear()  # a new set begins: never mix it with an earlier one's sections
            refusal = self._refuse_key_type(fields.kt)
            if refusal is not None:
                return refusal
        if fields.subclass == 9 and not self._is_misty():
            return MeterResponse(
                verdict=Verdict.NOT_SUPPORTED, reason="a 4th key section is for EA11 meters only"
            )
        self._pending[fields.subclass] = fields
        missing = tuple(sorted(self._needed() - self._pending.keys()))
        if missing:
            return MeterResponse(
                verdict=Verdict.KEY_CHANGE_PENDING,
                change=KeySectionStored(subclass=fields.subclass, missing=missing),
                reason=f"key-change section {fields.subclass} kept; waiting for {missing}",
            )
        return self._install()

    def _refuse_key_type(self, new_kt: int) -> MeterResponse | None:
        if new_kt == KT_DITK and self._attributes.key_type != KT_DITK:
            return MeterResponse(
                verdict=Verdict.KEY_TYPE_REFUSED,
                reason="a key change to KT 0 (DITK) is refused unless the key is KT 0",
            )
        if new_kt == KT_DCTK and self._keypad:
            return MeterResponse(
                verdict=Verdict.KEY_TYPE_REFUSED,
                reason="a keypad meter refuses KT 3 (DCTK, for card carriers)",
            )
        return None

    def _install(self) -> MeterResponse:
        first = self._pending[3]
        second = self._pending[4]
        assert isinstance(first, KeySection1)  # noqa: S101 - stored by subclass
        assert isinstance(second, KeySection2)  # noqa: S101 - stored by subclass
        old = self._attributes
        sgc = old.sgc
        high = first.nkho.to_bytes(4, "big")
        low = second.nklo.to_bytes(4, "big")
        if self._is_misty():
            third = unpack(MISTY_KEY_SECTION, self._payload(8))
            fourth = unpack(MISTY_KEY_SECTION, self._payload(9))
            new_key = (
                high
                + third["key_part"].to_bytes(4, "big")
                + fourth["key_part"].to_bytes(4, "big")
                + low
            )
            sgc = f"{fourth['sgc_part'] << 12 | third['sgc_part']:06d}"
        else:
            new_key = high + low
            if first.three_kct:
                sgc = f"{unpack(STA_SGC_SECTION, self._payload(8))['sgc']:06d}"
        rollover = bool(first.ro)
        if rollover and new_key == self._key:
            self._pending.clear()
            return MeterResponse(
                verdict=Verdict.NOT_SUPPORTED,
                reason="key-change set refused, the old key stays: a rollover (RO = 1) to the"
                " key the meter already holds would clear its TIDs and let its old tokens in"
                " again",
            )
        try:
            attributes = KeyAttributes(
                key_type=first.kt,
                krn=first.krn,
                tariff_index=f"{second.ti:02d}",
                sgc=sgc,
                ea=old.ea,
                ken=first.kenho << 4 | second.kenlo,
                base_date=_next_base_date(old.base_date) if rollover else old.base_date,
            )
        except (
            InvalidField
        ) as exc:  # CRC-valid sections with a KRN 0/10-15, TI > 99, SGC > 6 digits
            self._pending.clear()
            return MeterResponse(
                verdict=Verdict.NOT_SUPPORTED,
                reason=f"key-change set refused, the old key stays: {exc}",
            )
        self._cipher = make_cipher(old.ea, new_key, sta_tables=self._sta_tables)
        self._key = new_key
        self._attributes = attributes
        self._pending.clear()
        if rollover:
            self._tids.clear()
        return _accept(
            KeyChanged(attributes=attributes, rollover=rollover),
            "new key installed" + (", TID store cleared" if rollover else ""),
        )

    def _payload(self, subclass: int) -> int:
        section = self._pending[subclass]
        assert isinstance(section, KeySectionExtra)  # noqa: S101 - stored by subclass
        return section.payload

    def tamper(self) -> None:
        """Raise the tamper flag (what a meter does when its cover is opened)."""
        self.tampered = True


def _accept(change: Change, reason: str) -> MeterResponse:
    return MeterResponse(verdict=Verdict.ACCEPTED, change=change, reason=reason)


def _next_base_date(base_date: int) -> int:
    """The meter learns no base date from tokens; a rollover is taken to mean the next one."""
    later = [bd for bd in BASE_DATES if bd > base_date]
    return later[0] if later else base_date
