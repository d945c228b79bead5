"""Decoder key generation (DKGA02, DKGA04) and the key attribute validators (docs/sts.md §6)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from Crypto.Cipher import DES
from hypothesis import given
from hypothesis import strategies as st

from gateway.sts.dkga import (
    derive_decoder_key,
    has_odd_parity,
    validate_base_date,
    validate_key_type,
    validate_krn,
    validate_sgc,
    validate_tariff_index,
)
from gateway.sts.errors import InvalidField, InvalidKey, UnsupportedAlgorithm
from tests.sts.test_ea07 import VECTORS

DKGA02_VK = bytes.fromhex("abababababababab")  # odd parity: 0xab has five bits set
DKGA04_VK = bytes.fromhex("abababababababab949494949494949401234567")


def meter_vectors() -> list[dict[str, Any]]:
    """Every public vector that gives the key-derivation inputs and the expected decoder key."""
    lines = VECTORS.read_text(encoding="utf-8").splitlines()
    return [v for v in (json.loads(line) for line in lines if line.strip()) if "meter" in v]


METER_VECTORS = meter_vectors()


def derive(**overrides: Any) -> bytes:
    """derive_decoder_key with SPEC §6.3's example attributes, some overridden."""
    arguments: dict[str, Any] = {
        "dkga": 4,
        "vending_key": DKGA04_VK,
        "iin": "600727",
        "drn": "00000000000",
        "key_type": 2,
        "sgc": "201457",
        "tariff_index": "01",
        "krn": 1,
        "base_date": 2014,
        "ea": 7,
    }
    arguments.update(overrides)
    return derive_decoder_key(**arguments)


def test_public_vectors_are_present() -> None:
    """The public vector file holds at least 151 vectors with key-derivation inputs (DKGA02, 04)."""
    assert len(METER_VECTORS) >= 151
    assert {v["meter"]["dkga"] for v in METER_VECTORS} == {2, 4}


@pytest.mark.parametrize("vector", METER_VECTORS, ids=[v["id"] for v in METER_VECTORS])
def test_vector_decoder_key(vector: dict[str, Any]) -> None:
    """The decoder key derived from the vector's meter attributes is the vector's decoder key.

    DKGA02 vectors without an EA (decoder-key-only) derive the EA07 key, the only one DKGA02 makes.
    """
    meter = vector["meter"]
    key = derive_decoder_key(
        dkga=meter["dkga"],
        vending_key=bytes.fromhex(meter["vending_key"]),
        iin=meter["iin"],
        drn=meter["drn"],
        key_type=meter["key_type"],
        sgc=meter["sgc"],
        tariff_index=meter["tariff_index"],
        krn=meter["krn"],
        base_date=meter["base_date"],
        ea=meter.get("ea") or 7,
    )
    assert key.hex() == vector["decoder_key"]


def test_dkga02_example_of_spec() -> None:
    """SPEC §6.2: VK abab…ab, KT2 SGC 123456 TI01 KRN1, PAN 6007270…09 → e653341f9d5bf36f."""
    key = derive(dkga=2, vending_key=DKGA02_VK, sgc="123456", base_date=1993)
    assert key.hex() == "e653341f9d5bf36f"


def test_dkga04_example_of_spec() -> None:
    """SPEC §6.3: VK ABAB…4567, KT2 SGC 201457 TI01 KRN1 BD2014 EA07 → 87f3ecbb2e46b48f."""
    assert derive().hex() == "87f3ecbb2e46b48f"


def test_dkga02_common_key_ignores_the_drn() -> None:
    """KT 3 (DCTK): the DRN digits of the PAN block are zeros, so every meter gets one key.

    The expected key is SPEC §6.2's recipe worked by hand: PANBlock 0072700000000000 XOR
    ControlBlock 3123456011FFFFFF, DES-encrypted with VK, XOR X XOR VK.
    """
    x = bytes(
        a ^ b
        for a, b in zip(
            bytes.fromhex("0072700000000000"), bytes.fromhex("3123456011FFFFFF"), strict=True
        )
    )
    des = DES.new(DKGA02_VK, DES.MODE_ECB)  # noqa: S304 - DKGA02 is single DES (SPEC §6.2)
    expected = bytes(e ^ a ^ v for e, a, v in zip(des.encrypt(x), x, DKGA02_VK, strict=True))
    for drn in ("00000000000", "47500150231", "12345678903"):
        key = derive(dkga=2, vending_key=DKGA02_VK, key_type=3, sgc="123456", drn=drn)
        assert key == expected
    unique = {
        derive(dkga=2, vending_key=DKGA02_VK, key_type=2, drn=drn)
        for drn in ("00000000000", "47500150231")
    }
    assert len(unique) == 2


def test_dkga04_key_lengths_follow_the_ea() -> None:
    """DKGA04 gives 8 bytes for EA07 and 16 for EA11, and the length is hashed in (not a prefix)."""
    short = derive(ea=7)
    long = derive(ea=11)
    assert len(short) == 8
    assert len(long) == 16
    assert long[:8] != short


@pytest.mark.parametrize(
    "change",
    [
        {"base_date": 2035},
        {"tariff_index": "02"},
        {"krn": 2},
        {"key_type": 1},
        {"sgc": "201458"},
        {"drn": "47500150231"},
        {"iin": "0000", "drn": "0100000000008"},
    ],
)
def test_dkga04_every_attribute_changes_the_key(change: dict[str, Any]) -> None:
    """Each DKGA04 input (base date included) changes the decoder key."""
    assert derive(**change) != derive()


def test_dkga02_refuses_vending_key_without_odd_parity() -> None:
    """A DKGA02 vending key with an even-parity byte raises InvalidKey (SPEC leaves it open)."""
    vk = bytes.fromhex("abababababababaa")
    assert not has_odd_parity(vk)
    with pytest.raises(InvalidKey, match="odd parity"):
        derive(dkga=2, vending_key=vk)


@given(st.binary(min_size=1, max_size=24))
def test_odd_parity_means_every_byte_odd(key: bytes) -> None:
    """has_odd_parity is true exactly when each byte has an odd number of one bits."""
    assert has_odd_parity(key) == all(sum(b >> i & 1 for i in range(8)) % 2 == 1 for b in key)


@pytest.mark.parametrize(("dkga", "length"), [(2, 20), (2, 7), (4, 8), (4, 16), (4, 21)])
def test_vending_key_of_wrong_length_is_refused(dkga: int, length: int) -> None:
    """DKGA02 needs an 8-byte VK and DKGA04 a 20-byte one; other lengths raise InvalidKey."""
    expected = "8" if dkga == 2 else "20"
    with pytest.raises(InvalidKey, match=f"{expected}-byte vending key, got {length} bytes"):
        derive(dkga=dkga, vending_key=b"\x01" * length)


def test_vending_key_given_as_text_is_refused() -> None:
    """A vending key passed as hex text instead of bytes raises InvalidKey naming the type."""
    with pytest.raises(InvalidKey, match="got a str"):
        derive(vending_key=DKGA04_VK.hex())


@pytest.mark.parametrize("dkga", [1, 3])
def test_dkga01_and_dkga03_are_refused(dkga: int) -> None:
    """DKGA01 and DKGA03 raise UnsupportedAlgorithm with a sentence naming them."""
    with pytest.raises(UnsupportedAlgorithm, match=f"DKGA0{dkga} is not supported"):
        derive(dkga=dkga)


@pytest.mark.parametrize("dkga", [0, 5, 99, -2, True, "4", None])
def test_unknown_dkga_is_refused(dkga: object) -> None:
    """Unknown DKGA codes (and non-integers) raise UnsupportedAlgorithm."""
    with pytest.raises(UnsupportedAlgorithm, match="unknown"):
        derive(dkga=dkga)


def test_dkga02_refuses_ea11() -> None:
    """DKGA02 makes 8-byte keys, so asking it for an EA11 key is UnsupportedAlgorithm."""
    with pytest.raises(UnsupportedAlgorithm, match="DKGA02 derives 8-byte keys for EA07 only"):
        derive(dkga=2, vending_key=DKGA02_VK, ea=11)


@pytest.mark.parametrize("ea", [9, 8, 0])
def test_unsupported_ea_is_refused(ea: int) -> None:
    """EA09 and unknown EA codes raise UnsupportedAlgorithm during key derivation too."""
    with pytest.raises(UnsupportedAlgorithm):
        derive(ea=ea)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"iin": "60072"}, "iin"),
        ({"drn": "00000000001"}, "drn"),
        ({"key_type": 4}, "key_type"),
        ({"sgc": "20145"}, "sgc"),
        ({"tariff_index": "1"}, "tariff_index"),
        ({"krn": 0}, "krn"),
        ({"base_date": 2000}, "base_date"),
    ],
)
def test_invalid_attribute_is_named(change: dict[str, Any], field: str) -> None:
    """A malformed meter attribute raises InvalidField naming that attribute."""
    with pytest.raises(InvalidField) as raised:
        derive(**change)
    assert raised.value.field == field


@pytest.mark.parametrize("sgc", ["000000", "123456", "999999"])
def test_valid_sgc(sgc: str) -> None:
    """Any six ASCII digits are a supply group code."""
    assert validate_sgc(sgc) == sgc


@pytest.mark.parametrize(
    "sgc", ["", "12345", "1234567", "12345a", 123456, "\uff11\uff12\uff13\uff14\uff15\uff16"]
)
def test_invalid_sgc(sgc: object) -> None:
    """Other lengths, letters, non-ASCII digits and integers are not supply group codes."""
    with pytest.raises(InvalidField, match="6 decimal digits"):
        validate_sgc(sgc)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ti", "ok"),
    [("00", True), ("99", True), ("7", False), ("100", False), ("a1", False), (1, False)],
)
def test_tariff_index(ti: object, ok: bool) -> None:
    """A tariff index is exactly two ASCII digits."""
    if ok:
        assert validate_tariff_index(ti) == ti  # type: ignore[arg-type]
    else:
        with pytest.raises(InvalidField):
            validate_tariff_index(ti)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("krn", "ok"), [(1, True), (9, True), (0, False), (10, False), (True, False), ("1", False)]
)
def test_krn(krn: object, ok: bool) -> None:
    """A key revision number is an int from 1 to 9 (booleans and strings are refused)."""
    if ok:
        assert validate_krn(krn) == krn  # type: ignore[arg-type]
    else:
        with pytest.raises(InvalidField):
            validate_krn(krn)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kt", "ok"), [(0, True), (3, True), (-1, False), (4, False), (False, False)]
)
def test_key_type(kt: object, ok: bool) -> None:
    """A key type is an int from 0 (DITK) to 3 (DCTK)."""
    if ok:
        assert validate_key_type(kt) == kt  # type: ignore[arg-type]
    else:
        with pytest.raises(InvalidField):
            validate_key_type(kt)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bd", "ok"),
    [(1993, True), (2014, True), (2035, True), (2024, False), (93, False), ("2014", False)],
)
def test_base_date(bd: object, ok: bool) -> None:
    """A base date is the year 1993, 2014 or 2035."""
    if ok:
        assert validate_base_date(bd) == bd  # type: ignore[arg-type]
    else:
        with pytest.raises(InvalidField):
            validate_base_date(bd)  # type: ignore[arg-type]
