from hypothesis import given
from hypothesis import strategies as st

from flows.validation import (
    MeterProblem,
    luhn_check_digit,
    parse_amount,
    parse_meter,
    parse_nickname,
)
from gateway.money import Money


def test_luhn_digit_matches_the_textbook_example() -> None:
    """The Luhn digit of 7992739871 is 3 (the worked example in ISO/IEC 7812-1 texts)."""
    assert luhn_check_digit("7992739871") == 3


@given(st.from_regex(r"[0-9]{10}|[0-9]{12}", fullmatch=True))
def test_a_number_with_its_check_digit_is_a_meter(payload: str) -> None:
    """Any 10 or 12 digits plus their Luhn digit parse as a meter number."""
    meter = payload + str(luhn_check_digit(payload))
    assert parse_meter(meter) == meter


@given(st.from_regex(r"[0-9]{10}|[0-9]{12}", fullmatch=True), st.integers(1, 9))
def test_a_wrong_check_digit_is_caught(payload: str, shift: int) -> None:
    """Changing the check digit makes the number fail the check, not the format."""
    wrong = (luhn_check_digit(payload) + shift) % 10
    assert parse_meter(payload + str(wrong)) is MeterProblem.CHECK_DIGIT


@given(st.from_regex(r"[0-9]{10}", fullmatch=True), st.integers(0, 9), st.integers(1, 9))
def test_a_single_mistyped_digit_is_caught(payload: str, position: int, shift: int) -> None:
    """Luhn catches every single-digit typo."""
    meter = payload + str(luhn_check_digit(payload))
    typo = meter[:position] + str((int(meter[position]) + shift) % 10) + meter[position + 1 :]
    assert parse_meter(typo) is MeterProblem.CHECK_DIGIT


def test_spaces_and_dashes_in_a_meter_number_are_ignored() -> None:
    """A meter copied in groups from its label parses to its digits."""
    assert parse_meter(" 3701-2345 676 ") == "37012345676"


@given(st.text(max_size=30))
def test_parse_meter_never_raises(text: str) -> None:
    """Any text gives a meter number or a problem, never an exception."""
    result = parse_meter(text)
    assert isinstance(result, MeterProblem) or len(result) in {11, 13}


def test_wrong_lengths_are_a_format_problem() -> None:
    """12 digits, or letters, are not a meter number at all."""
    assert parse_meter("123456789012") is MeterProblem.FORMAT
    assert parse_meter("3701234567a") is MeterProblem.FORMAT


def test_amounts_are_exact_minor_units() -> None:
    """Typed amounts become integer minor units, with thousands separators allowed."""
    assert parse_amount("500", "KES") == Money(50000, "KES")
    assert parse_amount("1,000.50", "KES") == Money(100050, "KES")
    assert parse_amount("2000", "UGX") == Money(2000, "UGX")


def test_impossible_amounts_are_refused() -> None:
    """Zero, negatives, exponents and too many decimals are not amounts."""
    for text in ["0", "-5", "1e3", "10.005", "", "ten", "0.00", "1.2.3", "NaN", "\u0665"]:
        assert parse_amount(text, "KES") is None, text
    assert parse_amount("10.5", "UGX") is None


@given(st.text(max_size=40))
def test_parse_amount_never_raises(text: str) -> None:
    """Any text gives a positive amount or None."""
    amount = parse_amount(text, "KES")
    assert amount is None or amount.amount_minor > 0


def test_nicknames_are_short_plain_words() -> None:
    """Nicknames are 1-12 ASCII letters, digits or spaces, whitespace collapsed."""
    assert parse_nickname("  My   shop ") == "My shop"
    assert parse_nickname("x" * 13) is None
    assert parse_nickname("caf\u00e9") is None
    assert parse_nickname("00") is None
