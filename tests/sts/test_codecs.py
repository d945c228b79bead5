import bisect
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import example, given, note
from hypothesis import strategies as st

from gateway.sts.amount import (
    CURRENCY_MAX,
    UNITS_MAX,
    decode_currency,
    decode_units,
    encode_currency,
    encode_units,
    round_currency,
    round_units,
    round_units_down,
)
from gateway.sts.bits import Field, Layout, pack, unpack
from gateway.sts.carrier import (
    extract_class,
    from_digits,
    group_digits,
    insert_class,
    mask_digits,
    to_digits,
)
from gateway.sts.crc import crc16, crc_field, reference_crc_field
from gateway.sts.errors import AmountNotEncodable, InvalidField, TidRangeExhausted, TokenFormatError
from gateway.sts.tid import TID_MAX, is_reserved, next_tid, range_end, tid_for
from tests.sts import reference as ref

# --- bits -------------------------------------------------------------------------------------

LAYOUT = Layout("demo", Field("a", 4), Field("_pad", 2), Field("b", 10))


def test_pack_places_fields_most_significant_first() -> None:
    """The first field of a layout lands in the highest bits, padding stays zero."""
    assert pack(LAYOUT, {"a": 0xF, "b": 1}) == 0xF001
    assert unpack(LAYOUT, 0xF001) == {"a": 0xF, "b": 1}


def test_pack_refuses_a_value_wider_than_its_field() -> None:
    """A value that does not fit is refused with the field's name, never truncated."""
    with pytest.raises(InvalidField) as caught:
        pack(LAYOUT, {"a": 16, "b": 0})
    assert caught.value.field == "a"


@given(a=st.integers(0, 15), b=st.integers(0, 1023))
def test_unpack_inverts_pack(a: int, b: int) -> None:
    """unpack(pack(x)) == x for every in-range value."""
    assert unpack(LAYOUT, pack(LAYOUT, {"a": a, "b": b})) == {"a": a, "b": b}


# --- CRC --------------------------------------------------------------------------------------


def test_crc16_matches_the_modbus_check_value() -> None:
    """CRC-16/MODBUS of "123456789" is 0x4B37 (the catalogue check value)."""
    assert crc16(b"123456789") == 0x4B37


def test_crc_field_reproduces_the_stsa_ken_example() -> None:
    """The STSA wiki's KEN example (RND 0101, TID 0xC02A55, amount 0x2710) has CRC field 0x1970."""
    head = 0b0101 << 40 | 0b110000000010101001010101 << 16 | 0b0010011100010000
    assert crc_field(head) == 0x1970


def test_currency_crc_appends_one_byte() -> None:
    """CRC_C is the CRC of the 7 head bytes followed by 0x01, stored byte-swapped."""
    head = 0x4065F0D4DFF6
    crc = crc16(head.to_bytes(7, "big") + b"\x01")
    assert crc_field(head, currency=True) == (crc & 0xFF) << 8 | crc >> 8


@given(head=st.integers(0, 2**50 - 1), currency=st.booleans())
@example(head=0, currency=False)
@example(head=2**50 - 1, currency=True)
def test_table_crc_equals_the_reference_crc(head: int, currency: bool) -> None:
    """The table-driven CRC field equals CRC-16 over the 7 (or 8) bytes, byte-swapped."""
    data = head.to_bytes(7, "big") + (b"\x01" if currency else b"")
    crc = crc16(data)
    assert crc_field(head, currency=currency) == (crc & 0xFF) << 8 | crc >> 8
    assert crc_field(head, currency=currency) == reference_crc_field(head, currency=currency)


# --- amounts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("units", "carried"),
    [
        (0, 0),
        (16383, 16383),
        (16384, 16384),
        (16385, 16394),
        (20000, 20004),
        (180223, 180224),
        (1818623, 1818624),
        (UNITS_MAX, 18201624),
    ],
)
def test_units_round_up_across_exponent_boundaries(units: int, carried: int) -> None:
    """Encoding rounds up, carrying into the next exponent (docs/sts.md §3.1 boundary cases)."""
    assert round_units(units) == carried


def test_units_above_the_maximum_are_refused() -> None:
    """18 201 625 base units do not fit the 16-bit amount field."""
    with pytest.raises(AmountNotEncodable):
        encode_units(UNITS_MAX + 1)


def test_negative_units_are_refused() -> None:
    """A units credit cannot be negative."""
    with pytest.raises(AmountNotEncodable):
        encode_units(-1)


@given(st.integers(0, UNITS_MAX))
@example(180223)
@example(1818623)
def test_units_are_never_encoded_below_the_request(units: int) -> None:
    """The encoded amount is >= the request and the smallest encodable such value."""
    field = encode_units(units)
    carried = decode_units(field)
    note(f"field={field:04x} carried={carried}")
    assert carried >= units
    # Minimal: no other field value carries an amount in [units, carried).
    assert all(not units <= decode_units(f) < carried for f in (field - 1, field - 2) if f >= 0)


#: Every amount a units field carries, by the reference's decoding of all 2**16 fields.
ENCODABLE = sorted({ref.units_value(field) for field in range(1 << 16)})


@given(st.integers(0, UNITS_MAX))
@example(16384)
@example(16393)
@example(30172)  # KES 35,000 at KES 10/kWh + 16 % VAT: a token for it would carry 30,174
@example(180223)
@example(1818623)
@example(UNITS_MAX)
def test_units_round_down_to_the_largest_amount_a_token_carries(units: int) -> None:
    """What a seller may sell: encodable (a token carries it exactly), <= units, and maximal."""
    sold = round_units_down(units)
    expected = ENCODABLE[bisect.bisect_right(ENCODABLE, units) - 1]
    note(f"sold={sold} expected={expected}")
    assert sold == expected <= units
    assert ref.units_value(ref.units_field(sold)) == sold
    assert round_units(sold) == sold


def test_round_units_down_refuses_what_no_token_carries() -> None:
    """Negative and above-maximum amounts are refused, as by ``encode_units``."""
    for units in (-1, UNITS_MAX + 1):
        with pytest.raises(AmountNotEncodable):
            round_units_down(units)


@given(st.integers(0, 0xFFFF))
def test_every_units_field_decodes_to_itself(field: int) -> None:
    """Every 16-bit field value is the encoding of the amount it decodes to."""
    assert encode_units(decode_units(field)) == field


@given(st.integers(-CURRENCY_MAX, CURRENCY_MAX))
@example(-99994)
@example(1)
@example(-180223)
def test_currency_rounds_in_the_customers_favour(amount: int) -> None:
    """A credit rounds up and a debit's magnitude rounds down; the sign is kept."""
    carried = round_currency(amount)
    if amount >= 0:
        assert carried >= amount
    else:
        assert amount <= carried <= 0


@given(st.integers(0, 2**20 - 1))
def test_every_currency_value_decodes_and_reencodes(value: int) -> None:
    """Every 20-bit currency value except negative zero re-encodes to itself."""
    amount = decode_currency(value)
    if value >> 19 and amount == 0:
        return  # "-0": a sign bit with zero magnitude re-encodes as +0
    assert encode_currency(amount) == value


def test_currency_above_the_maximum_is_refused() -> None:
    """A magnitude beyond the 5-bit exponent's range is refused either way."""
    with pytest.raises(AmountNotEncodable):
        encode_currency(CURRENCY_MAX + 1)
    with pytest.raises(AmountNotEncodable):
        encode_currency(-CURRENCY_MAX - 1)


# --- carrier ----------------------------------------------------------------------------------


def test_class_transposition_matches_the_iec_sample_example() -> None:
    """Cipher block C45ED1619406DF95 of class 0 becomes 0x2C45ED1618406DF95 (docs/sts.md §5.1)."""
    token = insert_class(0xC45ED1619406DF95, 0)
    assert token == 0x2C45ED1618406DF95
    assert to_digits(token) == "51043465443420856213"


@given(st.integers(0, 2**64 - 1), st.integers(0, 3))
def test_extract_class_inverts_insert_class(block: int, token_class: int) -> None:
    """Removing the class bits gives back the class and the block."""
    assert extract_class(insert_class(block, token_class)) == (token_class, block)


@given(st.integers(0, 2**66 - 1))
def test_digits_round_trip(value: int) -> None:
    """Every 66-bit value is 20 digits and reads back unchanged."""
    digits = to_digits(value)
    assert len(digits) == 20
    assert from_digits(digits) == value


@pytest.mark.parametrize(
    "text",
    [
        "7378697629483820646",
        "737869762948382064630",
        "73786976294838206464",
        "1234abcd123412341234",
    ],
)
def test_malformed_digits_are_a_format_error(text: str) -> None:
    """Wrong length, non-digits and values >= 2**66 are refused."""
    with pytest.raises(TokenFormatError):
        from_digits(text)


def test_grouped_digits_are_accepted() -> None:
    """Spaces and dashes between groups are ignored when reading a token."""
    assert from_digits("5104 3465-4434 2085 6213") == 51043465443420856213


def test_grouping_and_masking() -> None:
    """Tokens display as 4-4-4-4-4 and log with only the last four digits."""
    assert group_digits("51043465443420856213") == "5104 3465 4434 2085 6213"
    assert mask_digits("51043465443420856213") == "****-****-****-****-6213"


# --- TID --------------------------------------------------------------------------------------


def test_tid_counts_minutes_since_the_base_date() -> None:
    """2014-03-01 13:00 is TID 85740 on the 2014 base date (docs/sts.md §11)."""
    assert tid_for(datetime(2014, 3, 1, 13, 0, tzinfo=UTC), 2014) == 85740


def test_tid_uses_the_given_zone() -> None:
    """A time given in another zone is counted in UTC unless a zone is passed."""
    nairobi = timezone(timedelta(hours=3))
    at = datetime(2014, 3, 1, 16, 0, tzinfo=nairobi)
    assert tid_for(at, 2014) == 85740
    assert tid_for(at, 2014, zone=nairobi) == 85740 + 180


def test_naive_time_is_refused() -> None:
    """A naive datetime is ambiguous and refused."""
    with pytest.raises(InvalidField):
        tid_for(datetime(2020, 1, 1), 2014)  # noqa: DTZ001 - the point of the test


def test_reserved_minute_is_skipped() -> None:
    """A token at 00:01 gets the TID of 00:02 (CTSA09)."""
    at = datetime(2020, 5, 6, 0, 1, tzinfo=UTC)
    tid = next_tid(at, 2014, None)
    assert tid == tid_for(at, 2014) + 1
    assert not is_reserved(tid)


def test_same_minute_tokens_get_consecutive_tids() -> None:
    """Three tokens in one minute carry that minute and the two after."""
    at = datetime(2020, 5, 6, 0, 3, tzinfo=UTC)
    first = next_tid(at, 2014, None)
    second = next_tid(at, 2014, first)
    third = next_tid(at, 2014, second)
    assert (second - first, third - second) == (1, 1)


def test_1993_range_ended_in_november_2024() -> None:
    """The 1993 base date's last TID minute is 2024-11-24 20:15 (docs/sts.md §8)."""
    assert range_end(1993) == datetime(2024, 11, 24, 20, 15, tzinfo=UTC)
    assert tid_for(range_end(1993), 1993) == TID_MAX


def test_1993_key_in_2025_needs_a_rollover() -> None:
    """A 1993-base-date key at a 2025 timestamp is refused, naming the rollover key change."""
    with pytest.raises(TidRangeExhausted, match="rollover"):
        next_tid(datetime(2025, 3, 1, tzinfo=UTC), 1993, None)


def test_last_tid_at_the_limit_needs_a_rollover() -> None:
    """When the last TID was the 24-bit maximum there is no next one."""
    with pytest.raises(TidRangeExhausted, match="rollover"):
        next_tid(datetime(2020, 1, 1, tzinfo=UTC), 2014, TID_MAX)


def test_unknown_base_date_is_refused() -> None:
    """Only 1993, 2014 and 2035 are base dates."""
    with pytest.raises(InvalidField):
        tid_for(datetime(2020, 1, 1, tzinfo=UTC), 2000)
