"""The flows' ``CustomerServices`` port, answered by the purchase saga and the ledger.

This is glue owned by the composition root: it translates the saga's and ledger's value types
and errors into the narrow vocabulary the menus speak (``flows.ports``), so the flows never
import the saga, the ledger or a provider.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from flows.ports import (
    Channel,
    FollowUp,
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
from gateway.errors import GatewayError
from gateway.ledger import (
    CustomerLedger,
    IdempotencyConflict,
    LedgerError,
    LedgerUnavailable,
    MessageKind,
    NotFound,
    SavedMetersFull,
)
from gateway.ledger import MeterNumber as Drn
from gateway.logging import get_logger
from gateway.money import Money
from gateway.phone import Msisdn
from gateway.tariff import AmountAboveMaximum, AmountAllToDebt, AmountBelowMinimum, TariffError
from gateway.vending import MeterBlocked, NothingToReprint, UnknownMeter, Vending

log = get_logger()


def _drn(meter: MeterNumber) -> Drn:
    """The flows' meter number as the ledger's."""
    return Drn(meter)


def _refusal(exc: Exception) -> Refused:  # noqa: PLR0911 - one answer per kind
    """The customer-facing reason for a saga, tariff or ledger refusal."""
    match exc:
        case UnknownMeter() | NotFound():
            return Refused(reason=RefusalReason.UNKNOWN_METER)
        case MeterBlocked():
            return Refused(reason=RefusalReason.METER_BLOCKED)
        case AmountBelowMinimum():
            return Refused(reason=RefusalReason.BELOW_MINIMUM, limit=exc.minimum)
        case AmountAboveMaximum():
            return Refused(reason=RefusalReason.ABOVE_MAXIMUM, limit=exc.maximum)
        case AmountAllToDebt():
            # No minimum: no amount the tariff accepts buys energy past the debt (call the utility).
            return Refused(
                reason=RefusalReason.ALL_TO_DEBT if exc.minimum else RefusalReason.METER_BLOCKED,
                limit=exc.minimum,
            )
        case TariffError():
            # Buys nothing after charges, or another currency: the minimum is the clear answer.
            return Refused(reason=RefusalReason.BELOW_MINIMUM)
        case _:
            return Refused(reason=RefusalReason.UNAVAILABLE)


class SagaCustomerServices:
    """``flows.ports.CustomerServices`` over the saga (``Vending``) and the ledger.

    Args:
        vending: the purchase saga (purchases, tokens).
        ledger: what the customer services read and keep for a phone (meters, saved meters,
            language, replies); the saga's ledger.
    """

    def __init__(self, vending: Vending, ledger: CustomerLedger) -> None:
        self._vending = vending
        self._ledger = ledger

    async def lookup_meter(self, meter: MeterNumber) -> MeterInfo | None:
        """The meter with its masked name and the tariff's purchase range, or None."""
        info = await self._ledger.lookup_meter(_drn(meter))
        if info is None:
            return None
        tariff = await self._ledger.get_tariff(info.tariff_id)
        return MeterInfo(
            meter=meter,
            masked_name=info.masked_name,
            area=info.area,
            min_purchase=tariff.minimum,
            max_purchase=tariff.maximum,
        )

    async def quote(self, meter: MeterNumber, amount: Money) -> Quote | Refused:
        """The saga's quote, or why the amount cannot be sold."""
        try:
            priced = await self._vending.quote(meter, amount)
        except (GatewayError, LedgerError) as exc:
            return self._refused("quote_refused", exc, meter=meter)
        return Quote(
            meter=meter,
            amount=priced.amount,
            units_tenth_kwh=priced.units,
            energy=priced.energy,
            tax=priced.vat,
            fees=priced.fixed_charge,
            debt_recovered=priced.debt_recovered,
            debt_remaining=priced.debt_remaining,
        )

    async def start_purchase(self, request: PurchaseRequest) -> PurchaseStarted | Refused:
        """Open the purchase now; the payment prompt goes out in the follow-up."""
        try:
            purchase = await self._vending.start_purchase(
                channel=str(request.channel),
                phone=request.phone,
                meter=request.meter,
                amount=request.amount,
                idempotency_key=request.idempotency_key,
            )
        except IdempotencyConflict as exc:
            return self._refused("purchase_key_conflict", exc, meter=request.meter)
        except (GatewayError, LedgerError) as exc:
            return self._refused("purchase_refused", exc, meter=request.meter)
        return PurchaseStarted(
            purchase_id=purchase.purchase_id,
            amount=purchase.amount,
            follow_up=self._request_payment(purchase.purchase_id),
        )

    def _request_payment(self, purchase_id: str) -> FollowUp:
        vending = self._vending

        async def follow_up() -> None:
            with structlog.contextvars.bound_contextvars(purchase_id=purchase_id):
                try:
                    await vending.request_payment(purchase_id)
                except (GatewayError, LedgerError) as exc:
                    # The purchase is recorded: the sweeper asks the provider again later.
                    log.warning(
                        "payment_request_deferred",
                        error=type(exc).__name__,
                        detail=str(exc),
                        retryable=exc.retryable,
                    )

        return follow_up

    async def resend_last_token(
        self, phone: Msisdn, meter: MeterNumber | None
    ) -> TokenResent | None:
        """Queue the newest token of ``phone`` again (the same token; never vends)."""
        vend = await self._vending.last_token(phone, meter)
        if vend is None:
            return None
        try:
            await self._vending.reprint(vend.purchase_id, actor=str(Channel.USSD))
        except NothingToReprint:
            return None
        purchase = await self._ledger.get_purchase(vend.purchase_id)
        return TokenResent(meter=MeterNumber(vend.meter), amount=purchase.amount)

    async def saved_meters(self, phone: Msisdn) -> Sequence[SavedMeter]:
        """The phone's saved meters, oldest first."""
        return [
            SavedMeter(meter=MeterNumber(saved.meter), nickname=saved.nickname)
            for saved in await self._ledger.saved_meters(phone)
        ]

    async def save_meter(self, phone: Msisdn, meter: MeterNumber, nickname: str) -> SaveOutcome:
        """Save or rename a meter; FULL past the limit."""
        saved_now = await self._ledger.saved_meters(phone)
        already = any(str(saved.meter) == str(meter) for saved in saved_now)
        try:
            await self._ledger.save_meter(phone, _drn(meter), nickname=nickname)
        except SavedMetersFull:
            return SaveOutcome.FULL
        return SaveOutcome.RENAMED if already else SaveOutcome.SAVED

    async def remove_meter(self, phone: Msisdn, meter: MeterNumber) -> None:
        """Forget a saved meter (nothing happens when it was not saved)."""
        await self._ledger.remove_saved_meter(phone, _drn(meter))

    async def language(self, phone: Msisdn) -> Language | None:
        """The phone's chosen language, if it chose one we still speak."""
        chosen = await self._ledger.get_language(phone)
        try:
            return Language(chosen) if chosen else None
        except ValueError:
            return None

    async def set_language(self, phone: Msisdn, language: Language) -> None:
        """Remember the phone's language (also used for token SMS)."""
        await self._ledger.set_language(phone, str(language))

    async def send_sms(self, phone: Msisdn, text: str) -> None:
        """Queue a reply through the outbox (retried and delivery-tracked like tokens)."""
        await self._ledger.enqueue_message(
            None, kind=MessageKind.REPLY, recipient=phone, body=text, actor="sms"
        )

    @staticmethod
    def _refused(event: str, exc: Exception, **context: object) -> Refused:
        refusal = _refusal(exc)
        level = log.warning if isinstance(exc, LedgerUnavailable) else log.info
        level(event, reason=str(refusal.reason), error=type(exc).__name__, **context)
        return refusal
