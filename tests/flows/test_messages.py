import string
from collections.abc import Mapping

import pytest

from flows.engine import Context, Frame, Notice, Session, UssdEngine
from flows.journeys import build_screens
from flows.messages import CATALOGUES
from flows.ports import Language, MeterNumber, SavedMeter
from flows.sessions import MemorySessionStore
from flows.sms_commands import SMS_MAX_CHARS
from flows.testing import FakeCustomerServices
from gateway.phone import Msisdn

PHONE = Msisdn("+254711000001")
WORST_MINOR = "123456789"  # KES 1,234,567.89: far above any tariff's maximum
WORST_ARGS: Mapping[str, str] = {
    "meter": "1234567890123",
    "name": "N" * 24,
    "area": "A" * 24,
    "min": WORST_MINOR,
    "max": WORST_MINOR,
    "cur": "KES",
    "amount": WORST_MINOR,
    "units": "1234567",
    "energy": WORST_MINOR,
    "tax": WORST_MINOR,
    "fees": WORST_MINOR,
    "debt": WORST_MINOR,
    "owing": WORST_MINOR,
    "key": "ussd:x:1",
    "nickname": "W" * 12,
}
WORST_VALUES: Mapping[str, str] = {
    "meter": "1234567890123",
    "limit": "KES 1,234,567.89",
    "max": "5",
    "nickname": "W" * 12,
    "min": "KES 1,234,567.89",
    "amount": "KES 1,234,567.89",
    "units": "123456.7",
    "energy": "KES 1,234,567.89",
    "tax": "KES 1,234,567.89",
    "fees": "KES 1,234,567.89",
    "debt": "KES 1,234,567.89",
    "remaining": "KES 1,234,567.89",
    "name": "N" * 24,
    "area": "A" * 24,
    "code": "*384*12345*99#",
    "meters": "; ".join(f"{'W' * 12} 1234567890123" for _ in range(5)),
}
REFUSALS = [key for key in CATALOGUES[Language.EN] if key.startswith("refused_")]
TYPED_METER = ["meter_bad_format", "meter_bad_check", "meter_unknown"]
# The notices each screen can show above itself (re-prompts and confirmations).
NOTICES: Mapping[str, list[str]] = {
    "home": ["invalid_choice", "language_set"],
    "resume": ["invalid_choice"],
    "buy_pick": ["invalid_choice", "meter_unknown"],
    "buy_meter": TYPED_METER,
    "add_meter": TYPED_METER,
    "check_meter": TYPED_METER,
    "buy_amount": ["amount_bad", *REFUSALS],
    "buy_confirm": ["invalid_choice"],
    "token_pick": ["invalid_choice"],
    "meters": ["invalid_choice", "meters_full", "meter_saved", "meter_renamed", "meter_removed"],
    "meter_actions": ["invalid_choice", "meter_unknown"],
    "add_nickname": ["nickname_bad"],
    "check_result": [],
    "language": ["invalid_choice"],
    "help": ["invalid_choice"],
}
END_MESSAGES = [
    "paying",
    "cancelled",
    "token_sent",
    "token_none",
    "check_result",
    "error_generic",
    "error_busy",
    "error_bad_request",
    *REFUSALS,
]
SMS_MESSAGES = [
    "sms_help",
    "sms_paying",
    "sms_debt",
    "sms_amount_bad",
    "sms_amount_negative",
    "sms_meters",
    "sms_lang_usage",
    "language_set",
    "meters_empty",
    "token_none",
    "meter_bad_format",
    "meter_bad_check",
    "meter_unknown",
    *REFUSALS,
]


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


@pytest.mark.parametrize("language", [Language.SW, Language.FR])
def test_catalogues_have_the_same_keys_as_english(language: Language) -> None:
    """Every language defines exactly the English keys, in the same order."""
    assert list(CATALOGUES[language]) == list(CATALOGUES[Language.EN])


@pytest.mark.parametrize("language", [Language.SW, Language.FR])
def test_catalogues_have_the_same_placeholders_and_lines(language: Language) -> None:
    """Each message uses the same placeholders and the same number of lines in every language."""
    english = CATALOGUES[Language.EN]
    for key, template in CATALOGUES[language].items():
        assert _placeholders(template) == _placeholders(english[key]), key
        assert template.count("\n") == english[key].count("\n"), key


@pytest.mark.parametrize("language", list(Language))
def test_catalogues_are_plain_printable_ascii(language: Language) -> None:
    """No message holds a character that USSD or a one-segment GSM-7 SMS cannot carry."""
    allowed = set(string.ascii_letters + string.digits + " \n.,:;!?'()-*#<>/%+")
    for key, template in CATALOGUES[language].items():
        assert set(template) <= allowed | set("{}_"), key


def test_every_screen_has_its_notices_listed() -> None:
    """The length check below covers every screen the journeys define, and resume."""
    assert set(NOTICES) == {*build_screens(), "resume"}


def _engine(services: FakeCustomerServices) -> UssdEngine:
    return UssdEngine(services, MemorySessionStore(), build_screens())


@pytest.mark.parametrize("language", list(Language))
@pytest.mark.parametrize("screen", sorted(NOTICES))
async def test_every_screen_fits_one_ussd_page_in_every_language(
    language: Language, screen: str
) -> None:
    """Each screen, under each notice, with the longest values, fits 182 characters uncut."""
    services = FakeCustomerServices()
    services.saved[PHONE] = [
        SavedMeter(meter=MeterNumber(f"123456789012{i}"), nickname="W" * 12) for i in range(5)
    ]
    engine = _engine(services)
    for notice in [None, *NOTICES[screen]]:
        frame = Frame(screen, dict(WORST_ARGS))
        if notice is not None:
            frame.notice = Notice(notice, WORST_VALUES)
        session = Session("s", PHONE, language, [Frame("home"), frame])
        ctx = Context(
            services=services,
            phone=PHONE,
            session_id="s",
            service_code=WORST_VALUES["code"],
            language=language,
            hop=1,
        )
        body, ends, _ = await engine._render(session, ctx)
        reply = ("END " if ends else "CON ") + body
        assert len(reply) <= 182, (notice, reply)
        assert not reply.endswith(".."), (notice, reply)  # never cut as a last resort


@pytest.mark.parametrize("language", list(Language))
@pytest.mark.parametrize("key", END_MESSAGES)
def test_every_end_message_fits_one_ussd_page(language: Language, key: str) -> None:
    """Final USSD messages fit 182 characters with ``END `` and the longest values."""
    assert len("END " + CATALOGUES[language][key].format(**WORST_VALUES)) <= 182


@pytest.mark.parametrize("language", list(Language))
@pytest.mark.parametrize("key", SMS_MESSAGES)
def test_every_sms_reply_fits_two_segments(language: Language, key: str) -> None:
    """SMS replies fit two GSM-7 segments (306 characters) with the longest values."""
    assert len(CATALOGUES[language][key].format(**WORST_VALUES)) <= SMS_MAX_CHARS


@pytest.mark.parametrize("language", list(Language))
def test_the_paying_reply_with_its_debt_sentence_fits_two_segments(language: Language) -> None:
    """The BUY reply for a meter in debt (``sms_paying`` then ``sms_debt``) fits 306 characters."""
    catalogue = CATALOGUES[language]
    text = (
        catalogue["sms_paying"].format(**WORST_VALUES)
        + " "
        + catalogue["sms_debt"].format(**WORST_VALUES)
    )
    assert len(text) <= SMS_MAX_CHARS
