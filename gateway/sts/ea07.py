"""EA07, the Standard Transfer Algorithm (STA) of IEC 62055-41 (SPEC.md §5.1).

STA is a 16-round substitution-permutation cipher on a 64-bit block with a 64-bit key. Each
round substitutes the 16 nibbles with one of two 4-bit S-boxes (S1 where bit ``4i+3`` of the
round key is 0, S2 where it is 1), then moves every bit ``j`` to ``P[j]``. The first round key
is the one's complement of the decoder key rotated right by 12 bits; each later round key is the
previous one rotated left by 1. Decryption runs the inverse layers in reverse order.

Speed (``bench/tokens.py``): a bit-by-bit STA costs ~1,500 Python operations per block; here a
round is one ``to_bytes``, one ``struct`` unpack and six list lookups. The block is kept in a
96-bit *slot layout*: the 16 nibbles are grouped in threes, each group's 12 data bits in a 16-bit
slot whose bits 12..14 carry the S-box choice of its three nibbles for the current round::

    slot c (c = 0..4): bits 16c .. 16c+11 = nibbles 3c..3c+2,  bits 16c+12..16c+14 = their choices
    slot 5:            bits 80 .. 83      = nibble 15,         bit 84             = its choice

A round ORs that round's choice bits into the block, splits it into its six slots and ORs six
table entries. The tables (``_Family``, built once per table set on first use) hold, for every
(data bits, choice bits) of a slot, the substituted and permuted contribution of those nibbles,
already spread into the slot layout (or, for the last layer, into a plain 64-bit block).

The choice bits of all 16 rounds are a fixed selection of the key's bits, so the whole schedule
is the OR of eight lookups, one per key byte (``_Family.*_key_bytes``). :func:`sta_encrypt`
computes it on every call; :class:`StaCipher` keeps it split into 16 round words: that is the
per-meter cache.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Final, cast

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["StaCipher", "StaTables", "sta_decrypt", "sta_encrypt"]

_MASK64: Final = (1 << 64) - 1
_ROUNDS: Final = 16
_SLOTS: Final = 6
_SLOT: Final = 16  # bits per slot: 12 data bits, 3 choice bits, 1 unused
_WORD: Final = _SLOTS * _SLOT  # 96 bits: the block, or one round's choice bits, in slot layout
_WORD_MASK: Final = (1 << _WORD) - 1
_KEY_ROTATION: Final = 12  # SPEC §5.1 step 1: ROR64(NOT K, 12)
# The six 16-bit slots of a block's 12 little-endian bytes.
_split_slots: Final = cast(
    "Callable[[bytes], tuple[int, int, int, int, int, int]]", struct.Struct("<6H").unpack
)


class StaTables(StrEnum):
    """Which S-boxes and permutation STA uses.

    ``REAL`` are the production tables (published in several public code bases; SPEC §5.1 says
    how they were confirmed). ``SAMPLE`` are the test tables printed in IEC 62055-41: never for
    production.
    """

    REAL = "real"
    SAMPLE = "sample"


@dataclass(frozen=True, slots=True)
class _TableSet:
    """S1, S2 (index = input nibble) and P (output bit ``P[j]`` takes input bit ``j``)."""

    s1: tuple[int, ...]
    s2: tuple[int, ...]
    p: tuple[int, ...]


# SPEC §5.1 "Tables", in the order the tables are printed there.
# fmt: off
_TABLE_SETS: Final[dict[StaTables, _TableSet]] = {
    StaTables.REAL: _TableSet(
        s1=(14, 10, 7, 9, 12, 3, 2, 5, 13, 0, 15, 1, 4, 8, 6, 11),
        s2=(12, 8, 2, 13, 7, 6, 1, 3, 11, 5, 9, 15, 0, 4, 10, 14),
        p=(
            55, 42, 10, 18, 24, 21, 44, 35, 2, 22, 56, 43, 27, 58, 9, 50,
            6, 36, 12, 61, 37, 38, 53, 16, 62, 3, 7, 4, 32, 20, 63, 25,
            51, 52, 54, 33, 49, 19, 46, 29, 48, 31, 23, 30, 41, 28, 13, 5,
            40, 60, 39, 11, 15, 17, 1, 0, 57, 34, 59, 8, 47, 14, 45, 26,
        ),
    ),
    StaTables.SAMPLE: _TableSet(
        s1=(12, 10, 8, 4, 3, 15, 0, 2, 14, 1, 5, 13, 6, 9, 7, 11),
        s2=(6, 9, 7, 4, 3, 10, 12, 14, 2, 13, 1, 15, 0, 11, 8, 5),
        p=(
            29, 27, 34, 9, 16, 62, 55, 2, 40, 49, 38, 25, 33, 61, 30, 23,
            1, 41, 21, 57, 42, 15, 5, 58, 19, 53, 22, 17, 48, 28, 24, 39,
            3, 60, 36, 14, 11, 52, 54, 12, 31, 51, 10, 26, 0, 45, 37, 43,
            44, 6, 59, 4, 7, 35, 56, 50, 13, 18, 32, 47, 46, 63, 20, 8,
        ),
    ),
}
# fmt: on

_IDENTITY_NIBBLE: Final = tuple(range(16))
_IDENTITY_BITS: Final = tuple(range(64))


def _inverse(table: tuple[int, ...]) -> tuple[int, ...]:
    inverse = [0] * len(table)
    for index, value in enumerate(table):
        inverse[value] = index
    return tuple(inverse)


def _slot_position(bit: int) -> int:
    """Where bit ``bit`` of a plain 64-bit block sits in the slot layout."""
    return (bit // 12) * _SLOT + bit % 12


def _choice_position(nibble: int) -> int:
    """Where the S-box choice bit of nibble ``nibble`` sits in the slot layout."""
    if nibble == 15:  # slot 5 holds nibble 15 alone: data in bits 80..83, choice in bit 84
        return 84
    return (nibble // 3) * _SLOT + 12 + nibble % 3


def _to_slots(block: int) -> int:
    return (
        (block & 0xFFF)
        | (block << 4 & 0xFFF << 16)
        | (block << 8 & 0xFFF << 32)
        | (block << 12 & 0xFFF << 48)
        | (block << 16 & 0xFFF << 64)
        | (block << 20 & 0xF << 80)
    )


def _layer(
    s1: tuple[int, ...], s2: tuple[int, ...], p: tuple[int, ...], *, slots_in: bool, slots_out: bool
) -> tuple[list[int], ...]:
    """Lookup tables for one substitution-then-permutation layer, one table per slot.

    With ``slots_in`` a table's index is the slot's data bits plus its choice bits (a choice bit
    of 1 picks S2 for that nibble); without it the index is the slot's 12 bits of a plain block
    and S1 is used throughout. The entry is the layer's output for those nibbles alone, in the
    slot layout if ``slots_out`` or as a plain 64-bit block otherwise.
    """
    place = _slot_position if slots_out else (lambda bit: bit)
    # contribution[nibble][choice][value]: the substituted value's bits moved through P.
    contribution = [
        [
            [
                sum(1 << place(p[4 * nibble + b]) for b in range(4) if sbox[value] >> b & 1)
                for value in range(16)
            ]
            for sbox in (s1, s2)
        ]
        for nibble in range(16)
    ]
    tables: list[list[int]] = []
    for slot in range(_SLOTS):
        nibbles = range(3 * slot, min(3 * slot + 3, 16))
        patterns = (1 << len(nibbles)) if slots_in else 1
        table: list[int] = []
        for pattern in range(patterns):  # choice bits above the data bits in the index
            entries = [0]
            for k, nibble in enumerate(nibbles):
                choice = pattern >> k & 1
                entries = [low | high for high in contribution[nibble][choice] for low in entries]
            table.extend(entries)
        tables.append(table)
    return tuple(tables)


def _key_bytes_schedule(rounds: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Per key byte position and value, that byte's share of every round's choice bits.

    ``rounds[w]`` is the STA round whose choice bits go to word ``w`` (bits ``96w..96w+95``).
    The choice bit of nibble ``i`` in round ``r`` is bit ``4i+3`` of ``ROL64(k0, r)``, that is
    bit ``(4i+3-r) mod 64`` of the first round key ``k0`` (SPEC §5.1).
    """
    per_bit = [0] * 64
    for word, round_number in enumerate(rounds):
        for nibble in range(16):
            key_bit = (4 * nibble + 3 - round_number) % 64
            per_bit[key_bit] |= 1 << (word * _WORD + _choice_position(nibble))
    schedule = []
    for position in range(8):
        images = [0] * 256
        for value in range(1, 256):
            low = value & -value
            images[value] = images[value ^ low] | per_bit[8 * position + low.bit_length() - 1]
        schedule.append(tuple(images))
    return tuple(schedule)


@dataclass(frozen=True, slots=True)
class _Family:
    """All lookup tables of one table set (about 15 MB; built by ``_family`` on first use)."""

    encrypt_rounds: tuple[list[int], ...]  # S then P, slots in and out: rounds 0..14
    encrypt_last: tuple[list[int], ...]  # S then P, slots in, plain block out: round 15
    decrypt_first: tuple[list[int], ...]  # P^-1 alone, plain block in, slots out
    decrypt_rounds: tuple[list[int], ...]  # S^-1 then P^-1, slots in and out
    decrypt_last: tuple[list[int], ...]  # S^-1 alone, slots in, plain block out
    encrypt_key_bytes: tuple[tuple[int, ...], ...]  # word w = round w
    decrypt_key_bytes: tuple[tuple[int, ...], ...]  # word w = round 15 - w


_FAMILIES: Final[dict[StaTables, _Family]] = {}


def _family(tables: StaTables) -> _Family:
    """The lookup tables of ``tables``, built on first use (about 0.1 s) and then kept."""
    family = _FAMILIES.get(tables)
    if family is None:
        family = _FAMILIES[StaTables(tables)] = _build_family(_TABLE_SETS[StaTables(tables)])
    return family


def _build_family(ts: _TableSet) -> _Family:
    s1_inv, s2_inv, p_inv = _inverse(ts.s1), _inverse(ts.s2), _inverse(ts.p)
    return _Family(
        encrypt_rounds=_layer(ts.s1, ts.s2, ts.p, slots_in=True, slots_out=True),
        encrypt_last=_layer(ts.s1, ts.s2, ts.p, slots_in=True, slots_out=False),
        decrypt_first=_layer(
            _IDENTITY_NIBBLE, _IDENTITY_NIBBLE, p_inv, slots_in=False, slots_out=True
        ),
        decrypt_rounds=_layer(s1_inv, s2_inv, p_inv, slots_in=True, slots_out=True),
        decrypt_last=_layer(s1_inv, s2_inv, _IDENTITY_BITS, slots_in=True, slots_out=False),
        encrypt_key_bytes=_key_bytes_schedule(tuple(range(_ROUNDS))),
        decrypt_key_bytes=_key_bytes_schedule(tuple(range(_ROUNDS - 1, -1, -1))),
    )


def _schedule(key: bytes, key_bytes: tuple[tuple[int, ...], ...]) -> int:
    """All 16 rounds' choice words for ``key``, word ``w`` in bits ``96w..96w+95``.

    Raises:
        ValueError: the key is not 8 bytes.
    """
    if len(key) != 8:
        msg = f"an EA07 (STA) decoder key is 8 bytes, got {len(key)}"
        raise ValueError(msg)
    k = ~int.from_bytes(key, "big") & _MASK64
    b = ((k >> _KEY_ROTATION | k << (64 - _KEY_ROTATION)) & _MASK64).to_bytes(8, "little")
    return (
        key_bytes[0][b[0]]
        | key_bytes[1][b[1]]
        | key_bytes[2][b[2]]
        | key_bytes[3][b[3]]
        | key_bytes[4][b[4]]
        | key_bytes[5][b[5]]
        | key_bytes[6][b[6]]
        | key_bytes[7][b[7]]
    )


def _block_error(block: int) -> ValueError:
    return ValueError(f"an STA block is a 64-bit unsigned integer, got {block:#x}")


class StaCipher:
    """STA with one decoder key, its round schedule computed once (the per-meter cache).

    Args:
        key: the 8-byte decoder key, most significant byte first (all 64 bits are used; DES
            parity is irrelevant).
        tables: ``StaTables.REAL`` (production) or ``StaTables.SAMPLE`` (IEC test tables).

    Raises:
        ValueError: the key is not 8 bytes (``make_cipher`` turns this into ``InvalidKey``).
    """

    __slots__ = ("_decrypt_words", "_encrypt_last", "_encrypt_words", "_family", "_tables")

    def __init__(self, key: bytes, tables: StaTables = StaTables.REAL) -> None:
        family = _family(tables)
        self._family = family
        self._tables = StaTables(tables)
        words = _schedule(key, family.encrypt_key_bytes)
        self._encrypt_words = tuple(words >> _WORD * r & _WORD_MASK for r in range(_ROUNDS - 1))
        self._encrypt_last = words >> _WORD * (_ROUNDS - 1)
        words = _schedule(key, family.decrypt_key_bytes)
        self._decrypt_words = tuple(words >> _WORD * r & _WORD_MASK for r in range(_ROUNDS))

    def __repr__(self) -> str:
        return f"StaCipher(key=<redacted>, tables={self._tables.name})"

    def encrypt(self, block: int) -> int:
        """Encrypt one 64-bit block (an int in ``0 .. 2**64-1``); raises ValueError otherwise."""
        if not 0 <= block <= _MASK64:
            raise _block_error(block)
        split = _split_slots
        t0, t1, t2, t3, t4, t5 = self._family.encrypt_rounds
        x = _to_slots(block)
        for k in self._encrypt_words:
            a, b, c, d, e, f = split((x | k).to_bytes(12, "little"))
            x = t0[a] | t1[b] | t2[c] | t3[d] | t4[e] | t5[f]
        t0, t1, t2, t3, t4, t5 = self._family.encrypt_last
        a, b, c, d, e, f = split((x | self._encrypt_last).to_bytes(12, "little"))
        return t0[a] | t1[b] | t2[c] | t3[d] | t4[e] | t5[f]

    def decrypt(self, block: int) -> int:
        """Decrypt one 64-bit block: the exact inverse of :meth:`encrypt`."""
        if not 0 <= block <= _MASK64:
            raise _block_error(block)
        return _decrypt(block, self._decrypt_words, self._family)


def _decrypt(block: int, words: tuple[int, ...], family: _Family) -> int:
    split = _split_slots
    t0, t1, t2, t3, t4, t5 = family.decrypt_first
    x = (
        t0[block & 0xFFF]
        | t1[block >> 12 & 0xFFF]
        | t2[block >> 24 & 0xFFF]
        | t3[block >> 36 & 0xFFF]
        | t4[block >> 48 & 0xFFF]
        | t5[block >> 60]
    )
    t0, t1, t2, t3, t4, t5 = family.decrypt_rounds
    for k in words[:-1]:
        a, b, c, d, e, f = split((x | k).to_bytes(12, "little"))
        x = t0[a] | t1[b] | t2[c] | t3[d] | t4[e] | t5[f]
    t0, t1, t2, t3, t4, t5 = family.decrypt_last
    a, b, c, d, e, f = split((x | words[-1]).to_bytes(12, "little"))
    return t0[a] | t1[b] | t2[c] | t3[d] | t4[e] | t5[f]


def sta_encrypt(block: int, key: bytes, tables: StaTables = StaTables.REAL) -> int:
    """Encrypt one 64-bit block with an 8-byte decoder key, keeping nothing per key.

    Raises:
        ValueError: the key is not 8 bytes or the block is not a 64-bit unsigned integer.
    """
    if not 0 <= block <= _MASK64:
        raise _block_error(block)
    family = _family(tables)
    words = _schedule(key, family.encrypt_key_bytes)
    split = _split_slots
    t0, t1, t2, t3, t4, t5 = family.encrypt_rounds
    x = _to_slots(block)
    for _ in range(_ROUNDS - 1):
        a, b, c, d, e, f = split(
            (x | words & 0xFFFF_FFFF_FFFF_FFFF_FFFF_FFFF).to_bytes(12, "little")
        )
        words >>= 96  # _WORD
        x = t0[a] | t1[b] | t2[c] | t3[d] | t4[e] | t5[f]
    t0, t1, t2, t3, t4, t5 = family.encrypt_last
    a, b, c, d, e, f = split((x | words).to_bytes(12, "little"))
    return t0[a] | t1[b] | t2[c] | t3[d] | t4[e] | t5[f]


def sta_decrypt(block: int, key: bytes, tables: StaTables = StaTables.REAL) -> int:
    """Decrypt one 64-bit block with an 8-byte decoder key: the inverse of :func:`sta_encrypt`.

    Raises:
        ValueError: the key is not 8 bytes or the block is not a 64-bit unsigned integer.
    """
    if not 0 <= block <= _MASK64:
        raise _block_error(block)
    family = _family(tables)
    words = _schedule(key, family.decrypt_key_bytes)
    return _decrypt(block, tuple(words >> _WORD * r & _WORD_MASK for r in range(_ROUNDS)), family)
