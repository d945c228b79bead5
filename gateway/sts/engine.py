"""The token engine the rest of the product uses: value types, ``TokenEngine``, the local engine.

``TokenEngine`` is the port: the purchase saga asks it for a credit token, a key-change set or a
management token for a meter, and gets 20-digit :class:`Token` values back. ``LocalTokenEngine``
is the embedded default: it holds the vending keys (unsealed by the composition root), derives
each meter's decoder key (DKGA02/DKGA04) and encrypts in-process. A remote, HSM-backed engine
plugs in behind the same protocol.

The engine never chooses TIDs: the ledger does, with :func:`~gateway.sts.tid.next_tid`, so TIDs
stay unique and increasing per meter across processes. TIDs are minutes counted in UTC
(:data:`~gateway.sts.tid.TID_ZONE`): the sources leave the zone unspecified and vendors use local
time, so every issuer for a meter must agree on one zone.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from gateway.sts.amount import encode_units
from gateway.sts.carrier import group_digits, mask_digits, normalize_digits
from gateway.sts.cipher import BlockCipher, make_cipher
from gateway.sts.dkga import derive_decoder_key, validate_base_date, validate_krn, validate_sgc
from gateway.sts.ea07 import StaTables
from gateway.sts.errors import InvalidField, InvalidKey, KeyExpired, TokenFormatError, UnknownKey
from gateway.sts.keychange import KeyAttributes, key_change_fields
from gateway.sts.pan import validate_drn, validate_iin
from gateway.sts.tokens import (
    ClearCredit,
    ClearTamper,
    CurrencyCredit,
    ManagementSubclass,
    MeterTest,
    PowerLimit,
    RegisterSetting,
    TokenFields,
    TokenImage,
    UnitsCredit,
    decode_token,
    token_digits,
)

DEFAULT_CACHE_SIZE = 4096
"""Meters whose decoder key and cipher the local engine keeps (an LRU)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterProfile:
    """What a vend needs to know about a meter: its identity and its key's attributes.

    Attributes:
        drn: decoder reference number (the meter number), 11 digits (13 with IIN ``0000``).
        iin: issuer identification number, ``600727`` for STS.
        sgc: supply group code, 6 digits. With ``krn`` it selects the vending key.
        tariff_index: TI, 2 digits.
        krn: key revision number, 1..9.
        key_type: KT, 2 (DUTK, unique) for almost every meter.
        base_date: TID base date of the key (1993, 2014, 2035).
        ea: encryption algorithm, 7 (STA) or 11 (MISTY1).
        dkga: decoder key generation algorithm, 2 or 4.
        ken: key expiry number (255: never).

    Raises:
        InvalidField: an identifier or attribute is malformed (the field is named).
    """

    drn: str
    iin: str = "600727"
    sgc: str
    tariff_index: str
    krn: int
    key_type: int = 2
    base_date: int = 2014
    ea: int = 7
    dkga: int = 4
    ken: int = 255

    def __post_init__(self) -> None:
        validate_iin(self.iin)
        validate_drn(self.drn, self.iin)
        validate_base_date(self.base_date)
        self.key_attributes()  # validates KT, KRN, TI, SGC, EA, KEN

    def key_attributes(self) -> KeyAttributes:
        """The attributes of this meter's decoder key."""
        return KeyAttributes(
            key_type=self.key_type,
            krn=self.krn,
            tariff_index=self.tariff_index,
            sgc=self.sgc,
            ea=self.ea,
            ken=self.ken,
            base_date=self.base_date,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class VendingKey:
    """A vending key as loaded (unsealed) by the composition root. ``repr`` never shows the key.

    Attributes:
        sgc: the supply group code it serves.
        krn: its key revision number.
        dkga: the decoder key generation algorithm it is for (2: 8 bytes, 4: 20 bytes).
        base_date: its TID base date (the KLF attribute BDT).
        key: the key bytes.
    """

    sgc: str
    krn: int
    dkga: int
    base_date: int
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        validate_sgc(self.sgc)
        validate_krn(self.krn)
        validate_base_date(self.base_date)
        lengths = {2: 8, 4: 20}
        if self.dkga in lengths and len(self.key) != lengths[self.dkga]:
            raise InvalidKey(
                "vending_key",
                "<redacted>",
                f"a DKGA{self.dkga:02d} vending key is {lengths[self.dkga]} bytes,"
                f" got {len(self.key)}",
            )


@dataclass(frozen=True, slots=True)
class Token:
    """A 20-digit token. ``str``/``repr`` show only the last four digits; ``digits`` is the value.

    Raises:
        TokenFormatError: ``digits`` is not exactly 20 ASCII digits.
    """

    digits: str

    def __post_init__(self) -> None:
        if len(self.digits) != 20 or not (self.digits.isascii() and self.digits.isdigit()):
            raise TokenFormatError("a token is exactly 20 digits")

    @classmethod
    def parse(cls, text: str) -> Token:
        """A token from text as people type it (spaces or dashes between groups allowed)."""
        return cls(normalize_digits(text))

    def grouped(self) -> str:
        """The digits in five groups of four, for the customer: ``"1234 5678 …"``."""
        return group_digits(self.digits)

    def masked(self) -> str:
        """All but the last four digits hidden, for logs: ``"****-****-****-****-1234"``."""
        return mask_digits(self.digits)

    def __str__(self) -> str:
        return self.masked()

    def __repr__(self) -> str:
        return f"Token({self.masked()})"


class TokenEngine(Protocol):
    """Makes STS tokens for meters. Calls are pure: the same inputs give equivalent tokens.

    (The RND nibble is random, so digits differ between calls, but any of them is equally valid;
    a caller that must hand out one token per purchase stores the first it gets.)
    """

    async def credit_token(
        self, meter: MeterProfile, units: int, tid: int, *, subclass: int = 0
    ) -> Token:
        """A class 0 credit token of ``units`` for ``meter`` with identifier ``tid``.

        ``units`` is in base units of the subclass (0.1 kWh for electricity, subclass 0;
        0.00001 currency units for subclasses 4-7); it is rounded up (docs/sts.md §3.1).

        Raises:
            UnknownKey: no vending key for the meter's SGC and KRN.
            AmountNotEncodable: ``units`` is above the largest encodable amount.
            KeyExpired: ``tid >> 16`` exceeds the meter's KEN.
            InvalidField: a TID over 24 bits, a bad subclass, or a malformed profile.
        """
        ...

    async def key_change_tokens(self, old: MeterProfile, new: MeterProfile) -> list[Token]:
        """The ordered key-change set moving a meter from ``old`` to ``new`` (docs/sts.md §9).

        Raises:
            UnknownKey: no vending key for the old or the new SGC/KRN.
            InvalidField: the profiles are of different meters or algorithms.
            InvalidKey: the new decoder key is the current one while the base date changes or
                TIDs roll over (a DKGA02 change of base date alone): the meter would accept
                its old tokens again.
        """
        ...

    async def management_token(
        self, meter: MeterProfile, subclass: int, tid: int, value: int
    ) -> Token:
        """A class 2 management token with a TID (subclasses 0, 1, 2, 5, 6, 7, 10).

        ``value`` is in watts for 0 and 6 (rounded up like an amount), the register for 1, the
        raw 16-bit value for 2, 7 and 10, and must be 0 for 5 (clear tamper).

        Raises:
            UnknownKey: no vending key for the meter's SGC and KRN.
            InvalidField: an unsupported subclass or an out-of-range value.
            KeyExpired: ``tid >> 16`` exceeds the meter's KEN.
        """
        ...


def meter_test_token(control: int, *, manufacturer_code: int = 0, subclass: int = 0) -> Token:
    """A class 1 InitiateMeterTest/Display token (not encrypted, not meter-specific).

    ``control``: 0 for test 0, or a bit mask where bit ``n-1`` asks for test/display ``n``;
    ``subclass`` 0 for 2-digit manufacturer codes, 1 for 4-digit.
    """
    fields = MeterTest(subclass=subclass, control=control, manufacturer_code=manufacturer_code)
    return Token(token_digits(fields, None))


@dataclass(slots=True)
class _MeterKeys:
    decoder_key: bytes = field(repr=False)
    cipher: BlockCipher = field(repr=False)


class LocalTokenEngine:
    """The embedded :class:`TokenEngine`: vending keys in memory, everything in-process.

    Args:
        keys: the vending keys, one per (SGC, KRN).
        cache_size: meters whose derived decoder key and cipher are kept (LRU); 0 disables the
            cache (every token derives its key again, as a benchmark baseline).
        sta_tables: STA tables for EA07 (``SAMPLE`` only for the IEC example).
        rnd: source of the 4-bit RND field (default: a ``random.Random`` seeded by the OS).

    Calls are CPU-only (tens of microseconds) and do not block the event loop. Not thread-safe:
    use one instance from one event loop (or one per thread).

    Raises:
        InvalidKey: two keys for the same (SGC, KRN).
    """

    def __init__(
        self,
        keys: Iterable[VendingKey],
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        sta_tables: StaTables = StaTables.REAL,
        rnd: Callable[[], int] | None = None,
    ) -> None:
        self._keys: dict[tuple[str, int], VendingKey] = {}
        for key in keys:
            slot = (key.sgc, key.krn)
            if slot in self._keys:
                raise InvalidKey(
                    "vending_key", "<redacted>", f"two vending keys for SGC {key.sgc} KRN {key.krn}"
                )
            self._keys[slot] = key
        self._cache: OrderedDict[MeterProfile, _MeterKeys] = OrderedDict()
        self._cache_size = cache_size
        self._sta_tables = sta_tables
        # RND only makes tokens for equal contents differ; it is not a secret (docs/sts.md §2).
        self._rnd = rnd if rnd is not None else partial(random.Random().getrandbits, 4)

    def __repr__(self) -> str:
        return f"LocalTokenEngine(keys={sorted(self._keys)}, cached={len(self._cache)})"

    # --- keys ---------------------------------------------------------------------------------

    def _vending_key(self, meter: MeterProfile) -> VendingKey:
        key = self._keys.get((meter.sgc, meter.krn))
        if key is None:
            raise UnknownKey(meter.sgc, meter.krn)
        if key.dkga != meter.dkga:
            raise InvalidField(
                "dkga",
                meter.dkga,
                f"the vending key for SGC {meter.sgc} KRN {meter.krn} is DKGA{key.dkga:02d}",
            )
        if key.base_date != meter.base_date:
            raise InvalidField(
                "base_date",
                meter.base_date,
                f"the vending key for SGC {meter.sgc} KRN {meter.krn}"
                f" has base date {key.base_date}",
            )
        return key

    def _derive(self, meter: MeterProfile) -> _MeterKeys:
        vending_key = self._vending_key(meter)
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
        return _MeterKeys(
            decoder_key, make_cipher(meter.ea, decoder_key, sta_tables=self._sta_tables)
        )

    def _meter_keys(self, meter: MeterProfile) -> _MeterKeys:
        cache = self._cache
        found = cache.get(meter)
        if found is not None:
            cache.move_to_end(meter)
            return found
        keys = self._derive(meter)
        if self._cache_size > 0:
            cache[meter] = keys
            if len(cache) > self._cache_size:
                cache.popitem(last=False)
        return keys

    def decoder_key(self, meter: MeterProfile) -> bytes:
        """The meter's decoder key (for engineering tools; never log it).

        Raises:
            UnknownKey: no vending key for the meter's SGC and KRN.
        """
        return self._meter_keys(meter).decoder_key

    # --- tokens -------------------------------------------------------------------------------

    def _issue(self, meter: MeterProfile, fields: TokenFields) -> Token:
        return Token(token_digits(fields, self._meter_keys(meter).cipher))

    @staticmethod
    def _check_expiry(meter: MeterProfile, tid: int) -> None:
        if tid >> 16 > meter.ken:
            raise KeyExpired(tid, meter.ken)

    def credit_token_sync(
        self, meter: MeterProfile, units: int, tid: int, *, subclass: int = 0
    ) -> Token:
        """:meth:`credit_token`, synchronously (for the CLI and benchmarks)."""
        if tid >> 16 > meter.ken:
            raise KeyExpired(tid, meter.ken)
        fields: TokenFields
        if 4 <= subclass <= 7:
            fields = CurrencyCredit(subclass=subclass, tid=tid, amount=units)
        else:
            fields = UnitsCredit(subclass=subclass, rnd=self._rnd(), tid=tid, amount=units)
        return Token(token_digits(fields, self._meter_keys(meter).cipher))

    async def credit_token(
        self, meter: MeterProfile, units: int, tid: int, *, subclass: int = 0
    ) -> Token:
        """See :meth:`TokenEngine.credit_token`. CPU-only and fast: runs on the event loop."""
        return self.credit_token_sync(meter, units, tid, subclass=subclass)

    def management_token_sync(
        self, meter: MeterProfile, subclass: int, tid: int, value: int
    ) -> Token:
        """:meth:`management_token`, synchronously."""
        self._check_expiry(meter, tid)
        rnd = self._rnd()
        fields: TokenFields
        match subclass:
            case ManagementSubclass.SET_MAXIMUM_POWER_LIMIT | (
                ManagementSubclass.SET_MAXIMUM_PHASE_POWER_UNBALANCE_LIMIT
            ):
                encode_units(value)  # refuse an unencodable limit before deriving keys
                fields = PowerLimit(subclass=subclass, rnd=rnd, tid=tid, amount=value)
            case ManagementSubclass.CLEAR_CREDIT:
                fields = ClearCredit(rnd=rnd, tid=tid, register=value)
            case ManagementSubclass.CLEAR_TAMPER_CONDITION:
                if value != 0:
                    raise InvalidField("value", value, "a clear-tamper token carries no value (0)")
                fields = ClearTamper(rnd=rnd, tid=tid)
            case (
                ManagementSubclass.SET_TARIFF_RATE
                | ManagementSubclass.SET_WATER_METER_FACTOR
                | ManagementSubclass.EXTENDED
            ):
                fields = RegisterSetting(subclass=subclass, rnd=rnd, tid=tid, value=value)
            case _:
                raise InvalidField(
                    "subclass",
                    subclass,
                    "management tokens with a TID are subclasses 0, 1, 2, 5, 6, 7 and 10"
                    " (key changes: key_change_tokens)",
                )
        return self._issue(meter, fields)

    async def management_token(
        self, meter: MeterProfile, subclass: int, tid: int, value: int
    ) -> Token:
        """See :meth:`TokenEngine.management_token`."""
        return self.management_token_sync(meter, subclass, tid, value)

    def key_change_tokens_sync(
        self,
        old: MeterProfile,
        new: MeterProfile,
        *,
        rollover: bool | None = None,
        three_kct: bool | None = None,
    ) -> list[Token]:
        """:meth:`key_change_tokens`, synchronously, with the set's options.

        ``rollover`` forces RO (default: set when the base date changes); ``three_kct`` asks
        for the EA07 SGC section, the 3-token set (default: the two-token set, also when the SGC
        changes, as the STS 531-style sets do).
        """
        if (old.iin, old.drn) != (new.iin, new.drn):
            raise InvalidField(
                "drn", new.drn, f"a key change is for one meter; the old profile is {old.drn}"
            )
        new_key = self._derive(new).decoder_key
        current = self._meter_keys(old)
        fields = key_change_fields(
            old=old.key_attributes(),
            new=new.key_attributes(),
            new_key=new_key,
            rollover=rollover,
            three_kct=three_kct,
            old_key=current.decoder_key,
        )
        return [Token(token_digits(f, current.cipher)) for f in fields]

    async def key_change_tokens(self, old: MeterProfile, new: MeterProfile) -> list[Token]:
        """See :meth:`TokenEngine.key_change_tokens`."""
        return self.key_change_tokens_sync(old, new)

    def decode(self, meter: MeterProfile, token: Token) -> TokenImage:
        """Decode ``token`` with ``meter``'s key (to check a token before it leaves).

        Raises:
            CrcMismatch: the token is not for this meter's key.
            UnsupportedToken: a class/subclass this engine does not know.
        """
        return decode_token(token.digits, self._meter_keys(meter).cipher)
