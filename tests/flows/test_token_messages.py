"""The token SMS: catalogue templates, sized by GSM-7 segments like the simulator bills them."""

from __future__ import annotations

import pytest

from flows.messages.gsm7 import is_gsm7, segment_count, sms_segments
from flows.messages.tokens import group_digits, token_message
from flows.ports import Language
from gateway.money import Money

TOKEN = "12345678901234567890"
KCTS = ("11112222333344445555", "66667777888899990000", "12121212121212121212")


def test_a_token_is_grouped_by_four() -> None:
    """20 digits become five groups of four."""
    assert group_digits(TOKEN) == "1234-5678-9012-3456-7890"


@pytest.mark.parametrize("language", [language.value for language in Language])
@pytest.mark.parametrize("kcts", [(), KCTS[:2], KCTS])
def test_the_longest_values_fit_two_gsm7_segments(language: str, kcts: tuple[str, ...]) -> None:
    """A 13-digit meter, a long receipt and the largest amount still fit two segments."""
    message = token_message(
        token=TOKEN,
        units=9_999_999,
        amount=Money(123_456_789, "KES"),
        meter="1234567890123",
        receipt="PNW4ATP2DZSBR",
        language=language,
        key_change_tokens=kcts,
    )
    assert is_gsm7(message)
    assert segment_count(message) <= 2
    assert group_digits(TOKEN) in message
    assert all(group_digits(kct) in message for kct in kcts)


def test_one_segment_when_the_full_text_fits() -> None:
    """The usual purchase gets the full English text in one segment."""
    message = token_message(
        token=TOKEN, units=34, amount=Money(10000, "KES"), meter="04000000010", receipt="R1"
    )
    assert message.startswith("Electricity token 1234-5678-9012-3456-7890. 3.4 kWh for ")
    assert sms_segments(message) == ("GSM-7", 1)


def test_an_unknown_language_falls_back_to_english() -> None:
    """``xx`` reads as English."""
    amount = Money(10000, "KES")

    def message(language: str) -> str:
        return token_message(
            token=TOKEN, units=34, amount=amount, meter="1", receipt="R", language=language
        )

    assert message("xx") == message("en")


def test_extension_characters_count_twice() -> None:
    """A receipt with GSM-7 extension characters takes more septets than characters."""
    assert sms_segments("[" * 80) == ("GSM-7", 1)
    assert sms_segments("[" * 81) == ("GSM-7", 2)


def test_an_absurd_receipt_is_refused() -> None:
    """Past two segments even tersely: a ValueError, never a third segment."""
    with pytest.raises(ValueError, match="exceeds two SMS segments"):
        token_message(
            token=TOKEN, units=34, amount=Money(10000, "KES"), meter="1", receipt="R" * 400
        )
