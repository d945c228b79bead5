"""Key-change token sets (KCT; docs/sts.md §9): moving a meter to a new decoder key.

A key change is a set of class 2 tokens, encrypted with the meter's **current** decoder key,
that carry the **new** key and its attributes. The meter installs the new key only when every
section of the set has arrived:

```
EA07  subclass 3 (KENHO KRN RO 3KCT KT NKHO) + 4 (KENLO TI NKLO), 3KCT = 0, also when the SGC
      changes (as the STS 531-style sets CTSA19.4, SGC 201457 -> 201461, and CTSA05's rollover
      to SGC 203557 do: the SGC is part of the derived key, the meter needs no SGC section);
      + 8 (the new SGC) only when asked (``three_kct=True``): the "3-token set", 3KCT = 1
EA11  subclasses 3 + 4 + 8 (SGC low 12 bits, key bytes 4..7) + 9 (SGC high 12 bits, key bytes
      8..11): always four, since sections 8 and 9 carry the middle of the 16-byte key
```

A meter installs the new key when the set is complete. Sections are matched by the first
section: a first section (subclass 3) starts a set and the meter drops any section it kept from
before it, so a key is never assembled from two sets (see ``gateway.sts.meter``).

RO (TID rollover) = 1 tells the meter to clear its TID store: it is set when the base date
changes (the new key's TIDs start again from a later base date), or when asked.

A rollover must come with a new decoder key. DKGA02 does not derive the key from the base date,
so a DKGA02 change of base date alone gives the meter its current key back with RO = 1: the
meter forgets its TIDs and accepts every token issued under that key again. Such a set is
refused (:class:`~gateway.sts.errors.InvalidKey`), as is a change of base date that keeps the
key: the KRN (a new vending key) or the SGC must change too.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.sts.cipher import EncryptionAlgorithm, decoder_key_length, encryption_algorithm
from gateway.sts.errors import InvalidField, InvalidKey
from gateway.sts.tokens import (
    KeySection1,
    KeySection2,
    KeySectionExtra,
    ManagementSubclass,
    TokenFields,
)

KEN_MAX = 255  # 8 bits; 255 disables key expiry
KEY_TYPES = range(4)  # 0 DITK, 1 DDTK, 2 DUTK, 3 DCTK
KRNS = range(1, 10)


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyAttributes:
    """The attributes of a decoder key, as a meter stores them and a key change sets them.

    Attributes:
        key_type: KT, 0 DITK (initialisation), 1 DDTK (default), 2 DUTK (unique), 3 DCTK (common).
        krn: key revision number, 1..9.
        tariff_index: TI, 2 decimal digits.
        sgc: supply group code, 6 decimal digits.
        ea: encryption algorithm, 7 (STA) or 11 (MISTY1).
        ken: key expiry number, 0..255 (255: never expires); tokens with ``tid >> 16 > ken``
            are refused.
        base_date: the TID base date of the vending key (1993, 2014 or 2035).
    """

    key_type: int
    krn: int
    tariff_index: str
    sgc: str
    ea: int = EncryptionAlgorithm.EA07
    ken: int = KEN_MAX
    base_date: int = 2014

    def __post_init__(self) -> None:
        if self.key_type not in KEY_TYPES:
            raise InvalidField("key_type", self.key_type, "a key type is 0..3")
        if self.krn not in KRNS:
            raise InvalidField("krn", self.krn, "a key revision number is 1..9")
        if not (len(self.tariff_index) == 2 and self.tariff_index.isdigit()):
            raise InvalidField("tariff_index", self.tariff_index, "a tariff index is 2 digits")
        if not (len(self.sgc) == 6 and self.sgc.isdigit()):
            raise InvalidField("sgc", self.sgc, "a supply group code is 6 digits")
        if not 0 <= self.ken <= KEN_MAX:
            raise InvalidField("ken", self.ken, "a key expiry number is 0..255")
        encryption_algorithm(self.ea)


def key_change_fields(
    *,
    old: KeyAttributes,
    new: KeyAttributes,
    new_key: bytes,
    rollover: bool | None = None,
    three_kct: bool | None = None,
    old_key: bytes | None = None,
) -> list[TokenFields]:
    """The ordered contents of the key-change set that moves a meter from ``old`` to ``new``.

    Args:
        old: the meter's current key attributes (the set is encrypted under that key).
        new: the attributes of the new key.
        new_key: the new decoder key, 8 bytes (EA07) or 16 bytes (EA11).
        rollover: RO; ``None`` sets it when the base date changes.
        three_kct: EA07 only: whether to send the 3rd (SGC) section (3KCT = 1); ``None`` or
            ``False`` send the two-token set, also when the SGC changes (docs/sts.md §9, CTSA19.4).
            EA11 sets always have four sections.
        old_key: the meter's current decoder key, to refuse a rollover or a change of base
            date that keeps it.

    Raises:
        InvalidField: the algorithm changes (a key change cannot move EA07 to EA11).
        InvalidKey: ``new_key`` has the wrong length for the algorithm, or equals ``old_key``
            while the set rolls TIDs over or changes the base date.
    """
    if encryption_algorithm(old.ea) is not encryption_algorithm(new.ea):
        raise InvalidField(
            "ea",
            new.ea,
            f"a key change keeps the encryption algorithm (the meter uses EA{old.ea:02d})",
        )
    length = decoder_key_length(new.ea)
    if len(new_key) != length:
        raise InvalidKey(
            "new_key", "<redacted>", f"EA{new.ea:02d} needs a {length}-byte key, got {len(new_key)}"
        )
    ro = (old.base_date != new.base_date) if rollover is None else rollover
    if old_key is not None and new_key == old_key and (ro or old.base_date != new.base_date):
        raise InvalidKey(
            "new_key",
            "<redacted>",
            "the new decoder key is the meter's current one"
            + (
                f" (base date {old.base_date} -> {new.base_date}: DKGA02 does not derive the key"
                " from the base date)"
                if old.base_date != new.base_date
                else ""
            )
            + "; a rollover (RO = 1) under the same key would make the meter forget its TIDs"
            " and accept its old tokens again: change the KRN or the SGC too",
        )
    is_misty = encryption_algorithm(new.ea) is EncryptionAlgorithm.EA11
    extra = False if is_misty else bool(three_kct)
    sections: list[TokenFields] = [
        KeySection1(
            kenho=new.ken >> 4,
            krn=new.krn,
            ro=int(ro),
            three_kct=int(extra),
            kt=new.key_type,
            nkho=int.from_bytes(new_key[:4], "big"),
        ),
        KeySection2(
            kenlo=new.ken & 0xF,
            ti=int(new.tariff_index),
            nklo=int.from_bytes(new_key[-4:], "big"),
        ),
    ]
    sgc = int(new.sgc)
    if is_misty:
        sections.append(
            KeySectionExtra.misty(ManagementSubclass.SET_3RD_SECTION_DECODER_KEY, sgc, new_key)
        )
        sections.append(
            KeySectionExtra.misty(ManagementSubclass.SET_4TH_SECTION_DECODER_KEY, sgc, new_key)
        )
    elif extra:
        sections.append(KeySectionExtra.sta_sgc(sgc))
    return sections
