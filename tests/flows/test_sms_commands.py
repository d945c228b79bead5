import pytest
from hypothesis import given
from hypothesis import strategies as st

from flows.messages import text
from flows.ports import Language
from flows.sms_commands import Command, ParsedSms, SmsCommands, parse_sms
from flows.testing import FakeCustomerServices, make_meter_number
from flows.validation import parse_amount
from gateway.phone import Msisdn


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


async def test_buy_by_sms_for_a_meter_in_debt_says_what_goes_to_the_debt() -> None:
    """KES 500 at 20 % to a KES 300 debt: the reply says KES 100 goes to it, KES 200 remains."""
    services = FakeCustomerServices()
    meter = make_meter_number("3701234567")
    services.add_meter(meter)
    services.debts[meter] = (30000, 2000)
    outcome = await SmsCommands(services).handle(Msisdn("+254711000001"), f"BUY {meter} 500", "m1")
    assert outcome.reply is not None
    assert outcome.reply.endswith(
        " " + text(Language.EN, "sms_debt", debt="KES 100", remaining="KES 200")
    )
    assert "13.4 kWh" in outcome.reply


_SEPARATORS = st.sampled_from([" ", "  ", "*", "#", ",", "\t", " *", "* ", "- ", "--"])


@given(
    keyword=st.sampled_from(["BUY ", "buy ", "NUNUA ", "", "BUY*", "#"]),
    meter=st.sampled_from(["37012345676", "3701 2345 676", "3701-2345-676"]),
    before=_SEPARATORS,
    after=st.sampled_from(["", " ", "  "]),
    amount=st.integers(min_value=1, max_value=10**9).map(str)
    | st.decimals(min_value=1, max_value=10**6, places=2).map(str),
)
def test_a_negative_amount_is_never_bought_as_positive(
    keyword: str, meter: str, before: str, after: str, amount: str
) -> None:
    """``BUY <meter> -100`` (a minus after any separator) parses negative, never as KES 100."""
    parsed = parse_sms(f"{keyword}{meter}{before}-{after}{amount}")
    assert parsed.command is Command.BUY
    assert parsed.amount == f"-{amount}"
    assert parse_amount(parsed.amount, "KES") is None


@pytest.mark.parametrize(
    "text", ["BUY 37012345676 -100", "37012345676 -100", "BUY*37012345676*-100"]
)
def test_a_negative_amount_parses_negative(text: str) -> None:
    """The attack of issue 17: the ``-`` is a minus sign, not a separator."""
    assert parse_sms(text) == ParsedSms(command=Command.BUY, meter="37012345676", amount="-100")


def test_a_dash_between_numbers_still_separates() -> None:
    """``buy-37012345676-500`` (dashes as the only separators) stays a purchase of 500."""
    assert parse_sms("buy-37012345676-500").amount == "500"
