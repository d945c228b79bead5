"""EA07 (STA): public vectors, the IEC sample-table example, and a bit-by-bit reference.

The reference below follows docs/sts.md §5.1 literally, one bit at a time, and is deliberately slow
and obvious; the table-driven cipher in ``gateway.sts.ea07`` is checked against it with hypothesis.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.sts.ea07 import _TABLE_SETS, StaCipher, StaTables, sta_decrypt, sta_encrypt

VECTORS = Path(__file__).parent / "vectors" / "public.jsonl"
MASK64 = (1 << 64) - 1


def load_vectors(ea: int) -> list[dict[str, Any]]:
    """The public vectors (shared/sts/vectors.jsonl) of algorithm ``ea`` that carry a token."""
    lines = VECTORS.read_text(encoding="utf-8").splitlines()
    vectors = [json.loads(line) for line in lines if line.strip()]
    return [v for v in vectors if v.get("ea") == ea and "token" in v]


def token_of(cipher_block: int, token_class: int) -> str:
    """SPEC §7, written out inline: class bits into bits 28/27, the displaced bits to 65/64."""
    displaced_hi = cipher_block >> 28 & 1
    displaced_lo = cipher_block >> 27 & 1
    value = cipher_block & ~(0b11 << 27) | token_class << 27
    value |= displaced_hi << 65 | displaced_lo << 64
    return f"{value:020d}"


# --- the reference: SPEC §5.1 bit by bit ------------------------------------------------------


def _bit(value: int, position: int) -> int:
    return value >> position & 1


def _rol64(value: int, count: int) -> int:
    count %= 64
    return (value << count | value >> (64 - count)) & MASK64


def _round_keys(key: int) -> list[int]:
    k = _rol64(~key & MASK64, -12)  # ROR64(NOT K, 12)
    keys = []
    for _ in range(16):
        keys.append(k)
        k = _rol64(k, 1)
    return keys


def reference_encrypt(block: int, key: int, tables: StaTables) -> int:
    """STA encryption exactly as SPEC §5.1 states it."""
    ts = _TABLE_SETS[tables]
    d = block
    for k in _round_keys(key):
        substituted = 0
        for i in range(16):
            sbox = ts.s2 if _bit(k, 4 * i + 3) else ts.s1
            substituted |= sbox[d >> 4 * i & 0xF] << 4 * i
        permuted = 0
        for j in range(64):
            permuted |= _bit(substituted, j) << ts.p[j]
        d = permuted
    return d


def reference_decrypt_meter_style(block: int, key: int, tables: StaTables) -> int:
    """STA decryption in SPEC §5.1's second ("meter style") formulation, independent of the first.

    k starts as the raw key; each round: inverse permutation; S1⁻¹ where bit 4i of k is 1, else
    S2⁻¹; then k is rotated right by 1.
    """
    ts = _TABLE_SETS[tables]
    s1_inv = [ts.s1.index(v) for v in range(16)]
    s2_inv = [ts.s2.index(v) for v in range(16)]
    d = block
    k = key
    for _ in range(16):
        unpermuted = 0
        for j in range(64):
            unpermuted |= _bit(d, ts.p[j]) << j
        d = 0
        for i in range(16):
            sbox = s1_inv if _bit(k, 4 * i) else s2_inv
            d |= sbox[unpermuted >> 4 * i & 0xF] << 4 * i
        k = _rol64(k, -1)
    return d


# --- vectors ----------------------------------------------------------------------------------

EA07_VECTORS = load_vectors(7)


def test_public_vectors_are_present() -> None:
    """The public vector file holds (at least) the 108 EA07 token vectors these tests replay."""
    assert len(EA07_VECTORS) >= 108


@pytest.mark.parametrize("vector", EA07_VECTORS, ids=[v["id"] for v in EA07_VECTORS])
def test_vector_block_encrypts_to_token(vector: dict[str, Any]) -> None:
    """The vector's data block, STA-encrypted with its decoder key, gives its token."""
    tables = StaTables(vector.get("sta_tables", "real"))
    key = bytes.fromhex(vector["decoder_key"])
    block = int(vector["data_block"], 16)
    token_class = vector["fields"]["class"]
    assert token_of(sta_encrypt(block, key, tables), token_class) == vector["token"]
    cipher = StaCipher(key, tables)
    for _use in ("first", "reused"):
        assert token_of(cipher.encrypt(block), token_class) == vector["token"]


@pytest.mark.parametrize("vector", EA07_VECTORS, ids=[v["id"] for v in EA07_VECTORS])
def test_vector_cipher_block_decrypts_to_data_block(vector: dict[str, Any]) -> None:
    """Decrypting the vector's cipher block (taken from its token) gives its data block."""
    tables = StaTables(vector.get("sta_tables", "real"))
    key = bytes.fromhex(vector["decoder_key"])
    value = int(vector["token"])
    cipher_block = value & MASK64 & ~(0b11 << 27) | (value >> 64) << 27
    expected = int(vector["data_block"], 16)
    assert sta_decrypt(cipher_block, key, tables) == expected
    assert StaCipher(key, tables).decrypt(cipher_block) == expected


def test_iec_sample_table_example() -> None:
    """SPEC §5.1 check: DK 0ABC12DEF3456789, block 0B19EB230100C207 → C45ED1619406DF95 (sample)."""
    key = bytes.fromhex("0ABC12DEF3456789")
    cipher_block = sta_encrypt(0x0B19EB230100C207, key, StaTables.SAMPLE)
    assert cipher_block == 0xC45ED1619406DF95
    assert token_of(cipher_block, 0) == "51043465443420856213"


def test_worked_example_of_spec_section_11() -> None:
    """SPEC §11: DK 87f3ecbb2e46b48f, block 05014eec00013188 → token 70630503470028726114."""
    cipher_block = sta_encrypt(0x05014EEC00013188, bytes.fromhex("87f3ecbb2e46b48f"))
    assert token_of(cipher_block, 0) == "70630503470028726114"


@pytest.mark.parametrize(
    ("tables", "s2_inverse", "s1_inverse", "p_inverse"),
    [
        (
            StaTables.REAL,
            "12 6 2 7 13 9 5 4 1 10 14 8 0 3 15 11",
            "9 11 6 5 12 7 14 2 13 3 1 15 4 8 0 10",
            (
                "55 54 8 25 27 47 16 26 59 14 2 51 18 46 61 52 "
                "23 53 3 37 29 5 9 42 4 31 63 12 45 39 43 41 "
                "28 35 57 7 17 20 21 50 48 44 1 11 6 62 38 60 "
                "40 36 15 32 33 22 34 0 10 56 13 58 49 19 24 30"
            ),
        ),
        (
            StaTables.SAMPLE,
            "12 10 8 4 3 15 0 2 14 1 5 13 6 9 7 11",  # sample S2 is sample S1 inverted
            "6 9 7 4 3 10 12 14 2 13 1 15 0 11 8 5",
            (
                "44 16 7 32 51 22 49 52 63 3 42 36 39 56 35 21 "
                "4 27 57 24 62 18 26 15 30 11 43 1 29 0 14 40 "
                "58 12 2 53 34 46 10 31 8 17 20 47 48 45 60 59 "
                "28 9 55 41 37 25 38 6 54 19 23 50 33 13 5 61"
            ),
        ),
    ],
)
def test_tables_agree_with_the_printed_inverses(
    tables: StaTables, s2_inverse: str, s1_inverse: str, p_inverse: str
) -> None:
    """The S-boxes and permutation invert to the inverse tables SPEC §5.1 prints (no typo)."""
    ts = _TABLE_SETS[tables]

    def inverted(table: tuple[int, ...]) -> list[int]:
        return [table.index(v) for v in range(len(table))]

    assert inverted(ts.s2) == [int(v) for v in s2_inverse.split()]
    assert inverted(ts.s1) == [int(v) for v in s1_inverse.split()]
    assert inverted(ts.p) == [int(v) for v in p_inverse.split()]


# --- the fast cipher against the reference ----------------------------------------------------

blocks = st.integers(min_value=0, max_value=MASK64)
keys = st.binary(min_size=8, max_size=8)
table_sets = st.sampled_from(StaTables)


@settings(max_examples=300)
@given(block=blocks, key=keys, tables=table_sets)
@example(block=0, key=bytes(8), tables=StaTables.REAL)
@example(block=MASK64, key=b"\xff" * 8, tables=StaTables.SAMPLE)
def test_encrypt_matches_bit_by_bit_reference(block: int, key: bytes, tables: StaTables) -> None:
    """The table-driven encryption equals SPEC §5.1's bit-by-bit encryption."""
    expected = reference_encrypt(block, int.from_bytes(key, "big"), tables)
    assert sta_encrypt(block, key, tables) == expected
    cipher = StaCipher(key, tables)
    assert cipher.encrypt(block) == expected  # first use: computed like sta_encrypt
    assert cipher.encrypt(block) == expected  # reused: the per-key round tables


@settings(max_examples=300)
@given(block=blocks, key=keys, tables=table_sets)
@example(block=0, key=bytes(8), tables=StaTables.REAL)
@example(block=MASK64, key=b"\xff" * 8, tables=StaTables.SAMPLE)
def test_decrypt_matches_meter_style_reference(block: int, key: bytes, tables: StaTables) -> None:
    """The table-driven decryption equals SPEC §5.1's "meter style" bit-by-bit decryption."""
    expected = reference_decrypt_meter_style(block, int.from_bytes(key, "big"), tables)
    assert sta_decrypt(block, key, tables) == expected
    assert StaCipher(key, tables).decrypt(block) == expected


@given(block=blocks, key=keys, tables=table_sets)
def test_decrypt_inverts_encrypt(block: int, key: bytes, tables: StaTables) -> None:
    """decrypt(encrypt(x)) == x for every key, block and table set, cached or not."""
    cipher = StaCipher(key, tables)
    for _use in ("first", "reused"):
        assert cipher.decrypt(cipher.encrypt(block)) == block
    assert sta_decrypt(sta_encrypt(block, key, tables), key, tables) == block


@pytest.mark.parametrize("tables", list(StaTables))
def test_one_cipher_serves_many_blocks(tables: StaTables) -> None:
    """A StaCipher reused for many blocks gives what a fresh encryption per block gives."""
    key = bytes.fromhex("e7b21aa9ec929c96")
    cipher = StaCipher(key, tables)
    for block in range(0, 1 << 64, (1 << 64) // 97):
        encrypted = cipher.encrypt(block)
        assert encrypted == sta_encrypt(block, key, tables)
        assert cipher.decrypt(encrypted) == block


@pytest.mark.parametrize("length", [0, 7, 9, 16])
def test_key_of_wrong_length_is_refused(length: int) -> None:
    """A decoder key that is not 8 bytes raises ValueError instead of being padded or cut."""
    with pytest.raises(ValueError, match="8 bytes"):
        StaCipher(bytes(length))
    with pytest.raises(ValueError, match="8 bytes"):
        sta_encrypt(0, bytes(length))


@pytest.mark.parametrize("block", [-1, 1 << 64])
def test_block_outside_64_bits_is_refused(block: int) -> None:
    """A block below 0 or above 2**64-1 raises ValueError, fresh cipher or reused, both ways."""
    cipher = StaCipher(bytes(8))
    for _use in ("first", "second", "later"):
        with pytest.raises(ValueError, match="64-bit"):
            cipher.encrypt(block)
        cipher.encrypt(0)  # a valid block moves the cipher to its next stage
    with pytest.raises(ValueError, match="64-bit"):
        cipher.decrypt(block)
    with pytest.raises(ValueError, match="64-bit"):
        sta_encrypt(block, bytes(8))
    with pytest.raises(ValueError, match="64-bit"):
        sta_decrypt(block, bytes(8))


def test_repr_hides_the_key() -> None:
    """A StaCipher's repr does not show its key."""
    assert "87f3" not in repr(StaCipher(bytes.fromhex("87f3ecbb2e46b48f"))).lower()
