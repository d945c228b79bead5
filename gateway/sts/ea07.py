"""EA07, the Standard Transfer Algorithm (STA) of IEC 62055-41 (SPEC.md §5.1).

STA is a 16-round substitution-permutation cipher on a 64-bit block with a 64-bit key. Each
round substitutes the 16 nibbles with one of two 4-bit S-boxes (S1 where bit ``4i+3`` of the
round key is 0, S2 where it is 1), then moves every bit ``j`` to ``P[j]``. The first round key
is the one's complement of the decoder key rotated right by 12 bits; each later round key is the
previous one rotated left by 1.

Speed (``bench/tokens.py``): a bit-by-bit STA costs ~1,000 Python operations per block. Here
each round is six lookups. The block is kept in a *slot layout*: the 16 nibbles are grouped in
threes, and each group of 12 data bits sits in a 15-bit slot whose top 3 bits hold the S-box
choice of its three nibbles for the current round::

    slot c (c = 0..4): bits 15c .. 15c+11 = nibbles 3c..3c+2,  bits 15c+12..15c+14 = their choices
    slot 5:            bits 75 .. 78      = nibble 15,         bit 79             = its choice

A round ORs the round's choice bits into the block, then looks each slot up in a table built
once per table set (``_Family``) that holds, for every (12 data bits, 3 choice bits), the
substituted and permuted contribution of those nibbles, already spread into the slot layout.
The choice bits of all 16 rounds are a fixed bit-selection of the key: ``_Family`` keeps, per
key byte, the 16x80-bit image of that byte, so a key's schedule is 8 lookups (``sta_encrypt``)
and :class:`StaCipher` keeps the 16 per-round words (the per-meter cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from typing import Final

__all__ = ["StaCipher", "StaTables", "sta_decrypt", "sta_encrypt"]

_MASK64: Final = (1 << 64) - 1
_ROUNDS: Final = 16
_SLOT: Final = 15  # 12 data bits + 3 S-box choice bits
_SLOT_MASK: Final = (1 << _SLOT) - 1
_WORD: Final = 5 * _SLOT + 5  # 80 bits per round in the schedule word
_WORD_MASK: Final = (1 << _WORD) - 1
_KEY_ROTATION: Final = 12  # SPEC §5.1 step 1: ROR64(NOT K, 12)


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
    if nibble == 15:  # slot 5 holds nibble 15 alone: data in bits 75..78, choice in bit 79
        return 79
    return (nibble // 3) * _SLOT + 12 + nibble % 3


def _to_slots(block: int) -> int:
    return (
        (block & 0xFFF)
        | (block << 3 & 0xFFF << 15)
        | (block << 6 & 0xFFF << 30)
        | (block << 9 & 0xFFF << 45)
        | (block << 12 & 0xFFF << 60)
        | (block << 15 & 0xF << 75)
    )


def _layer(
    s1: tuple[int, ...], s2: tuple[int, ...], p: tuple[int, ...], *, slots_in: bool, slots_out: bool
) -> tuple[list[int], ...]:
    """Lookup tables for one substitution-then-permutation layer, one table per slot.

    With ``slots_in`` a table's index is the slot's 15 bits (data, then choice bits) and the
    choice bit picks S1 (0) or S2 (1); without it the index is the 12 data bits of a plain block
    and S1 is used. The value is the layer's output for those nibbles (the others zero), in the
    slot layout if ``slots_out`` or as a plain 64-bit block otherwise.
    """
    place = _slot_position if slots_out else (lambda bit: bit)
    # contribution[nibble][choice][value]: substituted nibble value moved through P.
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
    for slot in range(6):
        nibbles = range(3 * slot, min(3 * slot + 3, 16))
        choices = range(2) if slots_in else range(1)
        table: list[int] = []
        patterns = [
            tuple((pattern >> k) & 1 for k in range(len(nibbles)))
            for pattern in range(len(choices) ** len(nibbles))
        ]
        for pattern in patterns:
            data_table = [0]
            for k, nibble in enumerate(nibbles):
                data_table = [c | v for v in contribution[nibble][pattern[k]] for c in data_table]
            table.extend(data_table)
        tables.append(table)
    return tuple(tables)


@dataclass(frozen=True, slots=True)
class _Family:
    """All lookup tables of one table set, built once on first use (``_family``)."""

    encrypt_rounds: tuple[list[int], ...]
    decrypt_first: tuple[list[int], ...]  # P^-1 alone, plain block in, slots out
    decrypt_rounds: tuple[list[int], ...]  # S^-1 then P^-1, slots in and out
    decrypt_last: tuple[list[int], ...]  # S^-1 alone, slots in, plain block out
    # key_byte_schedule[byte position][byte value]: the choice bits that key byte contributes
    # to every round, round r in bits 80r.. of the word (slot layout, same positions as data).
    encrypt_key_bytes: tuple[tuple[int, ...], ...]
    decrypt_key_bytes: tuple[tuple[int, ...], ...]


def _key_bytes_schedule(rounds: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Per key byte, the image of its bits in the rounds' choice words.

    ``rounds[w]`` is the STA round whose choice bits go to schedule word ``w``. The choice bit of
    nibble ``i`` in round ``r`` is bit ``4i+3`` of ``ROL64(k0, r)``, that is bit
    ``(4i+3-r) mod 64`` of ``k0`` (SPEC §5.1).
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


@cache
def _family(tables: StaTables) -> _Family:
    ts = _TABLE_SETS[tables]
    s1_inv, s2_inv, p_inv = _inverse(ts.s1), _inverse(ts.s2), _inverse(ts.p)
    return _Family(
        encrypt_rounds=_layer(ts.s1, ts.s2, ts.p, slots_in=True, slots_out=True),
        decrypt_first=_layer(
            _IDENTITY_NIBBLE, _IDENTITY_NIBBLE, p_inv, slots_in=False, slots_out=True
        ),
        decrypt_rounds=_layer(s1_inv, s2_inv, p_inv, slots_in=True, slots_out=True),
        decrypt_last=_layer(s1_inv, s2_inv, _IDENTITY_BITS, slots_in=True, slots_out=False),
        encrypt_key_bytes=_key_bytes_schedule(tuple(range(_ROUNDS))),
        # Decryption runs the rounds backwards: word w holds round 15 - w.
        decrypt_key_bytes=_key_bytes_schedule(tuple(range(_ROUNDS - 1, -1, -1))),
    )


def _first_round_key(key: bytes) -> int:
    if len(key) != 8:
        msg = f"an EA07 (STA) decoder key is 8 bytes, got {len(key)}"
        raise ValueError(msg)
    k = ~int.from_bytes(key, "big") & _MASK64
    return (k >> _KEY_ROTATION | k << (64 - _KEY_ROTATION)) & _MASK64


def _schedule(k0: int, key_bytes: tuple[tuple[int, ...], ...]) -> int:
    """The 16 rounds' choice words of round key ``k0``, word ``w`` in bits ``80w..80w+79``."""
    b = k0.to_bytes(8, "little")
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


def _encrypt(block: int, words: int, family: _Family) -> int:
    t0, t1, t2, t3, t4, t5 = family.encrypt_rounds
    x = _to_slots(block)
    for _ in range(_ROUNDS):
        x |= words & _WORD_MASK
        words >>= _WORD
        x = (
            t0[x & _SLOT_MASK]
            | t1[x >> 15 & _SLOT_MASK]
            | t2[x >> 30 & _SLOT_MASK]
            | t3[x >> 45 & _SLOT_MASK]
            | t4[x >> 60 & _SLOT_MASK]
            | t5[x >> 75]
        )
    return (
        (x & 0xFFF)
        | (x >> 3 & 0xFFF << 12)
        | (x >> 6 & 0xFFF << 24)
        | (x >> 9 & 0xFFF << 36)
        | (x >> 12 & 0xFFF << 48)
        | (x >> 15 & 0xF << 60)
    )


def _decrypt(block: int, words: int, family: _Family) -> int:
    f0, f1, f2, f3, f4, f5 = family.decrypt_first
    x = (
        f0[block & 0xFFF]
        | f1[block >> 12 & 0xFFF]
        | f2[block >> 24 & 0xFFF]
        | f3[block >> 36 & 0xFFF]
        | f4[block >> 48 & 0xFFF]
        | f5[block >> 60]
    )
    t0, t1, t2, t3, t4, t5 = family.decrypt_rounds
    for _ in range(_ROUNDS - 1):
        x |= words & _WORD_MASK
        words >>= _WORD
        x = (
            t0[x & _SLOT_MASK]
            | t1[x >> 15 & _SLOT_MASK]
            | t2[x >> 30 & _SLOT_MASK]
            | t3[x >> 45 & _SLOT_MASK]
            | t4[x >> 60 & _SLOT_MASK]
            | t5[x >> 75]
        )
    x |= words
    l0, l1, l2, l3, l4, l5 = family.decrypt_last
    return (
        l0[x & _SLOT_MASK]
        | l1[x >> 15 & _SLOT_MASK]
        | l2[x >> 30 & _SLOT_MASK]
        | l3[x >> 45 & _SLOT_MASK]
        | l4[x >> 60 & _SLOT_MASK]
        | l5[x >> 75]
    )


def _check_block(block: int) -> None:
    if not 0 <= block <= _MASK64:
        msg = f"an STA block is a 64-bit unsigned integer, got {block:#x}"
        raise ValueError(msg)


class StaCipher:
    """STA with one decoder key, its round schedule computed once (the per-meter cache).

    Args:
        key: the 8-byte decoder key, most significant byte first (all 64 bits are used; DES
            parity is irrelevant).
        tables: ``StaTables.REAL`` (production) or ``StaTables.SAMPLE`` (IEC test tables).

    Raises:
        ValueError: the key is not 8 bytes (``make_cipher`` turns this into ``InvalidKey``).
    """

    __slots__ = ("_decrypt_words", "_encrypt_words", "_family")

    def __init__(self, key: bytes, tables: StaTables = StaTables.REAL) -> None:
        self._family = _family(StaTables(tables))
        k0 = _first_round_key(key)
        self._encrypt_words = _schedule(k0, self._family.encrypt_key_bytes)
        self._decrypt_words = _schedule(k0, self._family.decrypt_key_bytes)

    def __repr__(self) -> str:
        return "StaCipher(key=<redacted>)"

    def encrypt(self, block: int) -> int:
        """Encrypt one 64-bit block (an int in ``0 .. 2**64-1``); raises ValueError otherwise."""
        _check_block(block)
        return _encrypt(block, self._encrypt_words, self._family)

    def decrypt(self, block: int) -> int:
        """Decrypt one 64-bit block: the exact inverse of :meth:`encrypt`."""
        _check_block(block)
        return _decrypt(block, self._decrypt_words, self._family)


def sta_encrypt(block: int, key: bytes, tables: StaTables = StaTables.REAL) -> int:
    """Encrypt one 64-bit block with an 8-byte decoder key, keeping nothing per key.

    Raises:
        ValueError: the key is not 8 bytes or the block is not a 64-bit unsigned integer.
    """
    _check_block(block)
    family = _family(StaTables(tables))
    return _encrypt(block, _schedule(_first_round_key(key), family.encrypt_key_bytes), family)


def sta_decrypt(block: int, key: bytes, tables: StaTables = StaTables.REAL) -> int:
    """Decrypt one 64-bit block with an 8-byte decoder key: the inverse of :func:`sta_encrypt`."""
    _check_block(block)
    family = _family(StaTables(tables))
    return _decrypt(block, _schedule(_first_round_key(key), family.decrypt_key_bytes), family)
