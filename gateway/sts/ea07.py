"""EA07, the Standard Transfer Algorithm (STA) of IEC 62055-41 (docs/sts.md §5.1).

STA is a 16-round substitution-permutation cipher on a 64-bit block with a 64-bit key. Each
round substitutes the 16 nibbles with one of two 4-bit S-boxes (S1 where bit ``4i+3`` of the
round key is 0, S2 where it is 1), then moves every bit ``j`` to ``P[j]``. The first round key
is the one's complement of the decoder key rotated right by 12 bits; each later round key is the
previous one rotated left by 1. Decryption runs the inverse layers in reverse order.

Speed (``bench/tokens.py``): a bit-by-bit STA costs ~1,500 Python operations per block. Here a
round is one ``to_bytes`` and eight list lookups: for each byte position ``b`` of the block and
each *choice pattern* (which S-box each of the byte's two nibbles uses), a 256-entry table holds
the substituted and permuted contribution of that byte (``_rows``); a round ORs the eight
entries (a permutation sends distinct input bits to distinct output bits).

Which table a round uses at byte ``b`` depends only on the key: the choice bits of round ``r``
are bits ``8b+3`` and ``8b+7`` of ``k_r = ROL64(k0, r)``. Writing ``r = 4q + s`` (``s < 4``),
both bits lie in byte ``b`` of ``k_4q`` (bits ``3-s`` and ``7-s``), so one byte of ``k_0``,
``k_4``, ``k_8`` or ``k_12`` fixes the tables of four rounds at once (``_groups``), and
``k_8``, ``k_12`` are ``k_0``, ``k_4`` rotated by one byte. A key's 16x8 tables are therefore
32 lookups, done in C by ``map`` (``_quads``). :func:`sta_encrypt` picks them on every call;
:class:`StaCipher` keeps them: that is the per-meter cache.

The tables of one table set take about 1.4 MB, built in a few milliseconds on first use.
Bigger tables (12-bit slots, six lookups a round) were tried: at 15 MB they miss the CPU cache,
and a block of random data then took three times as long as the same block repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from operator import getitem
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

__all__ = ["StaCipher", "StaTables", "sta_decrypt", "sta_encrypt"]

_MASK64: Final = (1 << 64) - 1
_ROUNDS: Final = 16
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
# _CHOICE[s][v]: the choice pattern of round 4q+s at a byte position where byte v of k_4q sits
# (bit 0: low nibble, from bit 3-s of v; bit 1: high nibble, from bit 7-s of v).
_CHOICE: Final = tuple(
    bytes((v >> (3 - s) & 1) | (v >> (7 - s) & 1) << 1 for v in range(256)) for s in range(4)
)


def _inverse(table: tuple[int, ...]) -> tuple[int, ...]:
    inverse = [0] * len(table)
    for index, value in enumerate(table):
        inverse[value] = index
    return tuple(inverse)


_Table = list[int]  # 256 entries: the layer's output for one byte value
_Rows = tuple[tuple[_Table, ...], ...]  # [byte position][choice pattern]
_Groups = tuple[tuple[tuple[_Table, _Table, _Table, _Table], ...], ...]  # [byte position][key byte]
_Rounds = tuple[tuple[_Table, ...], ...]  # [layer][byte position]


def _rows(s1: tuple[int, ...], s2: tuple[int, ...], p: tuple[int, ...]) -> _Rows:
    """Lookup tables for one substitution-then-permutation layer, per byte and choice pattern.

    ``rows[b][c][v]`` is the layer's output when byte ``b`` of the input block is ``v`` and all
    other bytes are 0, with choice pattern ``c`` for the byte's two nibbles (bit 0: low nibble,
    bit 1: high nibble; a choice of 1 picks S2). The layer's output for a whole block is the OR
    of its bytes' entries.
    """
    # contribution[nibble][choice][value]: the substituted value's bits moved through P.
    contribution = [
        [
            [
                sum(1 << p[4 * nibble + b] for b in range(4) if sbox[value] >> b & 1)
                for value in range(16)
            ]
            for sbox in (s1, s2)
        ]
        for nibble in range(16)
    ]
    return tuple(
        tuple(
            [
                high | low
                for high in contribution[2 * byte + 1][pattern >> 1]
                for low in contribution[2 * byte][pattern & 1]
            ]
            for pattern in range(4)
        )
        for byte in range(8)
    )


def _groups(rows: _Rows) -> _Groups:
    """``groups[b][v]``: rounds 4q..4q+3's tables at byte ``b`` when byte ``b`` of k_4q is ``v``."""
    return tuple(
        tuple(
            (
                byte_rows[_CHOICE[0][v]],
                byte_rows[_CHOICE[1][v]],
                byte_rows[_CHOICE[2][v]],
                byte_rows[_CHOICE[3][v]],
            )
            for v in range(256)
        )
        for byte_rows in rows
    )


@dataclass(frozen=True, slots=True)
class _Family:
    """All lookup tables of one table set (about 1.4 MB; built by ``_family`` on first use)."""

    encrypt: _Groups  # S then P
    decrypt_first: tuple[_Table, ...]  # P^-1 alone: [byte position]
    decrypt: _Groups  # S^-1 then P^-1
    decrypt_last: tuple[tuple[_Table, ...], ...]  # S^-1 alone: [byte position][choice pattern]


_FAMILIES: Final[dict[StaTables, _Family]] = {}


def _family(tables: StaTables) -> _Family:
    """The lookup tables of ``tables``, built on first use (a few milliseconds) and then kept."""
    family = _FAMILIES.get(tables)
    if family is None:
        family = _FAMILIES[StaTables(tables)] = _build_family(_TABLE_SETS[StaTables(tables)])
    return family


def _build_family(ts: _TableSet) -> _Family:
    s1_inv, s2_inv, p_inv = _inverse(ts.s1), _inverse(ts.s2), _inverse(ts.p)
    return _Family(
        encrypt=_groups(_rows(ts.s1, ts.s2, ts.p)),
        decrypt_first=tuple(rows[0] for rows in _rows(_IDENTITY_NIBBLE, _IDENTITY_NIBBLE, p_inv)),
        decrypt=_groups(_rows(s1_inv, s2_inv, p_inv)),
        decrypt_last=_rows(s1_inv, s2_inv, _IDENTITY_BITS),
    )


def _key_bytes(key: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """The little-endian bytes of round keys k_0, k_4, k_8 and k_12 (SPEC §5.1 key schedule).

    Raises:
        ValueError: the key is not 8 bytes.
    """
    if len(key) != 8:
        msg = f"an EA07 (STA) decoder key is 8 bytes, got {len(key)}"
        raise ValueError(msg)
    k = ~int.from_bytes(key, "big") & _MASK64
    k0 = (k >> _KEY_ROTATION | k << (64 - _KEY_ROTATION)) & _MASK64  # ROR64(NOT K, 12)
    b0 = k0.to_bytes(8, "little")
    b4 = ((k0 << 4 | k0 >> 60) & _MASK64).to_bytes(8, "little")
    # ROL64 by 8 more bits moves every byte up one place.
    return b0, b4, b0[7:] + b0[:7], b4[7:] + b4[:7]


def _pick_rounds(groups: _Groups, key_bytes: tuple[bytes, ...]) -> _Rounds:
    """The 16 rounds' tables, round-major: each group of four rounds from one round key's bytes."""
    rounds: list[tuple[_Table, ...]] = []
    for key_byte_string in key_bytes:
        rounds += zip(*map(getitem, groups, key_byte_string), strict=True)
    return tuple(rounds)


def _quads(groups: _Groups, key_bytes: tuple[bytes, ...]) -> list[Iterator[tuple[_Table, ...]]]:
    """Per group of four rounds, the tables of each byte position (lazily, as ``map`` objects)."""
    return [map(getitem, groups, key_byte_string) for key_byte_string in key_bytes]


def _encrypt_quads(block: int, quads: Iterable[Iterable[tuple[_Table, ...]]]) -> int:
    """Run the 16 rounds; each item of ``quads`` holds 8 byte positions' tables for 4 rounds."""
    x = block
    for (
        (a0, a1, a2, a3),
        (b0, b1, b2, b3),
        (c0, c1, c2, c3),
        (d0, d1, d2, d3),
        (e0, e1, e2, e3),
        (f0, f1, f2, f3),
        (g0, g1, g2, g3),
        (h0, h1, h2, h3),
    ) in quads:
        p0, p1, p2, p3, p4, p5, p6, p7 = x.to_bytes(8, "little")
        x = a0[p0] | b0[p1] | c0[p2] | d0[p3] | e0[p4] | f0[p5] | g0[p6] | h0[p7]
        p0, p1, p2, p3, p4, p5, p6, p7 = x.to_bytes(8, "little")
        x = a1[p0] | b1[p1] | c1[p2] | d1[p3] | e1[p4] | f1[p5] | g1[p6] | h1[p7]
        p0, p1, p2, p3, p4, p5, p6, p7 = x.to_bytes(8, "little")
        x = a2[p0] | b2[p1] | c2[p2] | d2[p3] | e2[p4] | f2[p5] | g2[p6] | h2[p7]
        p0, p1, p2, p3, p4, p5, p6, p7 = x.to_bytes(8, "little")
        x = a3[p0] | b3[p1] | c3[p2] | d3[p3] | e3[p4] | f3[p5] | g3[p6] | h3[p7]
    return x


def _run(block: int, rounds: _Rounds) -> int:
    x = block
    for t0, t1, t2, t3, t4, t5, t6, t7 in rounds:
        a, b, c, d, e, f, g, h = x.to_bytes(8, "little")
        x = t0[a] | t1[b] | t2[c] | t3[d] | t4[e] | t5[f] | t6[g] | t7[h]
    return x


def _decrypt_rounds(family: _Family, key: bytes) -> _Rounds:
    """Decryption's layers: P^-1; then S^-1 and P^-1 for rounds 15..1; then S^-1 of round 0."""
    key_bytes = _key_bytes(key)
    forward = _pick_rounds(family.decrypt, key_bytes)
    last = tuple(map(getitem, family.decrypt_last, key_bytes[0].translate(_CHOICE[0])))
    return (family.decrypt_first, *forward[:0:-1], last)


def _block_error(block: int) -> ValueError:
    return ValueError(f"an STA block is a 64-bit unsigned integer, got {block:#x}")


class StaCipher:
    """STA with one decoder key, its round tables picked once (the per-meter cache).

    The tables are picked in groups of four rounds when the cipher is made (a few µs, about the
    cost of one :func:`sta_encrypt`'s set-up). On its second encryption the cipher also lays
    them out round by round, which makes each later block about 4% faster; a cipher made for
    one token never pays for that. These lazy steps only ever store equal values, so a cipher
    may be shared between threads.

    Args:
        key: the 8-byte decoder key, most significant byte first (all 64 bits are used; DES
            parity is irrelevant).
        tables: ``StaTables.REAL`` (production) or ``StaTables.SAMPLE`` (IEC test tables).

    Raises:
        ValueError: the key is not 8 bytes (``make_cipher`` turns this into ``InvalidKey``).
    """

    __slots__ = (
        "_decrypt_rounds",
        "_encrypt_quads",
        "_encrypt_rounds",
        "_family",
        "_key",
        "_tables",
        "_used",
    )

    def __init__(self, key: bytes, tables: StaTables = StaTables.REAL) -> None:
        family = _family(tables)
        self._encrypt_quads = tuple(
            [tuple(quad) for quad in _quads(family.encrypt, _key_bytes(key))]
        )
        self._encrypt_rounds: _Rounds | None = None
        self._used = False
        self._family = family
        self._tables = tables
        # Kept for the decryption tables, picked on first use (vending never decrypts).
        self._key = bytes(key)
        self._decrypt_rounds: _Rounds | None = None

    def __repr__(self) -> str:
        return f"StaCipher(key=<redacted>, tables={StaTables(self._tables).name})"

    def encrypt(self, block: int) -> int:
        """Encrypt one 64-bit block (an int in ``0 .. 2**64-1``); raises ValueError otherwise."""
        rounds = self._encrypt_rounds
        if rounds is None:
            return self._encrypt_early(block)
        x = block
        try:  # to_bytes refuses a negative or too wide block: that is the range check
            for t0, t1, t2, t3, t4, t5, t6, t7 in rounds:
                a, b, c, d, e, f, g, h = x.to_bytes(8, "little")
                x = t0[a] | t1[b] | t2[c] | t3[d] | t4[e] | t5[f] | t6[g] | t7[h]
        except OverflowError:
            raise _block_error(block) from None
        return x

    def _encrypt_early(self, block: int) -> int:
        if not 0 <= block <= _MASK64:
            raise _block_error(block)
        if self._used:  # reused: lay the tables out round by round from now on
            self._encrypt_rounds = tuple(
                [layer for quad in self._encrypt_quads for layer in zip(*quad, strict=True)]
            )
            return self.encrypt(block)
        self._used = True
        return _encrypt_quads(block, self._encrypt_quads)

    def decrypt(self, block: int) -> int:
        """Decrypt one 64-bit block: the exact inverse of :meth:`encrypt`."""
        if not 0 <= block <= _MASK64:
            raise _block_error(block)
        rounds = self._decrypt_rounds
        if rounds is None:
            rounds = self._decrypt_rounds = _decrypt_rounds(self._family, self._key)
        return _run(block, rounds)


def sta_encrypt(block: int, key: bytes, tables: StaTables = StaTables.REAL) -> int:
    """Encrypt one 64-bit block with an 8-byte decoder key, keeping nothing per key.

    Raises:
        ValueError: the key is not 8 bytes or the block is not a 64-bit unsigned integer.
    """
    if not 0 <= block <= _MASK64:
        raise _block_error(block)
    return _encrypt_quads(block, _quads(_family(tables).encrypt, _key_bytes(key)))


def sta_decrypt(block: int, key: bytes, tables: StaTables = StaTables.REAL) -> int:
    """Decrypt one 64-bit block with an 8-byte decoder key: the inverse of :func:`sta_encrypt`.

    Raises:
        ValueError: the key is not 8 bytes or the block is not a 64-bit unsigned integer.
    """
    if not 0 <= block <= _MASK64:
        raise _block_error(block)
    return _run(block, _decrypt_rounds(_family(tables), key))
