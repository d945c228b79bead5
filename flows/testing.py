"""An in-memory :class:`flows.ports.CustomerServices` for tests, the bench and demos.

It behaves like the real adapter in what flows can observe (limits, idempotency keys, at most
five saved meters, resend without vending) and records what it was asked, so tests can assert
that a payment prompt was requested only after the reply.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from flows.ports import (
    MAX_SAVED_METERS,
    Language,
    MeterInfo,
    MeterNumber,
    PurchaseRequest,
    PurchaseStarted,
    Quote,
    RefusalReason,
    Refused,
    SavedMeter,
    SaveOutcome,
    TokenResent,
)
from flows.validation import luhn_check_digit
from gateway.values.money import Money
from gateway.values.phone import Msisdn


def make_meter_number(prefix: str) -> MeterNumber:
    """A valid meter number: ``prefix`` (10 or 12 digits) plus its Luhn check digit."""
    return MeterNumber(prefix + str(luhn_check_digit(prefix)))


@dataclass(frozen=True, slots=True, kw_only=True)
class FakeToken:
    """A token the fake 'vended' earlier, for resend tests."""

    phone: Msisdn
    meter: MeterNumber
    amount: Money
    token: str


@dataclass(slots=True)
class FakeCustomerServices:
    """Meters, tariffs and per-phone data in dicts; every call is recorded in ``calls``.

    Tariff: ``price_per_kwh_minor`` per kWh including a 16% tax and a flat fee. ``debts``: a
    meter's (balance, rate in basis points): that share of each amount goes to the debt first.
    """

    meters: dict[MeterNumber, MeterInfo] = field(default_factory=dict)
    blocked: set[MeterNumber] = field(default_factory=set)
    price_per_kwh_minor: int = 2500  # KES 25.00
    fee_minor: int = 1000  # KES 10.00
    tax_percent: int = 16
    tokens: list[FakeToken] = field(default_factory=list)
    saved: dict[Msisdn, list[SavedMeter]] = field(default_factory=dict)
    languages: dict[Msisdn, Language] = field(default_factory=dict)
    purchases: dict[str, PurchaseRequest] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)  # idempotency keys of requested prompts
    prompts_started: list[str] = field(default_factory=list)
    prompt_gate: asyncio.Event | None = None  # when set, prompts wait for it (ordering tests)
    sms: list[tuple[Msisdn, str]] = field(default_factory=list)
    resent: list[tuple[Msisdn, MeterNumber]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    debts: dict[MeterNumber, tuple[int, int]] = field(default_factory=dict)

    def add_meter(
        self,
        meter: MeterNumber,
        *,
        name: str = "J*** O***",
        area: str = "Kibera",
        min_minor: int = 5000,
        max_minor: int = 3_500_000,
        currency: str = "KES",
    ) -> MeterInfo:
        """Register a meter the fake will find."""
        info = MeterInfo(
            meter=meter,
            masked_name=name,
            area=area,
            min_purchase=Money(min_minor, currency),
            max_purchase=Money(max_minor, currency),
        )
        self.meters[meter] = info
        return info

    async def lookup_meter(self, meter: MeterNumber) -> MeterInfo | None:
        """The registered meter or None."""
        self.calls.append("lookup_meter")
        return self.meters.get(meter)

    async def quote(self, meter: MeterNumber, amount: Money) -> Quote | Refused:
        """Units for ``amount`` after fee and tax; refusals for limits and blocked meters."""
        self.calls.append("quote")
        info = self.meters.get(meter)
        if info is None:
            return Refused(reason=RefusalReason.UNKNOWN_METER)
        if meter in self.blocked:
            return Refused(reason=RefusalReason.METER_BLOCKED)
        if amount < info.min_purchase:
            return Refused(reason=RefusalReason.BELOW_MINIMUM, limit=info.min_purchase)
        if amount > info.max_purchase:
            return Refused(reason=RefusalReason.ABOVE_MAXIMUM, limit=info.max_purchase)
        balance, rate = self.debts.get(meter, (0, 0))
        recovered = min(balance, amount.amount_minor * rate // 10_000)
        net = amount.amount_minor - recovered - self.fee_minor
        energy_minor = net * 100 // (100 + self.tax_percent)
        tax_minor = net - energy_minor
        units = max(0, energy_minor * 10 // self.price_per_kwh_minor)
        return Quote(
            meter=meter,
            amount=amount,
            units_tenth_kwh=units,
            energy=Money(energy_minor, amount.currency),
            tax=Money(tax_minor, amount.currency),
            fees=Money(self.fee_minor, amount.currency),
            debt_recovered=Money(recovered, amount.currency) if balance else None,
            debt_remaining=Money(balance - recovered, amount.currency) if balance else None,
        )

    async def start_purchase(self, request: PurchaseRequest) -> PurchaseStarted | Refused:
        """Record the purchase once per idempotency key; the follow-up records the prompt."""
        self.calls.append("start_purchase")
        quote = await self.quote(request.meter, request.amount)
        if isinstance(quote, Refused):
            return quote
        self.purchases.setdefault(request.idempotency_key, request)
        key = request.idempotency_key

        async def request_prompt() -> None:
            self.calls.append("request_prompt")
            self.prompts_started.append(key)
            if self.prompt_gate is not None:
                await self.prompt_gate.wait()
            if key not in self.prompts:
                self.prompts.append(key)

        return PurchaseStarted(purchase_id=key, amount=request.amount, follow_up=request_prompt)

    async def resend_last_token(
        self, phone: Msisdn, meter: MeterNumber | None
    ) -> TokenResent | None:
        """Queue the newest matching token as an SMS (no vend)."""
        self.calls.append("resend_last_token")
        for token in reversed(self.tokens):
            if token.phone == phone and meter in {None, token.meter}:
                self.resent.append((phone, token.meter))
                self.sms.append((phone, f"Token {token.token}"))
                return TokenResent(meter=token.meter, amount=token.amount)
        return None

    async def saved_meters(self, phone: Msisdn) -> Sequence[SavedMeter]:
        """The phone's saved meters."""
        self.calls.append("saved_meters")
        return tuple(self.saved.get(phone, ()))

    async def save_meter(self, phone: Msisdn, meter: MeterNumber, nickname: str) -> SaveOutcome:
        """Save or rename; FULL past five."""
        self.calls.append("save_meter")
        saved = self.saved.setdefault(phone, [])
        for index, existing in enumerate(saved):
            if existing.meter == meter:
                saved[index] = SavedMeter(meter=meter, nickname=nickname)
                return SaveOutcome.RENAMED
        if len(saved) >= MAX_SAVED_METERS:
            return SaveOutcome.FULL
        saved.append(SavedMeter(meter=meter, nickname=nickname))
        return SaveOutcome.SAVED

    async def remove_meter(self, phone: Msisdn, meter: MeterNumber) -> None:
        """Forget a saved meter."""
        self.calls.append("remove_meter")
        self.saved[phone] = [m for m in self.saved.get(phone, []) if m.meter != meter]

    async def language(self, phone: Msisdn) -> Language | None:
        """The phone's language, if chosen."""
        return self.languages.get(phone)

    async def set_language(self, phone: Msisdn, language: Language) -> None:
        """Remember the phone's language."""
        self.calls.append("set_language")
        self.languages[phone] = language

    async def send_sms(self, phone: Msisdn, text: str) -> None:
        """Record an SMS reply."""
        self.calls.append("send_sms")
        self.sms.append((phone, text))


def _expect(condition: bool, failure: str) -> None:
    """Raise AssertionError with ``failure`` unless ``condition`` (works under ``python -O``)."""
    if not condition:
        raise AssertionError(failure)


UssdTransport = Callable[[Mapping[str, str]], Awaitable[tuple[int, str]]]
"""Posts one Africa's Talking USSD form; returns the HTTP status and body."""


class UssdTester:
    """Given/when/then for USSD conversations, in the spirit of vumi's ``AppTester``.

    It speaks Africa's Talking's wire format (cumulative ``text``) through ``transport`` and
    checks on every hop what must always hold: HTTP 200, ``CON ``/``END `` and at most
    ``max_chars`` characters::

        phone = UssdTester(transport, phone="+254711000001")
        await phone.dial()
        phone.sees("Buy electricity")
        await phone.answer("1")
        phone.sees("Enter the meter number")
    """

    def __init__(
        self,
        transport: UssdTransport,
        *,
        phone: str,
        service_code: str = "*384*123#",
        network_code: str = "63902",
        max_chars: int = 182,
    ) -> None:
        self._transport = transport
        self.phone = phone
        self.service_code = service_code
        self.network_code = network_code
        self.max_chars = max_chars
        self._sessions = 0
        self.session_id = ""
        self.path: list[str] = []
        self.reply = ""
        self.transcript: list[tuple[str, str]] = []

    async def dial(self, *prefilled: str) -> str:
        """Start a new session (pre-filled answers as in ``*384*123*1#``); returns the screen."""
        self._sessions += 1
        self.session_id = f"ATUid_{self._sessions:032x}"
        self.path = list(prefilled)
        return await self._hop("<dial>")

    async def answer(self, text: str) -> str:
        """Type ``text`` and send; returns the next screen."""
        if self.ended:
            raise AssertionError(f"the session has ended; last screen: {self.reply!r}")
        self.path.append(text)
        return await self._hop(text)

    async def resend(self) -> str:
        """Send the last hop again (an aggregator retry)."""
        return await self._hop("<retry>")

    async def _hop(self, label: str) -> str:
        form = {
            "sessionId": self.session_id,
            "phoneNumber": self.phone,
            "serviceCode": self.service_code,
            "networkCode": self.network_code,
            "text": "*".join(self.path),
        }
        status, body = await self._transport(form)
        _expect(status == 200, f"HTTP {status} for {label}: {body!r}")
        _expect(body.startswith(("CON ", "END ")), f"not CON/END for {label}: {body!r}")
        _expect(len(body) <= self.max_chars, f"{len(body)} chars for {label}: {body!r}")
        self.reply = body
        self.transcript.append((label, body))
        return body

    @property
    def ended(self) -> bool:
        """Whether the last screen was ``END``."""
        return self.reply.startswith("END ")

    @property
    def screen(self) -> str:
        """The last screen without its ``CON ``/``END `` prefix."""
        return self.reply[4:]

    def sees(self, *fragments: str) -> None:
        """Then: the last screen continues the session and shows every fragment."""
        _expect(not self.ended, f"expected CON, got {self.reply!r}")
        self._contains(fragments)

    def ends_with(self, *fragments: str) -> None:
        """Then: the last screen ends the session and shows every fragment."""
        _expect(self.ended, f"expected END, got {self.reply!r}")
        self._contains(fragments)

    def _contains(self, fragments: tuple[str, ...]) -> None:
        for fragment in fragments:
            _expect(fragment in self.reply, f"{fragment!r} not in {self.reply!r}")

    def option(self, label: str) -> str:
        """The number shown before the option ``label`` on the last screen."""
        for line in self.screen.splitlines():
            number, _, rest = line.partition(" ")
            if number.isdigit() and rest == label:
                return number
        raise AssertionError(f"no option {label!r} in {self.reply!r}")
