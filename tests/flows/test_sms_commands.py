import pytest
from hypothesis import given
from hypothesis import strategies as st

from flows.sms_commands import Command, ParsedSms, parse_sms


@pytest.mark.parametrize(
    "text",
    [
        "BUY 37012345676 500",
        "buy 37012345676 500",
        "  Buy   37012345676    500  ",
        "BUY*37012345676*500#",
        "buy-37012345676-500",
        "BUY 3701 2345 676 500",
        "37012345676 500",
        "37012345676*500",
        "#37012345676#500#",
    ],
)
def test_buy_is_understood_however_it_is_typed(text: str) -> None:
    """Case, extra spaces, * # - separators and a grouped meter number all parse alike."""
    assert parse_sms(text) == ParsedSms(command=Command.BUY, meter="37012345676", amount="500")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("TOKEN", ParsedSms(command=Command.TOKEN)),
        ("token 37012345676", ParsedSms(command=Command.TOKEN, meter="37012345676")),
        ("Meters", ParsedSms(command=Command.METERS)),
        ("lang SW", ParsedSms(command=Command.LANG, language="sw")),
        ("LANG", ParsedSms(command=Command.LANG, language=None)),
        ("help", ParsedSms(command=Command.HELP)),
        ("BUY", ParsedSms(command=Command.BUY)),
        ("hello", ParsedSms(command=Command.HELP)),
        ("", ParsedSms(command=Command.HELP)),
        ("500", ParsedSms(command=Command.HELP)),
    ],
)
def test_other_commands_parse(text: str, expected: ParsedSms) -> None:
    """TOKEN [meter], METERS, LANG <code>, HELP and the fallbacks parse as documented."""
    assert parse_sms(text) == expected


@given(st.text(max_size=200))
def test_parse_never_raises(text: str) -> None:
    """Any SMS body parses to some command; a BUY carries both parts or neither."""
    parsed = parse_sms(text)
    assert isinstance(parsed.command, Command)
    assert (parsed.meter is None) == (parsed.amount is None) or parsed.command is Command.TOKEN
