"""Meter identity: Luhn check digits, IIN, DRN and PAN (docs/sts.md §6.1 examples)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.sts.errors import InvalidField
from gateway.sts.pan import build_pan, luhn_check_digit, validate_drn, validate_iin


def luhn_valid(number: str) -> bool:
    """The textbook Luhn test of a whole number (check digit included), written independently."""
    total = 0
    for index, char in enumerate(reversed(number)):
        digit = int(char)
        if index % 2 == 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


@pytest.mark.parametrize(
    ("digits", "check"),
    [
        ("4750015023", "1"),  # SPEC §6.1
        ("1234567890", "3"),  # SPEC §6.1, CTSA17: 12345678904 is invalid, 3 is right
        ("1111111111", "5"),  # SPEC §6.1, CTSA17: 11111111113 is invalid, 5 is right
        ("7992739871", "3"),  # the usual Luhn textbook example
        ("0000000000", "0"),
    ],
)
def test_luhn_check_digit_examples(digits: str, check: str) -> None:
    """The check digit of the SPEC's and the textbook examples is the published one."""
    assert luhn_check_digit(digits) == check


@given(st.text(alphabet="0123456789", min_size=1, max_size=30))
def test_appended_check_digit_passes_luhn(digits: str) -> None:
    """Appending the computed check digit always yields a Luhn-valid number."""
    assert luhn_valid(digits + luhn_check_digit(digits))


@given(st.text(alphabet="0123456789", min_size=1, max_size=30), st.integers(1, 9))
def test_changing_one_digit_breaks_the_check(digits: str, delta: int) -> None:
    """Any single-digit change of the payload changes the check digit (Luhn catches it)."""
    changed = str((int(digits[-1]) + delta) % 10)
    assert luhn_check_digit(digits[:-1] + changed) != luhn_check_digit(digits)


@pytest.mark.parametrize("bad", ["", "12a4", " 123", "١٢٣"])
def test_luhn_refuses_non_digits(bad: str) -> None:
    """Empty text or anything but ASCII digits raises InvalidField."""
    with pytest.raises(InvalidField):
        luhn_check_digit(bad)


@pytest.mark.parametrize("iin", ["600727", "0000", "123456", "1234"])
def test_valid_iins(iin: str) -> None:
    """Six digits or the legacy four digits are IINs, returned unchanged."""
    assert validate_iin(iin) == iin


@pytest.mark.parametrize(
    "iin",
    ["", "60072", "6007270", "00000", "60072a", "\uff16\uff10\uff10\uff17\uff12\uff17", 600727],
)
def test_invalid_iins(iin: object) -> None:
    """Other lengths, non-ASCII digits and non-strings are refused."""
    with pytest.raises(InvalidField) as raised:
        validate_iin(iin)  # type: ignore[arg-type]
    assert raised.value.field == "iin"


@pytest.mark.parametrize(
    ("drn", "iin"),
    [("47500150231", "600727"), ("00000000000", "600727"), ("0100000000008", "0000")],
)
def test_valid_drns(drn: str, iin: str) -> None:
    """11-digit DRNs with a 6-digit IIN and 13-digit ones with a 4-digit IIN, Luhn-correct."""
    assert validate_drn(drn, iin) == drn


@pytest.mark.parametrize(
    ("drn", "iin", "message"),
    [
        ("12345678904", "600727", "is 3, not 4"),  # CTSA17
        ("11111111113", "600727", "is 5, not 3"),  # CTSA17
        ("0100000000008", "600727", "11 digits"),
        ("47500150231", "0000", "13 digits"),
        ("4750015023", "600727", "11 digits"),
        ("4750015023x", "600727", "11 digits"),
    ],
)
def test_invalid_drns(drn: str, iin: str, message: str) -> None:
    """A wrong check digit or length is refused, and the message says what is right."""
    with pytest.raises(InvalidField, match=message) as raised:
        validate_drn(drn, iin)
    assert raised.value.field == "drn"


@pytest.mark.parametrize(
    ("iin", "drn", "pan"),
    [
        ("600727", "00000000000", "600727000000000009"),
        ("0000", "0100000000008", "000001000000000082"),
        ("600727", "47500150231", "600727475001502312"),
    ],
)
def test_pan_examples_of_spec(iin: str, drn: str, pan: str) -> None:
    """SPEC §6.1's example PANs: IIN + DRN + Luhn digit over those 17 digits."""
    assert build_pan(iin, drn) == pan


@given(st.sampled_from(["600727", "0000"]), st.data())
def test_every_pan_is_18_luhn_valid_digits(iin: str, data: st.DataObject) -> None:
    """A PAN built from any valid IIN and DRN is 18 digits, starts with both, and passes Luhn."""
    body = data.draw(
        st.text(alphabet="0123456789", min_size=17 - len(iin) - 1, max_size=17 - len(iin) - 1)
    )
    drn = body + luhn_check_digit(body)
    pan = build_pan(iin, drn)
    assert len(pan) == 18
    assert pan.startswith(iin + drn)
    assert luhn_valid(pan)
