"""SMS commands: a tiny grammar, case-insensitive and tolerant of how people type on phones.

```
BUY <meter> <amount>      buy (a payment prompt follows; the token comes by SMS)
<meter> <amount>          the same, without the keyword
TOKEN [meter]             send the last token again
METERS                    list saved meters
LANG <en|sw|fr>           choose the language
HELP                      the help text; so does anything not understood
```

Words may be separated by spaces, ``*``, ``#``, ``-`` or ``,``; a meter typed in groups
(``3701 2345 678``) is joined back together. Every reply fits in two GSM-7 segments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import structlog

from flows.engine import format_money, format_units
from flows.journeys import refusal_notice
from flows.messages import text as message
from flows.ports import (
    Channel,
    CustomerServices,
    FollowUp,
    Language,
    MeterNumber,
    PurchaseRequest,
    Quote,
    Refused,
)
from flows.validation import MeterProblem, parse_amount, parse_meter
from gateway.values.money import Money
from gateway.values.phone import Msisdn

log = structlog.get_logger()

SMS_MAX_CHARS: Final = 306  # two concatenated GSM-7 segments (2 x 153)
_SPLIT: Final = re.compile(r"[\s*#,\-]+")
_SPLIT_KEEP: Final = re.compile(r"([\s*#,\-]+)")


class Command(StrEnum):
    """What an SMS asks for."""

    BUY = "buy"
    TOKEN = "token"  # noqa: S105 - a command word, not a secret
    METERS = "meters"
    LANG = "lang"
    HELP = "help"


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedSms:
    """A parsed SMS: the command and its raw arguments (validated later, with customer text)."""

    command: Command
    meter: str | None = None
    amount: str | None = None
    language: str | None = None


_KEYWORDS: Final = {
    "BUY": Command.BUY,
    "NUNUA": Command.BUY,
    "ACHAT": Command.BUY,
    "TOKEN": Command.TOKEN,
    "TOKENI": Command.TOKEN,
    "CODE": Command.TOKEN,
    "METERS": Command.METERS,
    "METER": Command.METERS,
    "MITA": Command.METERS,
    "LANG": Command.LANG,
    "LUGHA": Command.LANG,
    "LANGUE": Command.LANG,
    "HELP": Command.HELP,
    "MSAADA": Command.HELP,
    "AIDE": Command.HELP,
}


def _is_number(word: str) -> bool:
    return word.isascii() and word.replace(".", "", 1).isdigit()


def _minus_before_last(text: str) -> bool:
    """Whether the last word is written negative (``BUY 37012345676 -100``).

    A single ``-`` between two numbers separates them (``buy-37012345676-500``); a ``-`` after a
    space, ``*``, ``#`` or another dash (``… -100``, ``… - 100``, ``…*-100``) is a minus sign.
    """
    parts = _SPLIT_KEEP.split(text.strip())
    if len(parts) < 3 or not parts[-1]:
        return False
    separator = parts[-2]
    return "-" in separator and separator != "-"


def parse_sms(text: str) -> ParsedSms:  # noqa: PLR0911 - one return per grammar rule
    """Parse an SMS body; anything not understood is ``HELP``. Never raises.

    A negative amount (``BUY 37012345676 -100``) is kept negative (``amount="-100"``), so the
    purchase is refused with ``sms_amount_negative`` instead of the minus being read as a
    separator.
    """
    words = [w for w in _SPLIT.split(text.strip().upper()) if w]
    if not words:
        return ParsedSms(command=Command.HELP)
    command = _KEYWORDS.get(words[0])
    rest = words[1:] if command is not None else words
    if command is None and not _is_number(words[0]):
        return ParsedSms(command=Command.HELP)
    if command in {None, Command.BUY}:
        if len(rest) >= 2 and all(_is_number(w) for w in rest):
            sign = "-" if _minus_before_last(text) else ""
            return ParsedSms(command=Command.BUY, meter="".join(rest[:-1]), amount=sign + rest[-1])
        return ParsedSms(command=Command.BUY if command else Command.HELP)
    if command is Command.TOKEN:
        meter = "".join(rest) if rest and all(_is_number(w) for w in rest) else None
        return ParsedSms(command=Command.TOKEN, meter=meter)
    if command is Command.LANG:
        return ParsedSms(command=Command.LANG, language=rest[0].lower() if rest else None)
    return ParsedSms(command=command)


@dataclass(frozen=True, slots=True, kw_only=True)
class SmsOutcome:
    """What to do after an SMS.

    ``reply`` is the text to send (None when the answer is the token SMS itself);
    ``follow_up`` (the payment prompt) runs after the reply is queued.
    """

    reply: str | None
    language: Language
    follow_up: FollowUp | None = None


class SmsCommands:
    """Answers SMS commands through :class:`flows.ports.CustomerServices`."""

    def __init__(
        self, services: CustomerServices, *, default_language: Language = Language.EN
    ) -> None:
        self._services = services
        self._default = default_language

    @property
    def services(self) -> CustomerServices:
        """The services the commands use (the web layer sends replies through them)."""
        return self._services

    async def handle(  # noqa: PLR0911 - one return per command
        self, phone: Msisdn, text: str, message_id: str
    ) -> SmsOutcome:
        """Answer one inbound SMS.

        ``message_id`` (the aggregator's id) keys the purchase, so a redelivered SMS never
        starts a second purchase.
        """
        language = await self._services.language(phone) or self._default
        parsed = parse_sms(text)
        match parsed.command:
            case Command.BUY:
                return await self._buy(phone, parsed, message_id, language)
            case Command.TOKEN:
                return await self._token(phone, parsed, language)
            case Command.METERS:
                saved = await self._services.saved_meters(phone)
                if not saved:
                    return SmsOutcome(reply=message(language, "meters_empty"), language=language)
                listing = "; ".join(f"{m.nickname} {m.meter}" for m in saved)
                return SmsOutcome(
                    reply=message(language, "sms_meters", meters=listing), language=language
                )
            case Command.LANG:
                try:
                    chosen = Language(parsed.language or "")
                except ValueError:
                    return SmsOutcome(reply=message(language, "sms_lang_usage"), language=language)
                await self._services.set_language(phone, chosen)
                return SmsOutcome(reply=message(chosen, "language_set"), language=chosen)
            case Command.HELP:
                return SmsOutcome(reply=message(language, "sms_help"), language=language)

    async def _buy(  # noqa: PLR0911 - one return per refusal
        self, phone: Msisdn, parsed: ParsedSms, message_id: str, language: Language
    ) -> SmsOutcome:
        def reply(key: str, **values: object) -> SmsOutcome:
            return SmsOutcome(reply=message(language, key, **values), language=language)

        if parsed.meter is None or parsed.amount is None:
            return reply("sms_amount_bad")
        if parsed.amount.startswith("-"):
            log.warning("sms_negative_amount_refused", amount=parsed.amount)
            return reply("sms_amount_negative")
        meter = parse_meter(parsed.meter)
        if meter is MeterProblem.FORMAT:
            return reply("meter_bad_format")
        if meter is MeterProblem.CHECK_DIGIT:
            return reply("meter_bad_check", meter=parsed.meter[:13])
        meter = MeterNumber(meter)
        info = await self._services.lookup_meter(meter)
        if info is None:
            return reply("meter_unknown", meter=meter)
        amount = parse_amount(parsed.amount, info.currency)
        if amount is None:
            return reply("sms_amount_bad")
        quote = await self._services.quote(meter, amount)
        if isinstance(quote, Refused):
            notice = refusal_notice(quote)
            return reply(notice.key, **notice.values)
        outcome = await self._services.start_purchase(
            PurchaseRequest(
                phone=phone,
                meter=meter,
                amount=amount,
                channel=Channel.SMS,
                idempotency_key=f"sms:{message_id}",
                language=language,
            )
        )
        if isinstance(outcome, Refused):
            notice = refusal_notice(outcome)
            return reply(notice.key, **notice.values)
        return SmsOutcome(
            reply=_paying(language, meter, quote, outcome.amount),
            language=language,
            follow_up=outcome.follow_up,
        )

    async def _token(self, phone: Msisdn, parsed: ParsedSms, language: Language) -> SmsOutcome:
        meter: MeterNumber | None = None
        if parsed.meter is not None:
            checked = parse_meter(parsed.meter)
            if isinstance(checked, MeterProblem):
                return SmsOutcome(reply=message(language, "meter_bad_format"), language=language)
            meter = MeterNumber(checked)
        resent = await self._services.resend_last_token(phone, meter)
        if resent is None:
            return SmsOutcome(reply=message(language, "token_none"), language=language)
        return SmsOutcome(reply=None, language=language)  # the token SMS is the answer


def _paying(language: Language, meter: MeterNumber, quote: Quote, amount: Money) -> str:
    """The reply to a purchase that was started: the amount, the units and any debt recovered."""
    text = message(
        language,
        "sms_paying",
        amount=format_money(amount),
        meter=meter,
        units=format_units(quote.units_tenth_kwh),
    )
    if quote.debt_recovered is not None and quote.debt_remaining is not None:
        text += " " + message(
            language,
            "sms_debt",
            debt=format_money(quote.debt_recovered),
            remaining=format_money(quote.debt_remaining),
        )
    return text
