"""The customer journeys on USSD.

Buy electricity, last token, my meters, check a meter, language, help.

Screens keep no state of their own: what a journey has learnt so far (the meter, its limits,
the amount) travels in the frame's ``args`` as strings, so a session can be stored, resumed and
served by any worker.

```
home ─1─ buy_pick (saved meters) ─┬─ buy_meter (typed) ─ buy_amount ─ buy_confirm ─ END paying
                                  └────────────────────┘
     ─2─ token_pick (2+ saved meters) ─ END token_sent | token_none
     ─3─ meters ─┬─ meter_actions ─ buy_amount … | removed
                 └─ add_meter ─ add_nickname ─ saved
     ─4─ check_meter ─ END check_result
     ─5─ language ─ home (in the new language)
     ─6─ help
```
"""

from __future__ import annotations

from collections.abc import Mapping

from flows.engine import (
    HOME_SCREEN,
    Back,
    Context,
    Finish,
    Home,
    Notice,
    Option,
    Push,
    Screen,
    Stay,
    Step,
    View,
    format_money,
    format_units,
)
from flows.ports import (
    MAX_SAVED_METERS,
    Channel,
    Language,
    MeterInfo,
    MeterNumber,
    PurchaseRequest,
    Quote,
    Refused,
    SaveOutcome,
)
from flows.validation import MeterProblem, parse_amount, parse_meter, parse_nickname
from gateway.values.money import Money

_NAME_MAX = 24  # masked names and areas are cut to keep every screen within one USSD page
_LANGUAGE_NAMES = {Language.EN: "English", Language.SW: "Kiswahili", Language.FR: "Francais"}
OTHER = "other"


def _meter_args(info: MeterInfo) -> dict[str, str]:
    return {
        "meter": info.meter,
        "name": info.masked_name[:_NAME_MAX],
        "area": info.area[:_NAME_MAX],
        "min": str(info.min_purchase.amount_minor),
        "max": str(info.max_purchase.amount_minor),
        "cur": info.currency,
    }


def _money(args: Mapping[str, str], key: str) -> Money:
    return Money(int(args[key]), args["cur"])


def refusal_notice(refused: Refused) -> Notice:
    """The customer text key (and values) for a refusal."""
    limit = format_money(refused.limit) if refused.limit is not None else ""
    return Notice(f"refused_{refused.reason.value}", {"limit": limit})


async def _typed_meter(ctx: Context, answer: str) -> MeterInfo | Notice:
    """Validate and look up a typed meter number; a notice says what is wrong."""
    parsed = parse_meter(answer)
    if parsed is MeterProblem.FORMAT:
        return Notice("meter_bad_format")
    if parsed is MeterProblem.CHECK_DIGIT:
        return Notice("meter_bad_check", {"meter": answer.strip()[:13]})
    meter = MeterNumber(parsed)
    info = await ctx.services.lookup_meter(meter)
    if info is None:
        return Notice("meter_unknown", {"meter": meter})
    return info


class HomeScreen:
    """The main menu."""

    async def view(self, ctx: Context, args: Mapping[str, str]) -> View:  # noqa: ARG002
        """The six journeys."""
        return View(
            body=ctx.t("home_title"),
            options=(
                Option(ctx.t("menu_buy"), "buy"),
                Option(ctx.t("menu_token"), "token"),
                Option(ctx.t("menu_meters"), "meters"),
                Option(ctx.t("menu_check"), "check"),
                Option(ctx.t("menu_language"), "language"),
                Option(ctx.t("menu_help"), "help"),
            ),
        )

    async def answer(self, ctx: Context, args: Mapping[str, str], answer: str) -> Step:  # noqa: ARG002
        """Open the chosen journey; buying skips the meter list when none is saved."""
        if answer == "buy":
            saved = await ctx.services.saved_meters(ctx.phone)
            return Push("buy_pick" if saved else "buy_meter")
        if answer == "token":
            saved = await ctx.services.saved_meters(ctx.phone)
            if len(saved) >= 2:
                return Push("token_pick")
            return await _resend(ctx, None)
        screen = {
            "meters": "meters",
            "check": "check_meter",
            "language": "language",
            "help": "help",
        }[answer]
        return Push(screen)


class BuyPickScreen:
    """Choose a saved meter or type another."""

    async def view(self, ctx: Context, args: Mapping[str, str]) -> View:  # noqa: ARG002
        """Saved meters by nickname, then 'Another meter'."""
        saved = await ctx.services.saved_meters(ctx.phone)
        options = [Option(f"{m.nickname} {m.meter}", m.meter) for m in saved]
        options.append(Option(ctx.t("other_meter"), OTHER))
        return View(body=ctx.t("buy_which"), options=tuple(options))

    async def answer(self, ctx: Context, args: Mapping[str, str], answer: str) -> Step:  # noqa: ARG002
        """Type a meter, or look the saved one up and ask for the amount."""
        if answer == OTHER:
            return Push("buy_meter")
        info = await ctx.services.lookup_meter(MeterNumber(answer))
        if info is None:
            return Stay(Notice("meter_unknown", {"meter": answer}))
        return Push("buy_amount", _meter_args(info))


class EnterMeterScreen:
    """Type a meter number; validated, looked up, then handed to ``next_screen``."""

    def __init__(self, next_screen: str) -> None:
        self._next = next_screen

    async def view(self, ctx: Context, args: Mapping[str, str]) -> View:  # noqa: ARG002
        """Ask for the number."""
        return View(body=ctx.t("enter_meter"))

    async def answer(self, ctx: Context, args: Mapping[str, str], answer: str) -> Step:  # noqa: ARG002
        """Re-prompt with the reason when the number is malformed, fails its check or is unknown."""
        found = await _typed_meter(ctx, answer)
        if isinstance(found, Notice):
            return Stay(found)
        return Push(self._next, _meter_args(found))


class AmountScreen:
    """Show the meter's masked owner and area; ask for an amount within the tariff's limits."""

    async def view(self, ctx: Context, args: Mapping[str, str]) -> View:
        """Meter card, then the prompt with min and max."""
        card = ctx.t("meter_card", meter=args["meter"], name=args["name"], area=args["area"])
        prompt = ctx.t(
            "enter_amount",
            min=format_money(_money(args, "min")),
            max=format_money(_money(args, "max")),
        )
        return View(context=card, body=prompt)

    async def answer(self, ctx: Context, args: Mapping[str, str], answer: str) -> Step:
        """Check the amount locally, then ask for a quote; refusals re-prompt."""
        amount = parse_amount(answer, args["cur"])
        if amount is None:
            return Stay(Notice("amount_bad"))
        low, high = _money(args, "min"), _money(args, "max")
        if amount < low:
            return Stay(Notice("refused_below_minimum", {"limit": format_money(low)}))
        if amount > high:
            return Stay(Notice("refused_above_maximum", {"limit": format_money(high)}))
        quote = await ctx.services.quote(MeterNumber(args["meter"]), amount)
        if isinstance(quote, Refused):
            return Stay(refusal_notice(quote))
        return Push(
            "buy_confirm",
            {
                **args,
                "amount": str(amount.amount_minor),
                "units": str(quote.units_tenth_kwh),
                "energy": str(quote.energy.amount_minor),
                "tax": str(quote.tax.amount_minor),
                "fees": str(quote.fees.amount_minor),
                **_debt_args(quote),
                # minted once: a resumed confirm screen reuses it, so a purchase is never doubled
                "key": f"ussd:{ctx.session_id}:{ctx.hop}",
            },
        )


def _debt_args(quote: Quote) -> dict[str, str]:
    """The confirm screen's debt figures (none when the meter owes nothing)."""
    if quote.debt_recovered is None or quote.debt_remaining is None:
        return {}
    return {
        "debt": str(quote.debt_recovered.amount_minor),
        "owing": str(quote.debt_remaining.amount_minor),
    }


class ConfirmScreen:
    """Show the quote; Pay starts the purchase and ends the session before the payment prompt."""

    async def view(self, ctx: Context, args: Mapping[str, str]) -> View:
        """Amount, meter, units and the price breakdown; Pay or Cancel."""
        body = ctx.t(
            "confirm_title",
            amount=format_money(_money(args, "amount")),
            meter=args["meter"],
            units=format_units(int(args["units"])),
        )
        if "debt" in args:  # shown in the body: never dropped for space, unlike the detail
            body += "\n" + ctx.t(
                "confirm_debt",
                debt=format_money(_money(args, "debt")),
                remaining=format_money(_money(args, "owing")),
            )
        detail = ctx.t(
            "confirm_breakdown",
            energy=format_money(_money(args, "energy")),
            tax=format_money(_money(args, "tax")),
            fees=format_money(_money(args, "fees")),
        )
        return View(
            body=body,
            detail=detail,
            options=(Option(ctx.t("confirm_pay"), "pay"), Option(ctx.t("confirm_cancel"), "no")),
        )

    async def answer(self, ctx: Context, args: Mapping[str, str], answer: str) -> Step:
        """Start the purchase (payment prompt follows the END reply) or cancel."""
        if answer != "pay":
            return Finish(ctx.t("cancelled"))
        amount = _money(args, "amount")
        outcome = await ctx.services.start_purchase(
            PurchaseRequest(
                phone=ctx.phone,
                meter=MeterNumber(args["meter"]),
                amount=amount,
                channel=Channel.USSD,
                idempotency_key=args["key"],
                language=ctx.language,
            )
        )
        if isinstance(outcome, Refused):
            notice = refusal_notice(outcome)
            return Finish(ctx.t(notice.key, **notice.values))
        return Finish(
            ctx.t("paying", amount=format_money(outcome.amount)), follow_up=outcome.follow_up
        )


async def _resend(ctx: Context, meter: MeterNumber | None) -> Finish:
    resent = await ctx.services.resend_last_token(ctx.phone, meter)
    if resent is None:
        return Finish(ctx.t("token_none"))
    return Finish(ctx.t("token_sent", meter=resent.meter, amount=format_money(resent.amount)))


class TokenPickScreen:
    """With two or more saved meters: resend the latest token, or the one for a chosen meter."""

    async def view(self, ctx: Context, args: Mapping[str, str]) -> View:  # noqa: ARG002
        """'Latest purchase', then each saved meter."""
        saved = await ctx.services.saved_meters(ctx.phone)
        options = [Option(ctx.t("token_latest"), "latest")]
        options += [Option(f"{m.nickname} {m.meter}", m.meter) for m in saved]
        return View(body=ctx.t("token_which"), options=tuple(options))

    async def answer(self, ctx: Context, args: Mapping[str, str], answer: str) -> Step:  # noqa: ARG002
        """Resend and end the session."""
        return await _resend(ctx, None if answer == "latest" else MeterNumber(answer))


class MetersScreen:
    """The saved meters, and 'Add a meter'."""

    async def view(self, ctx: Context, args: Mapping[str, str]) -> View:  # noqa: ARG002
        """Each saved meter by nickname; 'Add a meter' always (a full list says why not)."""
        saved = await ctx.services.saved_meters(ctx.phone)
        title = ctx.t("meters_title") if saved else ctx.t("meters_empty")
        options = [Option(f"{m.nickname} {m.meter}", f"{m.meter}|{m.nickname}") for m in saved]
        options.append(Option(ctx.t("meters_add"), OTHER))
        return View(body=title, options=tuple(options))

    async def answer(self, ctx: Context, args: Mapping[str, str], answer: str) -> Step:  # noqa: ARG002
        """Open a meter's actions, or start adding one (refused when full)."""
        if answer == OTHER:
            saved = await ctx.services.saved_meters(ctx.phone)
            if len(saved) >= MAX_SAVED_METERS:
                return Stay(Notice("meters_full", {"max": str(MAX_SAVED_METERS)}))
            return Push("add_meter")
        meter, _, nickname = answer.partition("|")
        return Push("meter_actions", {"meter": meter, "nickname": nickname})


class MeterActionsScreen:
    """Buy for a saved meter, or remove it."""

    async def view(self, ctx: Context, args: Mapping[str, str]) -> View:
        """Nickname and number; Buy or Remove."""
        return View(
            body=ctx.t("meter_actions", nickname=args["nickname"], meter=args["meter"]),
            options=(Option(ctx.t("meter_buy"), "buy"), Option(ctx.t("meter_remove"), "remove")),
        )

    async def answer(self, ctx: Context, args: Mapping[str, str], answer: str) -> Step:
        """Go to the amount screen, or remove and return to the list."""
        meter = MeterNumber(args["meter"])
        if answer == "remove":
            await ctx.services.remove_meter(ctx.phone, meter)
            return Back(notice=Notice("meter_removed", {"nickname": args["nickname"]}))
        info = await ctx.services.lookup_meter(meter)
        if info is None:
            return Stay(Notice("meter_unknown", {"meter": meter}))
        return Push("buy_amount", _meter_args(info))


class NicknameScreen:
    """Name a meter being saved; back to the list with a confirmation."""

    async def view(self, ctx: Context, args: Mapping[str, str]) -> View:
        """Ask for a nickname of up to 12 characters."""
        return View(body=ctx.t("enter_nickname", meter=args["meter"]))

    async def answer(self, ctx: Context, args: Mapping[str, str], answer: str) -> Step:
        """Save, then show the list again (two screens back) with what happened."""
        nickname = parse_nickname(answer)
        if nickname is None:
            return Stay(Notice("nickname_bad"))
        outcome = await ctx.services.save_meter(ctx.phone, MeterNumber(args["meter"]), nickname)
        if outcome is SaveOutcome.FULL:
            notice = Notice("meters_full", {"max": str(MAX_SAVED_METERS)})
        elif outcome is SaveOutcome.RENAMED:
            notice = Notice("meter_renamed", {"nickname": nickname})
        else:
            notice = Notice("meter_saved", {"nickname": nickname})
        return Back(frames=2, notice=notice)


class CheckResultScreen:
    """The END screen of 'Check a meter'."""

    async def view(self, ctx: Context, args: Mapping[str, str]) -> View:
        """Masked owner, area and the purchase limits."""
        return View(
            body=ctx.t(
                "check_result",
                meter=args["meter"],
                name=args["name"],
                area=args["area"],
                min=format_money(_money(args, "min")),
                max=format_money(_money(args, "max")),
            ),
            end=True,
        )

    async def answer(self, ctx: Context, args: Mapping[str, str], answer: str) -> Step:  # noqa: ARG002
        """Never called: the session has ended."""
        return Home()


class LanguageScreen:
    """Choose English, Kiswahili or French; the choice is remembered for the phone."""

    async def view(self, ctx: Context, args: Mapping[str, str]) -> View:  # noqa: ARG002
        """The three languages, each named in itself."""
        return View(
            body=ctx.t("language_title"),
            options=tuple(Option(name, lang.value) for lang, name in _LANGUAGE_NAMES.items()),
        )

    async def answer(self, ctx: Context, args: Mapping[str, str], answer: str) -> Step:  # noqa: ARG002
        """Remember it and go home, speaking the new language."""
        language = Language(answer)
        await ctx.services.set_language(ctx.phone, language)
        ctx.language = language
        return Home(Notice("language_set"))


class HelpScreen:
    """How to buy by USSD and SMS; 0 and 00 lead back."""

    async def view(self, ctx: Context, args: Mapping[str, str]) -> View:  # noqa: ARG002
        """The help text with the code that was dialled."""
        return View(body=ctx.t("help_text", code=ctx.service_code[:20]))

    async def answer(self, ctx: Context, args: Mapping[str, str], answer: str) -> Step:  # noqa: ARG002
        """Anything but 0/00 only shows the help again."""
        return Stay(Notice("invalid_choice"))


def build_screens() -> dict[str, Screen]:
    """Every screen of the journeys, by name (``home`` first)."""
    return {
        HOME_SCREEN: HomeScreen(),
        "buy_pick": BuyPickScreen(),
        "buy_meter": EnterMeterScreen("buy_amount"),
        "buy_amount": AmountScreen(),
        "buy_confirm": ConfirmScreen(),
        "token_pick": TokenPickScreen(),
        "meters": MetersScreen(),
        "meter_actions": MeterActionsScreen(),
        "add_meter": EnterMeterScreen("add_nickname"),
        "add_nickname": NicknameScreen(),
        "check_meter": EnterMeterScreen("check_result"),
        "check_result": CheckResultScreen(),
        "language": LanguageScreen(),
        "help": HelpScreen(),
    }
