import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.phone import (
    InvalidPhoneNumber,
    international_digits,
    masked,
    national_significant,
    parse_msisdn,
)


@pytest.mark.parametrize(
    "text",
    ["0712345678", "+254712345678", "254712345678", " +254 712 345 678 ", "712345678"],
)
def test_kenyan_spellings_normalise_to_e164(text: str) -> None:
    """Every common way of writing a Kenyan mobile number gives the same E.164 number."""
    assert parse_msisdn(text, "KE") == "+254712345678"


def test_other_country_codes_are_kept() -> None:
    """A Ugandan number keeps its own country code whatever the default region."""
    assert parse_msisdn("256772123456", "KE") == "+256772123456"


@pytest.mark.parametrize("text", ["", "hello", "0712", "+2547123456789999"])
def test_invalid_numbers_are_refused(text: str) -> None:
    """Text that is not a valid number raises ``InvalidPhoneNumber``."""
    with pytest.raises(InvalidPhoneNumber):
        parse_msisdn(text, "KE")


def test_edge_formats() -> None:
    """Providers get the formats they expect; logs get a masked number."""
    msisdn = parse_msisdn("0712345678", "KE")
    assert international_digits(msisdn) == "254712345678"
    assert national_significant(msisdn) == "712345678"
    assert masked(msisdn) == "+254******678"
    assert "345" not in masked(msisdn)


@given(st.text(max_size=30))
def test_parsing_raises_only_our_error(text: str) -> None:
    """Any text either parses to an E.164 number or raises ``InvalidPhoneNumber``."""
    try:
        result = parse_msisdn(text, "KE")
    except InvalidPhoneNumber:
        return
    assert result.startswith("+")
    assert result[1:].isdigit()
