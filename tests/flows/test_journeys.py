"""Each journey end to end through the USSD route, in every language (given/when/then)."""

import asyncio
from collections.abc import Callable

import pytest

from flows.engine import UssdHop
from flows.messages import text
from flows.ports import Language, SavedMeter
from flows.testing import FakeCustomerServices, FakeToken, make_meter_number
from gateway.money import Money
from gateway.phone import Msisdn
from tests.flows.journey_world import METER, METER_13, PHONE, UNKNOWN_METER, UssdWorld

LANGUAGES = list(Language)


def _in(language: Language) -> Callable[..., str]:
    def t(key: str, **values: object) -> str:
        return text(language, key, **values)

    return t


def _speak(world: UssdWorld, language: Language) -> None:
    world.services.languages[Msisdn(PHONE)] = language


@pytest.mark.parametrize("language", LANGUAGES)
async def test_buy_with_a_typed_meter_ends_with_the_payment_prompt_notice(
    world: UssdWorld, language: Language
) -> None:
    """Typed meter → checks → masked name → amount → quote → Pay → END, prompt after reply."""
    _speak(world, language)
    t = _in(language)
    phone = world.phone()
    await phone.dial()
    phone.sees(t("home_title"), t("menu_buy"))
    await phone.answer(phone.option(t("menu_buy")))
    phone.sees(t("enter_meter"), t("nav_footer"))
    await phone.answer("123")
    phone.sees(t("meter_bad_format"), t("enter_meter"))
    wrong_digit = METER[:-1] + str((int(METER[-1]) + 1) % 10)
    await phone.answer(wrong_digit)
    phone.sees(t("meter_bad_check", meter=wrong_digit))
    await phone.answer(UNKNOWN_METER)
    phone.sees(t("meter_unknown", meter=UNKNOWN_METER))
    await phone.answer(METER)
    phone.sees(METER, "J*** O***", "Kibera", "KES 50", "KES 35,000")
    await phone.answer("20")
    phone.sees(t("refused_below_minimum", limit="KES 50"))
    await phone.answer("abc")
    phone.sees(t("amount_bad"))
    await phone.answer("500")
    # KES 500 - KES 10 fee = 490; 490 / 1.16 = 422.41 energy, 67.59 tax; 422.41 / 25 = 16.8 kWh
    phone.sees("KES 500", "16.8 kWh", "KES 422.41", "KES 67.59", "KES 10")
    await phone.answer(phone.option(t("confirm_pay")))
    phone.ends_with(t("paying", amount="KES 500"))
    await world.follow_ups.drain()
    (request,) = world.services.purchases.values()
    assert request.meter == METER
    assert request.amount == Money(50000, "KES")
    assert request.language is language
    assert world.services.prompts == [request.idempotency_key]


@pytest.mark.parametrize("language", LANGUAGES)
async def test_a_meter_in_debt_shows_the_recovery_on_the_confirm_screen(
    world: UssdWorld, language: Language
) -> None:
    """KES 500 at 20 % to a KES 300 debt: KES 100 recovered, KES 200 left, 13.4 kWh."""
    _speak(world, language)
    t = _in(language)
    world.services.debts[METER] = (30000, 2000)
    phone = world.phone()
    await phone.dial("1", METER, "500")
    # KES 500 - 100 debt - 10 fee = 390; 390 / 1.16 = 336.20 energy; / 25 = 13.4 kWh
    phone.sees("13.4 kWh", t("confirm_debt", debt="KES 100", remaining="KES 200"))
    await phone.answer(phone.option(t("confirm_pay")))
    phone.ends_with(t("paying", amount="KES 500"))


async def test_the_payment_prompt_starts_only_after_the_reply_is_out(world: UssdWorld) -> None:
    """The END reply reaches the aggregator while the payment request is still blocked."""
    world.services.prompt_gate = asyncio.Event()
    phone = world.phone()
    await phone.dial("1", METER, "500")
    await phone.answer("1")
    phone.ends_with("KES 500")
    assert world.services.prompts == []
    world.services.prompt_gate.set()
    await world.follow_ups.drain()
    assert world.services.prompts == world.services.prompts_started
    assert len(world.services.prompts) == 1


@pytest.mark.parametrize("language", LANGUAGES)
async def test_buy_with_a_saved_meter_skips_typing(world: UssdWorld, language: Language) -> None:
    """A saved meter is offered by nickname and leads straight to the amount."""
    _speak(world, language)
    world.services.saved[Msisdn(PHONE)] = [SavedMeter(meter=METER_13, nickname="Shop")]
    phone = world.phone()
    await phone.dial()
    await phone.answer(phone.option(text(language, "menu_buy")))
    phone.sees(text(language, "buy_which"), f"Shop {METER_13}", text(language, "other_meter"))
    await phone.answer(phone.option(f"Shop {METER_13}"))
    phone.sees("Westlands", "KES 100")
    await phone.answer("1000")
    await phone.answer(phone.option(text(language, "confirm_cancel")))
    phone.ends_with(text(language, "cancelled"))
    assert world.services.purchases == {}


@pytest.mark.parametrize("language", LANGUAGES)
async def test_last_token_is_resent_by_sms(world: UssdWorld, language: Language) -> None:
    """'Last token' resends the newest token and says so; without one it says there is none."""
    _speak(world, language)
    phone = world.phone()
    await phone.dial()
    await phone.answer(phone.option(text(language, "menu_token")))
    phone.ends_with(text(language, "token_none"))
    world.services.tokens.append(
        FakeToken(phone=Msisdn(PHONE), meter=METER, amount=Money(50000, "KES"), token="1" * 20)
    )
    await phone.dial()
    await phone.answer(phone.option(text(language, "menu_token")))
    phone.ends_with(text(language, "token_sent", meter=METER, amount="KES 500"))
    assert world.services.resent == [(PHONE, METER)]


@pytest.mark.parametrize("language", LANGUAGES)
async def test_last_token_asks_which_meter_when_several_are_saved(
    world: UssdWorld, language: Language
) -> None:
    """With two saved meters the customer picks whose token to resend."""
    _speak(world, language)
    world.services.saved[Msisdn(PHONE)] = [
        SavedMeter(meter=METER, nickname="Home"),
        SavedMeter(meter=METER_13, nickname="Shop"),
    ]
    for meter in (METER, METER_13):
        world.services.tokens.append(
            FakeToken(phone=Msisdn(PHONE), meter=meter, amount=Money(10000, "KES"), token="2" * 20)
        )
    phone = world.phone()
    await phone.dial()
    await phone.answer(phone.option(text(language, "menu_token")))
    phone.sees(text(language, "token_which"), text(language, "token_latest"))
    await phone.answer(phone.option(f"Home {METER}"))
    phone.ends_with(METER)
    assert world.services.resent == [(PHONE, METER)]


@pytest.mark.parametrize("language", LANGUAGES)
async def test_my_meters_saves_up_to_five_and_removes(world: UssdWorld, language: Language) -> None:
    """Add a meter with a nickname, see it listed, refuse a sixth, remove one."""
    _speak(world, language)
    t = _in(language)
    phone = world.phone()
    await phone.dial()
    await phone.answer(phone.option(t("menu_meters")))
    phone.sees(t("meters_empty"), t("meters_add"))
    await phone.answer(phone.option(t("meters_add")))
    await phone.answer(METER)
    phone.sees(t("enter_nickname", meter=METER))
    await phone.answer("way too long a name")
    phone.sees(t("nickname_bad"))
    await phone.answer("Home")
    phone.sees(t("meter_saved", nickname="Home"), f"Home {METER}")
    assert world.services.saved[Msisdn(PHONE)] == [SavedMeter(meter=METER, nickname="Home")]
    # Fill up to five, then a sixth is refused before typing anything.
    for i in range(4):
        world.services.saved[Msisdn(PHONE)].append(
            SavedMeter(meter=make_meter_number(f"555000000{i}"), nickname=f"M{i}")
        )
    await phone.answer("00")
    await phone.answer(phone.option(t("menu_meters")))
    while t("meters_add") not in phone.screen:
        await phone.answer("98")
    await phone.answer(phone.option(t("meters_add")))
    phone.sees(t("meters_full", max="5"))
    await phone.answer("00")
    await phone.answer(phone.option(t("menu_meters")))
    await phone.answer(phone.option(f"Home {METER}"))
    await phone.answer(phone.option(t("meter_remove")))
    phone.sees(t("meter_removed", nickname="Home"))
    assert METER not in [m.meter for m in world.services.saved[Msisdn(PHONE)]]


@pytest.mark.parametrize("language", LANGUAGES)
async def test_check_a_meter_shows_owner_area_and_limits(
    world: UssdWorld, language: Language
) -> None:
    """'Check a meter' ends with the masked name, area and purchase limits."""
    _speak(world, language)
    phone = world.phone()
    await phone.dial()
    await phone.answer(phone.option(text(language, "menu_check")))
    await phone.answer(METER_13)
    phone.ends_with(
        text(
            language,
            "check_result",
            meter=METER_13,
            name="A*** W***",
            area="Westlands",
            min="KES 100",
            max="KES 35,000",
        )
    )


@pytest.mark.parametrize("language", LANGUAGES)
async def test_language_choice_is_remembered(world: UssdWorld, language: Language) -> None:
    """Choosing a language switches the menu at once and on the next dial."""
    phone = world.phone()
    await phone.dial()
    await phone.answer(phone.option(text(Language.EN, "menu_language")))
    names = {Language.EN: "English", Language.SW: "Kiswahili", Language.FR: "Francais"}
    await phone.answer(phone.option(names[language]))
    phone.sees(text(language, "language_set"), text(language, "menu_buy"))
    assert world.services.languages[Msisdn(PHONE)] is language
    await phone.dial()
    phone.sees(text(language, "home_title"))


@pytest.mark.parametrize("language", LANGUAGES)
async def test_help_explains_and_zero_goes_back(world: UssdWorld, language: Language) -> None:
    """Help shows the dialled code and SMS commands; 0 returns to the menu."""
    _speak(world, language)
    phone = world.phone()
    await phone.dial()
    await phone.answer(phone.option(text(language, "menu_help")))
    phone.sees("*384*123#", "BUY", text(language, "nav_footer"))
    await phone.answer("0")
    phone.sees(text(language, "menu_buy"))


async def test_zero_goes_back_one_screen_and_double_zero_goes_home(world: UssdWorld) -> None:
    """From the confirm screen 0 returns to the amount, 00 to the main menu."""
    phone = world.phone()
    await phone.dial("1", METER, "500")
    phone.sees("Pay")
    await phone.answer("0")
    phone.sees("Enter amount")
    await phone.answer("00")
    phone.sees("Prepaid electricity", "1 Buy electricity")
    assert "0 Back" not in phone.screen  # home has nowhere to go back to


async def test_long_lists_page_with_more_only_when_there_is_more(
    world: UssdWorld, services: FakeCustomerServices
) -> None:
    """Five long nicknames page with '98 More'; the last page has none; 0 pages back."""
    services.saved[Msisdn(PHONE)] = [
        SavedMeter(meter=make_meter_number(f"12345678901{i}"), nickname=f"Nickname {i}xx")
        for i in range(5)
    ]
    phone = world.phone()
    await phone.dial()
    await phone.answer("1")
    first = phone.screen
    phone.sees("98 More")
    await phone.answer("98")
    second = phone.screen
    assert "98 More" not in second
    assert "Another meter" in second
    shown = [line for line in (first + "\n" + second).splitlines() if "Nickname" in line]
    assert len(shown) == 5  # every option on exactly one page, none split
    await phone.answer("0")
    assert phone.screen == first


async def test_a_wrong_choice_re_prompts_the_same_screen(world: UssdWorld) -> None:
    """A number not on the menu shows the menu again with a short reason."""
    phone = world.phone()
    await phone.dial()
    await phone.answer("7")
    phone.sees("Choose a number from the list.", "1 Buy electricity")


async def test_redial_after_a_timeout_offers_to_continue(world: UssdWorld) -> None:
    """A session lost mid-way can be resumed on redial within the window; 1 resumes."""
    phone = world.phone()
    await phone.dial("1", METER)
    lost = phone.screen
    world.clock.advance(60)
    await phone.dial()
    phone.sees("Continue where you left off?", "1 Yes", "2 No")
    await phone.answer("1")
    assert phone.screen == lost
    await phone.answer("500")
    phone.sees("16.8 kWh")


async def test_declining_to_continue_goes_home_and_is_not_offered_again(world: UssdWorld) -> None:
    """'2 No' shows the menu; the next redial starts fresh."""
    phone = world.phone()
    await phone.dial("1", METER)
    await phone.dial()
    await phone.answer("2")
    phone.sees("1 Buy electricity")
    await phone.dial()
    phone.sees("1 Buy electricity")


async def test_no_resume_after_the_window_or_after_an_end(world: UssdWorld) -> None:
    """Past the window, or after a finished session, a redial shows the menu."""
    phone = world.phone()
    await phone.dial("1", METER)
    world.clock.advance(121)
    await phone.dial()
    phone.sees("1 Buy electricity")
    await phone.dial("4", METER)
    phone.ends_with(METER)
    await phone.dial()
    phone.sees("1 Buy electricity")


async def test_completed_event_stops_resume(world: UssdWorld) -> None:
    """AT's end-of-session notification with Success marks the session finished."""
    phone = world.phone()
    await phone.dial("1", METER)
    assert await world.session_event(phone.session_id, "Success") == 200
    await phone.dial()
    phone.sees("1 Buy electricity")


async def test_incomplete_event_keeps_resume(world: UssdWorld) -> None:
    """AT's Incomplete notification (customer timed out) leaves the session resumable."""
    phone = world.phone()
    await phone.dial("1", METER)
    assert await world.session_event(phone.session_id, "Incomplete") == 200
    await phone.dial()
    phone.sees("Continue where you left off?")


async def test_a_retried_hop_gets_the_same_reply_and_buys_once(world: UssdWorld) -> None:
    """AT resending the Pay hop gets the same END and no second purchase."""
    phone = world.phone()
    await phone.dial("1", METER, "500")
    first = await phone.answer("1")
    again = await phone.resend()
    assert again == first
    await world.follow_ups.drain()
    assert len(world.services.purchases) == 1
    assert len(world.services.prompts) == 1


async def test_prefilled_dial_string_jumps_to_the_screen(world: UssdWorld) -> None:
    """Dialling *384*123*4# (text '4' on the first hop) opens 'Check a meter' directly."""
    phone = world.phone()
    await phone.dial("4")
    phone.sees("Enter the meter number:")


async def test_dropping_on_the_resume_prompt_still_resumes_the_original(world: UssdWorld) -> None:
    """A customer who loses the line on 'Continue?' is offered the original session again."""
    phone = world.phone()
    await phone.dial("1", METER)
    lost = phone.screen
    await phone.dial()
    phone.sees("Continue where you left off?")
    await phone.dial()
    phone.sees("Continue where you left off?")
    await phone.answer("1")
    assert phone.screen == lost


async def test_last_input_only_dialects_drive_the_same_journey(world: UssdWorld) -> None:
    """Aggregators that send only the newest answer (Hubtel, Nalo) reach the same screens."""
    engine = world.engine
    replies = []
    for answer in ["", "1", METER, "500", "1"]:
        hop = UssdHop(
            session_id="hubtel:1",
            phone=Msisdn(PHONE),
            service_code="*713*1#",
            text=answer,
            cumulative=False,
        )
        replies.append(await engine.handle(hop))
    assert "Enter the meter number" in replies[1].text
    assert "Enter amount" in replies[2].text
    assert "16.8 kWh" in replies[3].text
    assert replies[-1].ends
    assert replies[-1].text.startswith("You will get a payment prompt for KES 500")
    assert replies[-1].follow_up is not None


async def test_a_session_saved_with_a_screen_that_no_longer_exists_restarts_at_home(
    world: UssdWorld,
) -> None:
    """State written by an older release with other screens sends the customer home, not to 500."""
    phone = world.phone()
    await phone.dial("1")
    store = world.engine._store
    key = f"ussd:s:at:{phone.session_id}"
    raw = await store.get(key)
    assert raw is not None
    await store.put(key, raw.replace('"buy_meter"', '"retired_screen"'), 60)
    await phone.answer("5")  # read as an answer to the home menu: 5 Language
    phone.sees("Choose a language:")
