"""EA11 (MISTY1, RFC 2994): RFC test vectors, the public EA11 vectors, S-box sanity, round trips.

Also the choice of cipher by EA code (``gateway.sts.cipher.make_cipher``).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.sts.cipher import (
    EncryptionAlgorithm,
    decoder_key_length,
    encryption_algorithm,
    make_cipher,
)
from gateway.sts.ea07 import StaCipher, StaTables, sta_encrypt
from gateway.sts.ea11 import _FI_IN, _FI_OUT, _S7, _S9, Misty1Cipher, _fi_reference
from gateway.sts.errors import InvalidKey, UnsupportedAlgorithm
from tests.sts.test_ea07 import MASK64, load_vectors, token_of

RFC_KEY = bytes.fromhex("00112233445566778899aabbccddeeff")


@pytest.mark.parametrize(
    ("plaintext", "ciphertext"),
    [(0x0123456789ABCDEF, 0x8B1DA5F56AB3D07C), (0xFEDCBA9876543210, 0x04B68240B13BE95D)],
    ids=["RFC 2994 test data, block 1", "RFC 2994 test data, block 2"],
)
def test_rfc_2994_test_vectors(plaintext: int, ciphertext: int) -> None:
    """RFC 2994's example key encrypts its two plaintext blocks to the published ciphertexts."""
    cipher = Misty1Cipher(RFC_KEY)
    assert cipher.encrypt(plaintext) == ciphertext
    assert cipher.decrypt(ciphertext) == plaintext


EA11_VECTORS = load_vectors(11)


def test_public_vectors_are_present() -> None:
    """The public vector file holds (at least) the 38 EA11 token vectors these tests replay."""
    assert len(EA11_VECTORS) >= 38


@pytest.mark.parametrize("vector", EA11_VECTORS, ids=[v["id"] for v in EA11_VECTORS])
def test_vector_block_encrypts_to_token(vector: dict[str, Any]) -> None:
    """The vector's data block, MISTY1-encrypted with its 16-byte decoder key, gives its token."""
    cipher = Misty1Cipher(bytes.fromhex(vector["decoder_key"]))
    block = int(vector["data_block"], 16)
    cipher_block = cipher.encrypt(block)
    assert token_of(cipher_block, vector["fields"]["class"]) == vector["token"]
    assert cipher.decrypt(cipher_block) == block


@pytest.mark.parametrize(("name", "sbox", "bits"), [("S7", _S7, 7), ("S9", _S9, 9)])
def test_sbox_is_an_almost_perfect_nonlinear_permutation(
    name: str, sbox: tuple[int, ...], bits: int
) -> None:
    """S7 and S9 are permutations with differential uniformity 2, as MISTY1's design requires.

    Any single mistyped table entry breaks the permutation property, so this guards the tables
    beyond what the test vectors happen to exercise.
    """
    size = 1 << bits
    assert sorted(sbox) == list(range(size)), name
    worst = 0
    for difference in range(1, size):
        counts: dict[int, int] = {}
        for x in range(size):
            out = sbox[x] ^ sbox[x ^ difference]
            counts[out] = counts.get(out, 0) + 1
        worst = max(worst, *counts.values())
    assert worst == 2, name


@given(x=st.integers(0, 0xFFFF), key=st.integers(0, 0xFFFF))
def test_tabulated_fi_equals_rfc_fi(x: int, key: int) -> None:
    """FI from the two precomputed tables equals FI computed as RFC 2994 §2.3 writes it."""
    assert _FI_OUT[_FI_IN[x] ^ key] == _fi_reference(x, key)


@pytest.mark.parametrize("key", [0x0000, 0xFFFF, 0x1F3A])
def test_tabulated_fi_equals_rfc_fi_for_every_input(key: int) -> None:
    """For every 16-bit input, the tabulated FI equals RFC 2994's FI (three fixed keys)."""
    assert all(_FI_OUT[_FI_IN[x] ^ key] == _fi_reference(x, key) for x in range(1 << 16))


@given(block=st.integers(0, MASK64), key=st.binary(min_size=16, max_size=16))
def test_decrypt_inverts_encrypt(block: int, key: bytes) -> None:
    """decrypt(encrypt(x)) == x for every key and block."""
    cipher = Misty1Cipher(key)
    assert cipher.decrypt(cipher.encrypt(block)) == block


@pytest.mark.parametrize("length", [0, 8, 15, 17, 20])
def test_key_of_wrong_length_is_refused(length: int) -> None:
    """A MISTY1 key that is not 16 bytes raises ValueError."""
    with pytest.raises(ValueError, match="16 bytes"):
        Misty1Cipher(bytes(length))


@pytest.mark.parametrize("block", [-1, 1 << 64])
def test_block_outside_64_bits_is_refused(block: int) -> None:
    """A block below 0 or above 2**64-1 raises ValueError for both directions."""
    cipher = Misty1Cipher(RFC_KEY)
    with pytest.raises(ValueError, match="64-bit"):
        cipher.encrypt(block)
    with pytest.raises(ValueError, match="64-bit"):
        cipher.decrypt(block)


# --- make_cipher ------------------------------------------------------------------------------


def test_make_cipher_ea07_is_sta() -> None:
    """EA 7 with an 8-byte key gives STA with the real tables unless the sample ones are asked."""
    key = bytes.fromhex("0abc12def3456789")
    cipher = make_cipher(7, key)
    assert isinstance(cipher, StaCipher)
    assert cipher.encrypt(0x0B19EB230100C207) == sta_encrypt(0x0B19EB230100C207, key)
    sample = make_cipher(EncryptionAlgorithm.EA07, key, sta_tables=StaTables.SAMPLE)
    assert sample.encrypt(0x0B19EB230100C207) == 0xC45ED1619406DF95


def test_make_cipher_ea11_is_misty1() -> None:
    """EA 11 with a 16-byte key gives MISTY1 (RFC 2994 vector)."""
    assert make_cipher(11, RFC_KEY).encrypt(0x0123456789ABCDEF) == 0x8B1DA5F56AB3D07C


def test_make_cipher_refuses_ea09() -> None:
    """EA09 (DEA) is refused with a sentence that names it, not guessed at."""
    with pytest.raises(UnsupportedAlgorithm, match=r"EA09 \(DEA\) is not supported"):
        make_cipher(9, bytes(8))


@pytest.mark.parametrize("ea", [0, 1, 8, 10, 12, 255, -7, True, "7", None, 7.0, 11.0])
def test_make_cipher_refuses_unknown_codes(ea: object) -> None:
    """Codes other than 7 and 11 (and non-integers, booleans included) are UnsupportedAlgorithm."""
    with pytest.raises(UnsupportedAlgorithm):
        make_cipher(ea, bytes(8))  # type: ignore[arg-type]


@pytest.mark.parametrize(("ea", "length"), [(7, 16), (7, 7), (11, 8), (11, 20), (11, 0)])
def test_make_cipher_refuses_wrong_key_length(ea: int, length: int) -> None:
    """A decoder key whose length does not fit the EA raises InvalidKey naming the length."""
    with pytest.raises(InvalidKey, match=f"got {length} bytes"):
        make_cipher(ea, bytes(length))


def test_decoder_key_length_per_algorithm() -> None:
    """EA07 keys are 8 bytes and EA11 keys 16."""
    assert decoder_key_length(7) == 8
    assert decoder_key_length(11) == 16


def test_encryption_algorithm_names_the_code() -> None:
    """Codes 7 and 11 (ints or members) map to their enum members; 9 is refused by name."""
    assert encryption_algorithm(7) is EncryptionAlgorithm.EA07
    assert encryption_algorithm(EncryptionAlgorithm.EA11) is EncryptionAlgorithm.EA11
    with pytest.raises(UnsupportedAlgorithm, match="EA09"):
        encryption_algorithm(9)
