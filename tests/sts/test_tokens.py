import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.sts.amount import CURRENCY_MAX, UNITS_MAX, round_currency, round_units
from gateway.sts.crc import crc_field
from gateway.sts.errors import CrcMismatch, InvalidField, UnsupportedToken
from gateway.sts.tokens import (
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
    UnitsCredit,
    build_token,
    decode_block,
    decode_token,
    encode_block,
    fields_from_json,
)

VECTORS = [
    json.loads(line)
    for line in (Path(__file__).parent / "vectors" / "public.jsonl").read_text().splitlines()
    if line.strip()
]
WITH_FIELDS = [v for v in VECTORS if "fields" in v]


def _same_fields(actual: dict[str, Any], expected: dict[str, Any]) -> bool:
    """Compare docs/sts-vectors.md ``fields``: hex strings by value, the rest exactly."""
    if actual.keys() != expected.keys():
        return False
    for key, want in expected.items():
        got = actual[key]
        if isinstance(want, str):
            if int(got, 16) != int(want, 16):
                return False
        elif got != want:
            return False
    return True


@pytest.mark.parametrize("vector", WITH_FIELDS, ids=[v["id"] for v in WITH_FIELDS])
def test_vector_fields_encode_to_the_expected_block(vector: dict[str, Any]) -> None:
    """The vector's fields give its clear data block (layout and CRC, before encryption)."""
    block = encode_block(fields_from_json(vector["fields"]))
    assert block == int(vector["data_block"], 16)


@pytest.mark.parametrize("vector", WITH_FIELDS, ids=[v["id"] for v in WITH_FIELDS])
def test_vector_block_decodes_to_the_expected_fields(vector: dict[str, Any]) -> None:
    """The vector's clear data block decodes to its fields."""
    fields = decode_block(vector["fields"]["class"], int(vector["data_block"], 16))
    assert _same_fields(fields.to_json(), vector["fields"])


def test_flipped_crc_bit_is_a_crc_mismatch() -> None:
    """A block whose CRC field differs in one bit is refused."""
    block = encode_block(UnitsCredit(rnd=5, tid=85740, amount=1))
    with pytest.raises(CrcMismatch):
        decode_block(0, block ^ 1)


def test_reserved_subclass_with_valid_crc_is_unsupported() -> None:
    """A CRC-valid class 0 subclass 9 block is refused as not supported, not as a CRC error."""
    head = 9 << 44 | 0x123456789AB
    block = (head << 16) | crc_field(head)
    with pytest.raises(UnsupportedToken):
        decode_block(0, block)


def test_tid_over_24_bits_is_refused() -> None:
    """A TID of 2**24 does not fit its field."""
    with pytest.raises(InvalidField, match="tid"):
        encode_block(UnitsCredit(rnd=0, tid=2**24, amount=1))


def test_wrong_subclass_for_a_shape_is_refused() -> None:
    """A units credit with a currency subclass is refused when built."""
    with pytest.raises(InvalidField, match="subclass"):
        UnitsCredit(subclass=4, rnd=0, tid=1, amount=1)


# --- round trips for every class and subclass ------------------------------------------------

RND = st.integers(0, 15)
TID = st.integers(0, 2**24 - 1)
WORD = st.integers(0, 0xFFFF)

FIELDS: st.SearchStrategy[TokenFields] = st.one_of(
    st.builds(
        UnitsCredit, subclass=st.integers(0, 3), rnd=RND, tid=TID, amount=st.integers(0, UNITS_MAX)
    ),
    st.builds(
        CurrencyCredit,
        subclass=st.integers(4, 7),
        tid=TID,
        amount=st.integers(-CURRENCY_MAX, CURRENCY_MAX),
    ),
    st.builds(
        MeterTest,
        subclass=st.just(0),
        control=st.integers(0, 2**36 - 1),
        manufacturer_code=st.integers(0, 255),
    ),
    st.builds(
        MeterTest, subclass=st.just(1), control=st.integers(0, 2**28 - 1), manufacturer_code=WORD
    ),
    st.builds(
        PowerLimit,
        subclass=st.sampled_from([0, 6]),
        rnd=RND,
        tid=TID,
        amount=st.integers(0, UNITS_MAX),
    ),
    st.builds(ClearCredit, rnd=RND, tid=TID, register=WORD),
    st.builds(RegisterSetting, subclass=st.sampled_from([2, 7, 10]), rnd=RND, tid=TID, value=WORD),
    st.builds(ClearTamper, rnd=RND, tid=TID),
    st.builds(
        KeySection1,
        kenho=RND,
        krn=st.integers(1, 9),
        ro=st.integers(0, 1),
        three_kct=st.integers(0, 1),
        kt=st.integers(0, 3),
        nkho=st.integers(0, 2**32 - 1),
    ),
    st.builds(KeySection2, kenlo=RND, ti=st.integers(0, 99), nklo=st.integers(0, 2**32 - 1)),
    st.builds(KeySectionExtra, subclass=st.sampled_from([8, 9]), payload=st.integers(0, 2**44 - 1)),
)


def _carried(fields: TokenFields) -> TokenFields:
    """What the token carries: amounts rounded as the encoder rounds them."""
    if isinstance(fields, UnitsCredit | PowerLimit):
        return replace(fields, amount=round_units(fields.amount))
    if isinstance(fields, CurrencyCredit):
        return replace(fields, amount=round_currency(fields.amount))
    return fields


class _Xor:
    """A stand-in cipher (XOR with a constant) for the layout-only round trip."""

    def encrypt(self, block: int) -> int:
        return block ^ 0x0123456789ABCDEF

    def decrypt(self, block: int) -> int:
        return block ^ 0x0123456789ABCDEF


@given(FIELDS)
def test_fields_round_trip_through_a_token(fields: TokenFields) -> None:
    """Fields → 20 digits → fields give the fields back (amounts as rounded)."""
    token = build_token(fields, _Xor())
    decoded = decode_token(token.digits, _Xor())
    assert decoded.fields == _carried(fields)
    assert decoded.data_block == token.data_block


@given(FIELDS)
def test_fields_round_trip_through_json(fields: TokenFields) -> None:
    """to_json and fields_from_json are inverses."""
    assert fields_from_json(fields.to_json()) == fields
