"""What the conversation layer needs from the rest of the gateway, and nothing more.

Flows (USSD menus and SMS commands) reach the ledger, the purchase saga and the SMS outbox only
through :class:`CustomerServices`. ``gateway/app.py`` hands the flows an object that satisfies it;
tests use :class:`flows.testing.FakeCustomerServices`. Value types come from ``gateway/values/``
(``Money``, ``Msisdn``, ``MeterNumber``); nothing else of the gateway is imported here.

Session state lives behind :class:`SessionStore` (in memory and SQLite in ``flows.sessions``; a
Redis store comes with the scale-out work and only needs these four methods).

Slow work never runs inside a USSD hop: :meth:`CustomerServices.start_purchase` only records the
purchase and returns a :data:`FollowUp` (request the payment prompt) that the web layer runs
*after* the reply has reached the aggregator.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from gateway.values import ids as values_ids
from gateway.values.money import Money
from gateway.values.phone import Msisdn

MeterNumber = values_ids.MeterNumber
"""A meter number (the STS DRN, decoder reference number): 11 or 13 digits, Luhn check digit."""

FollowUp = Callable[[], Awaitable[None]]
"""Slow work to run after the customer's reply has been sent (e.g. request the payment prompt).

It must be safe to run once; it handles and logs its own failures (the purchase stays in the
ledger, the saga's sweeper takes over)."""


class Channel(StrEnum):
    """Where a purchase was asked for."""

    USSD = "ussd"
    SMS = "sms"


class Language(StrEnum):
    """Languages the catalogues in ``flows/messages`` speak."""

    EN = "en"
    SW = "sw"
    FR = "fr"


class RefusalReason(StrEnum):
    """Why an amount or a purchase is refused; each has customer text in every catalogue."""

    BELOW_MINIMUM = "below_minimum"
    ABOVE_MAXIMUM = "above_maximum"
    UNKNOWN_METER = "unknown_meter"
    METER_BLOCKED = "meter_blocked"  # the utility stopped vending to this meter
    PURCHASE_PENDING = "purchase_pending"  # one purchase already awaits payment on this meter
    ALL_TO_DEBT = (
        "all_to_debt"  # the meter's debt recovery leaves too little; limit: least that buys
    )
    UNAVAILABLE = "unavailable"  # a dependency is down; try again later


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterInfo:
    """A known meter as a customer may see it: names are masked by the port (``J*** O***``)."""

    meter: MeterNumber
    masked_name: str
    area: str
    min_purchase: Money
    max_purchase: Money

    @property
    def currency(self) -> str:
        """ISO 4217 code of the meter's tariff."""
        return self.min_purchase.currency


@dataclass(frozen=True, slots=True, kw_only=True)
class Quote:
    """What ``amount`` buys on ``meter``: units in tenths of a kWh and where the money goes.

    ``energy + tax + fees + debt_recovered == amount``. ``debt_recovered`` (what goes to the
    meter's debt) and ``debt_remaining`` (what it still owes after) are None when it owes nothing.
    """

    meter: MeterNumber
    amount: Money
    units_tenth_kwh: int
    energy: Money
    tax: Money
    fees: Money
    debt_recovered: Money | None = None
    debt_remaining: Money | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """A quote or purchase that will not go ahead; ``limit`` is the bound that was crossed."""

    reason: RefusalReason
    limit: Money | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PurchaseRequest:
    """A customer's confirmed wish to buy.

    ``idempotency_key`` is minted once per logical purchase by the flows (``ussd:<session id>``,
    ``sms:<message id>``): the same key always yields the same purchase.
    """

    phone: Msisdn
    meter: MeterNumber
    amount: Money
    channel: Channel
    idempotency_key: str
    language: Language


@dataclass(frozen=True, slots=True, kw_only=True)
class PurchaseStarted:
    """The purchase is recorded; ``follow_up`` requests the payment prompt once the reply is out."""

    purchase_id: str
    amount: Money
    follow_up: FollowUp | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenResent:
    """The last token is on its way by SMS again (the same token: resending never vends)."""

    meter: MeterNumber
    amount: Money


@dataclass(frozen=True, slots=True, kw_only=True)
class SavedMeter:
    """A meter a phone keeps for quick buying, with the customer's nickname for it."""

    meter: MeterNumber
    nickname: str


class SaveOutcome(StrEnum):
    """What happened when a phone tried to save a meter."""

    SAVED = "saved"
    RENAMED = "renamed"  # it was saved already; the nickname changed
    FULL = "full"  # the phone already has MAX_SAVED_METERS


MAX_SAVED_METERS = 5


class CustomerServices(Protocol):
    """Everything the menus and SMS commands may ask of the gateway.

    Every method is quick (a few ledger reads or one write) and safe to retry; none of them
    talks to a payment provider inline.
    """

    async def lookup_meter(self, meter: MeterNumber) -> MeterInfo | None:
        """The meter as a customer may see it, or None when no such meter is registered."""
        ...

    async def quote(self, meter: MeterNumber, amount: Money) -> Quote | Refused:
        """What ``amount`` buys on ``meter``, or why that amount is refused (limits, blocked)."""
        ...

    async def start_purchase(self, request: PurchaseRequest) -> PurchaseStarted | Refused:
        """Record a purchase; the payment prompt is requested by the returned ``follow_up``.

        The same ``idempotency_key`` returns the same purchase (and a harmless follow-up).
        """
        ...

    async def resend_last_token(
        self, phone: Msisdn, meter: MeterNumber | None
    ) -> TokenResent | None:
        """Queue the last token bought by ``phone`` (for ``meter`` when given) for SMS again.

        Returns None when there is no such token. Never vends.
        """
        ...

    async def saved_meters(self, phone: Msisdn) -> Sequence[SavedMeter]:
        """The phone's saved meters, oldest first, at most ``MAX_SAVED_METERS``."""
        ...

    async def save_meter(self, phone: Msisdn, meter: MeterNumber, nickname: str) -> SaveOutcome:
        """Save (or rename) ``meter`` for ``phone``; refuses with FULL past ``MAX_SAVED_METERS``."""
        ...

    async def remove_meter(self, phone: Msisdn, meter: MeterNumber) -> None:
        """Forget a saved meter; removing one that is not saved does nothing."""
        ...

    async def language(self, phone: Msisdn) -> Language | None:
        """The phone's chosen language, or None when it never chose."""
        ...

    async def set_language(self, phone: Msisdn, language: Language) -> None:
        """Remember the phone's language for USSD screens and SMS."""
        ...

    async def send_sms(self, phone: Msisdn, text: str) -> None:
        """Queue an SMS reply (through the outbox: retried, delivery-tracked). Quick."""
        ...


class SessionStore(Protocol):
    """Short-lived conversation state, by key, with expiry (in memory, SQLite, later Redis).

    Values are opaque strings (the engine stores JSON). Expired keys read as absent.
    """

    async def get(self, key: str) -> str | None:
        """The value under ``key``, or None when absent or expired."""
        ...

    async def put(self, key: str, value: str, ttl_s: float) -> None:
        """Store ``value`` under ``key`` for ``ttl_s`` seconds, replacing any earlier value."""
        ...

    async def add(self, key: str, value: str, ttl_s: float) -> bool:
        """Store ``value`` only if ``key`` is absent (or expired); True when it was stored."""
        ...

    async def delete(self, key: str) -> None:
        """Remove ``key``; removing an absent key does nothing."""
        ...


__all__ = [
    "MAX_SAVED_METERS",
    "Channel",
    "CustomerServices",
    "FollowUp",
    "Language",
    "MeterInfo",
    "MeterNumber",
    "PurchaseRequest",
    "PurchaseStarted",
    "Quote",
    "RefusalReason",
    "Refused",
    "SaveOutcome",
    "SavedMeter",
    "SessionStore",
    "TokenResent",
]
