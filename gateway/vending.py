"""The purchase saga: the only code that moves a purchase between states.

```
created ─request_payment─▶ awaiting_payment ─confirm (paid, right amount)─▶ paid ─vend─▶ vended
   │                           │       └─ status: failed ─▶ payment_failed ─┐                  │
   └──── deadline ─────────────┴──────▶ expired ──── late success ──────────┴─▶ paid       DLR ▼
paid ─ engine refuses ─▶ vend_failed (operator)   wrong amount ─▶ refund_pending       delivered
```

A key rotation (``Ledger.plan_key_rotation``) leaves a pending key change on each meter: the
meter's next vend makes the key-change tokens under the current key and the credit token under
the new one (TIDs from the new base date: from scratch on a 1993 → 2014 rollover, RO = 1), and
records them with the meter's new key in the vend's transaction; the SMS lists the key-change
tokens first. Planning also queues the meter's vend_failed purchases again (→ paid).

Debt recovery: a meter that owes the utility (``Ledger.set_debt``) gives part of each purchase
to the debt before energy is priced (``gateway.tariff.DebtTerms``). The quote plans it and the
purchase keeps it; the vend recovers it in the vend's own transaction (never more than the debt
then owes: should the debt have shrunk meanwhile, what is not recovered buys energy, priced under
the purchase's tariff), and the token SMS says what was recovered and what remains.

Free basic electricity (FBE): a tariff's monthly allowance (``Ledger.set_fbe_allowance``) comes
as a second credit token, with its own TID and SMS, with the meter's first vend of the calendar
month in ``SagaPolicy.fbe_timezone`` (Africa/Nairobi by default). The database allows one per
meter and month. A vend that delivers a key change, or whose payer is unknown (a C2B payment with
a masked MSISDN: its token SMS is held), leaves the FBE to the next purchase.

A callback is a claim: ``on_payment_notice`` records it and asks the provider (``query_status``)
before anything is vended; a provider answer that contradicts it is a security event. A provider
receipt pays for one purchase only: the ledger refuses a second claim of it (``ReceiptReused``),
which leaves that purchase REFUND_PENDING for an operator, never vended (a push proven by our
own query of it is vended without the disputed receipt instead). A claim may take a receipt only
when the provider's record of it matches the claim (payer, amount, kind: a paybill payment or an
STK push): a paybill confirmation is checked before it opens a purchase, and one the record
contradicts takes nothing (``payment_claim_contradicted``), leaving the receipt to its own
payment's claim. The receipt on a token comes only from the provider's records, never from a
callback's word.

Each step is one ledger transaction with its event row, and every step is safe to retry: a replayed
vend returns the stored token and queues nothing. TIDs come from the meter row inside the vend
transaction (compare-and-set), serialised per meter in this process, so two purchases for one meter
in one minute get distinct, increasing TIDs.

```
VendingError                 gateway.errors.GatewayError
  UnknownMeter               no such meter (``meter``)
  MeterBlocked               the utility blocked the meter
  NotPaid                    vend asked for a purchase that is not paid
  VendFailed                 the token engine refused: the purchase is VEND_FAILED (operator)
  NothingToReprint           the purchase has no token yet
```
Tariff errors (``gateway.tariff``) pass through from ``quote`` and ``start_purchase``.

Beside the saga: the recovery of collections whose outcome is unknown is
``gateway/unknown_collections.py`` (the saga owns one ``UnknownCollections``); the token SMS is
built by ``flows/messages/tokens.py`` from the message catalogues; the token engine is built by
the composition root (``gateway/app.py``, ``load_token_engine``) and handed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Final, Protocol
from zoneinfo import ZoneInfo

import structlog

from flows.messages.tokens import fbe_message, token_message
from gateway.errors import GatewayError
from gateway.ledger import (
    ConfirmedPayment,
    FbeDraft,
    FloatDebit,
    IllegalTransition,
    KeyChange,
    LedgerError,
    MessageKind,
    MeterRecord,
    MeterStatus,
    Minted,
    NotFound,
    NoticeRecord,
    OutboxMessage,
    Purchase,
    PurchaseDraft,
    PurchaseState,
    ReceiptReused,
    SagaLedger,
    TidConflict,
    Vend,
    VendContext,
    VendDraft,
    VendOutcome,
    new_purchase_id,
)
from gateway.money import Money
from gateway.payments import (
    CollectionRequest,
    CustomerPaymentRefusal,
    ForgedCallback,
    PaymentError,
    PaymentNotice,
    PaymentProvider,
    PaymentState,
    PaymentStatus,
    ProviderReference,
    ReceiptVerifier,
)
from gateway.phone import Msisdn
from gateway.retry import backoff_s
from gateway.sts import (
    MeterProfile,
    StsError,
    Token,
    TokenEngine,
    next_tid,
    round_units_down,
)
from gateway.tariff import Quote, TariffError, price, quote
from gateway.unknown_collections import (
    COLLECTION_ATTEMPTED,
    COLLECTION_NOT_STARTED,
    UNKNOWN_COLLECTION_AMBIGUOUS,
    UnknownCollections,
)
from gateway.values.clock import UtcClock, utc_now

__all__ = [
    "COLLECTION_ATTEMPTED",
    "COLLECTION_NOT_STARTED",
    "CUSTOMER_INITIATED_CHANNEL",
    "UNKNOWN_COLLECTION_AMBIGUOUS",
    "MeterBlocked",
    "NotPaid",
    "NothingToReprint",
    "SagaObserver",
    "SagaPolicy",
    "UnknownMeter",
    "VendFailed",
    "Vending",
    "VendingError",
    "fbe_message",
    "reprint_token",
    "token_message",
]

log = structlog.get_logger()

_FAILED_CLAIMS: Final = frozenset(
    {PaymentState.FAILED, PaymentState.CANCELLED, PaymentState.TIMED_OUT}
)
_SETTLED: Final = frozenset({PurchaseState.VENDED, PurchaseState.DELIVERED})
#: The channel of a purchase the customer paid on their own (Daraja C2B paybill). It is never
#: prompted: the money has already moved, so a push would charge the customer twice.
CUSTOMER_INITIATED_CHANNEL: Final = "c2b"
#: Bytes of a callback body kept in the ledger: real callbacks are a few hundred bytes; its
#: SHA-256 is taken over the whole body (issue 17: 50 unknown-reference posts of 900 KB).
MAX_STORED_NOTICE: Final = 8192
_PROFILE_CACHE: Final = 4096  # validated meter profiles kept (oldest dropped first)


def _claim_contradiction(
    record: PaymentStatus, amount: Money | None, payer: Msisdn | None, *, customer: bool
) -> str | None:
    """How the provider's record of a paid receipt contradicts a claim on it; None if it does not.

    Only a success record is compared (a failure is ``confirm``'s to handle): its kind of
    payment (``customer``: one the payer started, a paybill payment; else our prompt's) when
    the record says it, its amount, and its payer when both sides name one.
    """
    if record.state is not PaymentState.SUCCEEDED:
        return None
    if record.customer_initiated is not None and record.customer_initiated != customer:
        return "a payment the payer started" if record.customer_initiated else "an STK push's"
    if amount is not None and record.amount is not None and record.amount != amount:
        return "another amount"
    if payer is not None and record.payer is not None and record.payer != payer:
        return "another payer"
    return None


# ------------------------------------------------------------------------------------------ errors


#: The channel of a vendor API sale (``gateway/vendor/``), paid from the vendor's float.
VENDOR_CHANNEL: Final = "vendor"
#: The "provider" of a vendor sale: the vendor's prepaid float (no collection is ever requested).
FLOAT_PROVIDER: Final = "float"
#: A vendor sale still open this long after it started was abandoned (its vendor never retried):
#: the payment checker closes it (nothing was debited).
VENDOR_ABANDON_S: Final = 3600


class VendingError(GatewayError):
    """The saga refused a request; the message is for operators."""


class UnknownMeter(VendingError):
    """No meter with that number is registered."""

    def __init__(self, meter: str) -> None:
        super().__init__(f"no meter {meter!r} is registered")
        self.meter = meter


class MeterBlocked(VendingError):
    """The utility has blocked sales to this meter."""

    def __init__(self, meter: str) -> None:
        super().__init__(f"meter {meter} is blocked")
        self.meter = meter


class NotPaid(VendingError):
    """A vend was asked for a purchase that is not paid."""

    def __init__(self, purchase_id: str, state: PurchaseState) -> None:
        super().__init__(f"purchase {purchase_id} is {state}, not paid: no token")
        self.purchase_id = purchase_id
        self.state = state


class VendFailed(VendingError):
    """The token could not be made; the purchase is VEND_FAILED and needs an operator."""

    def __init__(self, purchase_id: str, reason: str) -> None:
        super().__init__(f"purchase {purchase_id}: vend failed: {reason}")
        self.purchase_id = purchase_id
        self.reason = reason


class NothingToReprint(VendingError):
    """The purchase has no token to send again."""


# --------------------------------------------------------------------------------- units carried


#: Meters whose last stored TID a saga remembers (oldest forgotten first).
_STORED_TIDS: Final = 10_000


def _carried_units(units: int) -> int:
    """The units a purchase's token carries, recorded and sent exactly (invariant 8).

    Invariant 8 of docs/architecture.md: the units recorded, in the SMS and credited are one number.

    Quotes only offer amounts a token carries; a purchase quoted before they did (above 16,383
    units) is vended the largest such amount below its units, never more than was paid for.
    """
    return round_units_down(units)


# -------------------------------------------------------------------------------------- the saga


class SagaObserver(Protocol):
    """What the saga reports as it goes, for metrics (the composition root implements it).

    Calls are synchronous and must be cheap; an observer that raises is logged and ignored.
    """

    def payment_confirmed(self, seconds: float) -> None:
        """A payment was proven: seconds from the collection request to its proof (once each)."""
        ...

    def vended(self, seconds: float) -> None:
        """A token was durably stored: seconds the vend step took (lock, token, write)."""
        ...

    def security_event(self, kind: str) -> None:
        """The saga saw a security event of ``kind`` (``payment_receipt_reused`` …)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class SagaPolicy:
    """Timings of the saga. Seconds throughout.

    Attributes:
        first_check_after_s: after a collection starts, when the sweeper first asks the provider
            (a callback usually arrives sooner).
        check_interval_s: then the sweeper asks again this often until the payment is settled
            or the purchase expires (a failed query, too, is asked again after this long).
        check_backoff_s, check_backoff_max_s: a collection request the provider could not take
            (retryable) is sent again after a backoff, exponential to the cap.
        ambiguous_recheck_s: a push of unknown outcome whose lookup found several payments that
            could be it (``unknown_collection_ambiguous``, for an operator) is looked up again
            this often.
        payment_expiry_s: after this long since creation an unpaid purchase expires (a later
            confirmed success still vends).
        vend_attempts: how often a vend is retried when another writer moved the meter's TID.
        reconcile_after_s: a push whose outcome a crash left unknown (and whose callback never
            came) is looked up in the provider's list of payments this long after it went out
            (the prompt's lifetime).
        reconcile_window_s: that lookup covers (attempt - before, attempt + after).
        fbe_timezone: the IANA zone whose calendar months free basic electricity follows.
        receipt_check_s: how long a vend waits for the provider's record of a receipt a callback
            claimed (Daraja Transaction Status); without an answer the token goes out with our
            purchase id as its receipt.
    """

    first_check_after_s: float = 20.0
    check_interval_s: float = 30.0
    check_backoff_s: float = 15.0
    check_backoff_max_s: float = 300.0
    ambiguous_recheck_s: float = 300.0
    payment_expiry_s: float = 3600.0
    vend_attempts: int = 32
    reconcile_after_s: float = 90.0
    reconcile_window_s: tuple[float, float] = (60.0, 300.0)
    fbe_timezone: str = "Africa/Nairobi"
    receipt_check_s: float = 5.0


#: How long a recovery claims a paid-not-vended purchase: a vend takes milliseconds, so this
#: is mostly how soon a failed recovery vend (a blocked meter, an engine outage) is tried again.
RECOVERY_LEASE_S: Final = 30.0


class Vending:
    """The purchase saga (satisfies ``gateway.payments.PaymentEvents``).

    Args:
        ledger: where every step is recorded.
        engine: makes tokens (``LocalTokenEngine`` or a remote HSM engine).
        providers: payment adapters by name; a purchase names its provider.
        default_provider: the provider used when ``start_purchase`` names none.
        clock: the time source (UTC, aware); TIDs and deadlines come from it.
        policy: timings.
        observer: told of payment-confirmation and vend latencies (metrics); optional.
    """

    def __init__(
        self,
        *,
        ledger: SagaLedger,
        engine: TokenEngine,
        providers: Mapping[str, PaymentProvider],
        default_provider: str,
        clock: UtcClock = utc_now,
        policy: SagaPolicy | None = None,
        observer: SagaObserver | None = None,
    ) -> None:
        if default_provider not in providers:
            raise ValueError(f"default provider {default_provider!r} is not among the providers")
        self._ledger = ledger
        self._engine = engine
        self._providers = dict(providers)
        self._default_provider = default_provider
        self._clock = clock
        self._policy = policy or SagaPolicy()
        self._observer = observer
        #: TID compare-and-sets this saga lost (another writer took the TID; read again).
        self.tid_conflicts = 0
        #: The last TID this process stored per meter (bounded): a context read before it is
        #: stale, and is read again rather than losing a compare-and-set.
        self._stored_tids: dict[str, int] = {}
        self._meter_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._purchase_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._profiles: dict[tuple[object, ...], MeterProfile] = {}
        self._unknown = UnknownCollections(
            ledger=ledger,
            providers=self._providers,
            policy=self._policy,
            clock=clock,
            on_success=self._on_success,
        )
        self._fbe_zone = ZoneInfo(self._policy.fbe_timezone)

    @property
    def ledger(self) -> SagaLedger:
        """The ledger the saga writes to (the operator surface reads it)."""
        return self._ledger

    # -- quoting and starting -------------------------------------------------------------------

    async def _sellable_meter(self, meter: str) -> MeterRecord:
        try:
            record = await self._ledger.get_meter(meter)
        except NotFound as exc:
            raise UnknownMeter(meter) from exc
        if record.status is MeterStatus.BLOCKED:
            raise MeterBlocked(meter)
        return record

    async def quote(self, meter: str, amount: Money) -> Quote:
        """What ``amount`` buys for ``meter`` under its tariff (units in tenths of a kWh).

        Raises:
            UnknownMeter, MeterBlocked: the meter cannot be sold to.
            TariffError: the amount is outside the tariff's range or currency.
        """
        return await self._price(await self._sellable_meter(meter), amount)

    async def _price(self, record: MeterRecord, amount: Money) -> Quote:
        """The quote under the meter's tariff, after the meter's debt recovery (if it owes)."""
        tariff = await self._ledger.get_tariff(record.tariff_id)
        debt = await self._ledger.get_debt(record.drn)
        return quote(tariff, amount, debt=debt.terms if debt is not None else None)

    async def start_purchase(
        self,
        *,
        channel: str,
        phone: Msisdn | None,
        meter: str,
        amount: Money,
        idempotency_key: str,
        provider: str | None = None,
    ) -> Purchase:
        """Open a purchase (CREATED). The same ``idempotency_key`` returns the same purchase.

        Raises:
            UnknownMeter, MeterBlocked, TariffError: it cannot be sold.
            IdempotencyConflict: the key was used for a different request.
        """
        provider_name = provider or self._default_provider
        first_check = timedelta(seconds=self._policy.first_check_after_s)
        if channel == VENDOR_CHANNEL:  # paid from a vendor's float, with its vend
            provider_name, first_check = FLOAT_PROVIDER, timedelta(seconds=VENDOR_ABANDON_S)
        elif provider_name not in self._providers:
            raise ValueError(f"unknown payment provider {provider_name!r}")
        record = await self._sellable_meter(meter)
        priced = await self._price(record, amount)
        purchase = await self._ledger.open_purchase(
            PurchaseDraft(
                purchase_id=new_purchase_id(),
                channel=channel,
                phone=phone,
                meter=record.drn,
                amount=amount,
                units=priced.units,
                tariff_id=record.tariff_id,
                idempotency_key=idempotency_key,
                provider=provider_name,
                # Should the caller never get to request_payment (a crash in between), the
                # sweeper requests it then, or expires the purchase at its deadline. Stored with
                # the purchase in one transaction, so no crash can leave it unscheduled.
                first_check_at=self._clock() + first_check,
                debt_recovery_minor=priced.debt_recovered_minor,
            ),
            actor=channel,
        )
        with structlog.contextvars.bound_contextvars(purchase_id=purchase.purchase_id):
            log.info(
                "purchase_started",
                channel=channel,
                meter=meter,
                amount=str(amount),
                units=priced.units,
                debt_recovered=str(priced.debt_recovered) if priced.debt_recovered else None,
            )
        return purchase

    # -- payment --------------------------------------------------------------------------------

    def _check_interval(self) -> timedelta:
        return timedelta(seconds=self._policy.check_interval_s)

    def _backoff(self, attempts: int) -> timedelta:
        policy = self._policy
        return timedelta(
            seconds=backoff_s(
                attempts, base_s=policy.check_backoff_s, cap_s=policy.check_backoff_max_s
            )
        )

    async def request_payment(self, purchase_id: str) -> Purchase:
        """Ask the purchase's provider to collect the money (the STK/MoMo prompt).

        Idempotent: a purchase that has its provider reference, or is past CREATED, is returned
        unchanged. A retryable provider failure leaves the purchase CREATED with a check
        scheduled, for the sweeper; a final refusal makes it PAYMENT_FAILED. A customer-initiated
        purchase (channel ``c2b``) is never prompted by any path: a crash before its reference
        was attached leaves it waiting for the confirmation's redelivery, or its deadline.
        """
        # One request per purchase at a time in this process: the channel's follow-up and the
        # sweeper's first check may race, and the second must see the first's mark.
        lock = self._purchase_locks.get(purchase_id)
        if lock is None:
            lock = self._purchase_locks[purchase_id] = asyncio.Lock()
        async with lock:
            return await self._request_payment(purchase_id)

    async def _request_payment(self, purchase_id: str) -> Purchase:
        with structlog.contextvars.bound_contextvars(purchase_id=purchase_id):
            purchase = await self._ledger.get_purchase(purchase_id)
            if (
                purchase.state is not PurchaseState.CREATED
                or purchase.provider_reference is not None
                or purchase.phone is None
                or purchase.channel == CUSTOMER_INITIATED_CHANNEL
            ):
                return purchase
            provider = self._providers[purchase.provider]
            request = CollectionRequest(
                purchase_id=purchase.purchase_id,
                payer=purchase.phone,
                amount=purchase.amount,
                account_reference=purchase.meter,
                description=f"Electricity {purchase.meter}",
            )
            guarded = not provider.idempotent_requests
            if guarded:
                if await self._unknown.collection_outcome_unknown(purchase_id):
                    # A prompt may be on the customer's phone already (we crashed after the
                    # provider accepted it, before its reference was stored). Another push
                    # could charge twice: wait for its callback, matched by payer and amount.
                    log.warning("collection_outcome_unknown", provider=provider.name)
                    return purchase
                await self._ledger.append_event(
                    purchase_id,
                    COLLECTION_ATTEMPTED,
                    actor="saga",
                    data={"provider": provider.name},
                )
            try:
                started = await provider.request_collection(request)
            except PaymentError as exc:
                if guarded and exc.retryable:
                    # The adapter says the request did not take effect: another may be sent.
                    await self._ledger.append_event(
                        purchase_id,
                        COLLECTION_NOT_STARTED,
                        actor="saga",
                        data={"provider": provider.name, "error": str(exc)},
                    )
                if exc.retryable:
                    attempts = purchase.check_attempts + 1
                    await self._ledger.schedule_check(
                        purchase_id, at=self._clock() + self._backoff(attempts), attempts=attempts
                    )
                    log.warning("payment_request_deferred", provider=provider.name, error=str(exc))
                    return await self._ledger.get_purchase(purchase_id)
                log.info("payment_request_refused", provider=provider.name, error=str(exc))
                return await self._ledger.transition(
                    purchase_id,
                    PurchaseState.PAYMENT_FAILED,
                    kind="payment_request_refused",
                    actor="saga",
                    data={"provider": provider.name, "error": str(exc)},
                )
            purchase = await self._ledger.attach_payment(
                purchase_id, provider=started.provider, reference=started.reference, actor="saga"
            )
            await self._ledger.schedule_check(
                purchase_id,
                at=self._clock() + timedelta(seconds=self._policy.first_check_after_s),
                attempts=0,
            )
            purchase = await self._ledger.get_purchase(purchase_id)  # with its first check
            log.info("payment_requested", provider=started.provider, reference=started.reference)
            payment = await self._ledger.get_payment(started.provider, started.reference)
            if payment is not None and payment.payload_hash is not None:
                # The callback beat us to it (it was kept as "unknown"): confirm it now.
                with contextlib.suppress(GatewayError, StsError):
                    purchase = await self.confirm(purchase_id)
            return purchase

    async def on_payment_notice(
        self,
        notice: PaymentNotice,
        *,
        background: Callable[[Callable[[], Awaitable[None]]], None] | None = None,
    ) -> None:
        """Record a callback's claim, then confirm it with the provider before any vend.

        Never raises for a bad, forged, unknown or duplicated notice (those are events and log
        lines); raises ``LedgerError`` only when the notice could not be recorded, so the route
        answers 5xx and the provider retries.

        A customer-initiated success (a C2B confirmation) of no purchase yet is recorded with a
        pending-claim row in the same transaction. With ``background`` (the confirmation route)
        what follows (the provider's record, the purchase, the vend) is handed to it and this
        returns once the claim is recorded: the provider gets its answer at once, and a crash
        loses nothing (``finish_pending_claims``, the sweeper's, carries it through).
        """
        pending = notice.is_customer_initiated and notice.claimed_state is PaymentState.SUCCEEDED
        outcome = await self._ledger.record_notice(
            NoticeRecord(
                provider=notice.provider,
                reference=notice.reference,
                claimed_state=notice.claimed_state.value,
                amount=notice.amount,
                payer=notice.payer,
                receipt=notice.receipt,
                raw=notice.raw[:MAX_STORED_NOTICE],
                payload_hash=notice.payload_hash,
                pending_claim=pending,
            ),
            actor=f"callback:{notice.provider}",
        )
        if outcome.payload_conflict:
            self._security_event(
                "payment_notice_payload_conflict",
                provider=notice.provider,
                reference=notice.reference,
                purchase_id=outcome.purchase_id,
            )
        if outcome.payment_settled:
            # A copy of a notice already acted on: the provider's answer settled its payment.
            log.debug("payment_notice_repeated", provider=notice.provider, settled=True)
            return
        pending = pending and outcome.purchase_id is None

        async def carry() -> None:
            await self._carry_notice(notice, outcome.purchase_id, pending=pending)

        if background is not None and pending:
            background(carry)
            return
        await carry()

    async def finish_pending_claims(self, *, limit: int = 100) -> int:
        """Carry through C2B claims recorded but left unfinished (a crash); how many were taken.

        Each is read again from its stored payload by its provider's adapter; one no adapter can
        read is dropped (logged). Instances share the work: a claim taken is leased.
        """
        claims = await self._ledger.take_pending_claims(limit=limit)
        for claim in claims:
            provider = self._providers.get(claim.provider)
            notice: PaymentNotice | None = None
            if provider is not None and claim.payload:
                with contextlib.suppress(ForgedCallback):
                    notice = provider.parse_callback(claim.payload, {})
            if notice is None or notice.reference != claim.reference:
                log.warning("pending_claim_unreadable", reference=claim.reference)
                await self._ledger.claim_finished(claim.provider, claim.reference)
                continue
            payment = await self._ledger.get_payment(claim.provider, claim.reference)
            purchase_id = payment.purchase_id if payment is not None else None
            log.info("pending_claim_resumed", reference=claim.reference, attempts=claim.attempts)
            try:
                await self._carry_notice(notice, purchase_id, pending=True)
            except (GatewayError, StsError) as exc:
                log.warning("pending_claim_deferred", reference=claim.reference, error=str(exc))
        return len(claims)

    async def _carry_notice(
        self, notice: PaymentNotice, purchase_id: str | None, *, pending: bool
    ) -> None:
        """Everything after a notice was recorded: its purchase, then the provider's word.

        ``pending``: the claim has a pending-claim row, forgotten once the claim is refused or
        its purchase opened (then the payment checks carry it).
        """
        record: PaymentStatus | None = None
        refused = False
        if purchase_id is None and notice.is_customer_initiated:
            refused, record, purchase_id = await self._take_customer_claim(notice)
        if pending:
            await self._ledger.claim_finished(notice.provider, notice.reference)
        if refused:
            return  # takes nothing: the reference stays free for the payment's own claim
        if purchase_id is None:
            purchase_id = await self._unknown.adopt_unknown_collection(notice)
        if purchase_id is None:
            await self._ledger.append_event(
                None,
                "unknown_payment_reference",
                actor=f"callback:{notice.provider}",
                data={"provider": notice.provider, "reference": notice.reference},
            )
            self._security_event(
                "payment_notice_unknown",
                provider=notice.provider,
                reference=notice.reference,
                claimed_state=notice.claimed_state.value,
                stored_bytes=min(len(notice.raw), MAX_STORED_NOTICE),
            )
            return
        if not notice.claimed_state.is_final:
            return
        with structlog.contextvars.bound_contextvars(purchase_id=purchase_id):
            try:
                await self.confirm(
                    purchase_id,
                    claimed=notice.claimed_state,
                    claimed_receipt=notice.receipt,
                    record=record,
                )
            except (GatewayError, StsError) as exc:
                # Recorded; the sweeper finishes it. A notice is never refused for this.
                log.warning("payment_notice_confirmation_deferred", error=str(exc))

    async def _take_customer_claim(
        self, notice: PaymentNotice
    ) -> tuple[bool, PaymentStatus | None, str | None]:
        """A C2B claim of no purchase yet: (refused, the provider's record, the purchase opened).

        Refused when it contradicts its payment's validation or the provider's record of the
        receipt (``payment_claim_contradicted``); else its purchase is opened (None when the
        meter cannot be sold: an event).
        """
        contradiction = await self._validation_contradiction(notice)
        if contradiction is not None:
            await self._claim_contradicts(notice, contradiction)
            return True, None, None
        record = await self._customer_claim_record(notice)
        if record is not None and await self._claim_refused(notice, record):
            return True, record, None
        return False, record, await self._open_customer_payment(notice)

    async def _customer_claim_record(self, notice: PaymentNotice) -> PaymentStatus | None:
        """The provider's record of a C2B confirmation's receipt, asked before it opens a purchase.

        None when it cannot be had now (or the notice claims no success): the claim then opens
        its purchase and ``confirm`` asks again, checking the same (``_on_proven``).
        """
        provider = self._providers.get(notice.provider)
        if provider is None or notice.claimed_state is not PaymentState.SUCCEEDED:
            return None
        try:
            return await provider.query_status(notice.reference)
        except PaymentError as exc:
            log.warning("customer_payment_unchecked", reference=notice.reference, error=str(exc))
            return None

    async def _claim_refused(self, notice: PaymentNotice, record: PaymentStatus) -> bool:
        """Whether the provider's record of the receipt contradicts a C2B confirmation's claim.

        Checked before the claim opens a purchase, since the purchase takes the receipt: a
        record of a paid receipt that is not a payment the payer started (an STK push's), or is
        of another amount or payer, is the security event ``payment_claim_contradicted`` (an
        event with no purchase) and the claim takes nothing; the payment's own confirmation
        still can.
        """
        reason = _claim_contradiction(record, notice.amount, notice.payer, customer=True)
        if reason is None:
            return False
        await self._claim_contradicts(notice, reason)
        return True

    async def _claim_contradicts(self, notice: PaymentNotice, reason: str) -> None:
        """The security event ``payment_claim_contradicted`` for a claim that takes nothing."""
        data = {
            "provider": notice.provider,
            "reference": notice.reference,
            "account": notice.account_reference,
            "reason": reason,
        }
        self._security_event("payment_claim_contradicted", **data)
        await self._ledger.append_event(
            None, "payment_claim_contradicted", actor=f"callback:{notice.provider}", data=data
        )

    async def _open_customer_payment(self, notice: PaymentNotice) -> str | None:
        """A customer-initiated payment (C2B paybill): open its purchase from the notice."""
        meter = notice.account_reference or ""
        if notice.amount is None:
            return None
        try:
            purchase = await self.start_purchase(
                channel=CUSTOMER_INITIATED_CHANNEL,
                phone=notice.payer,
                meter=meter,
                amount=notice.amount,
                idempotency_key=f"{notice.provider}:{notice.reference}",
                provider=notice.provider if notice.provider in self._providers else None,
            )
        except (VendingError, TariffError) as exc:
            await self._ledger.append_event(
                None,
                "customer_payment_unvendable",
                actor=f"callback:{notice.provider}",
                data={
                    "provider": notice.provider,
                    "reference": notice.reference,
                    "meter": meter,
                    "amount": str(notice.amount),
                    "reason": str(exc),
                },
            )
            log.warning("customer_payment_unvendable", reference=notice.reference, reason=str(exc))
            return None
        await self._ledger.attach_payment(
            purchase.purchase_id,
            provider=notice.provider,
            reference=notice.reference,
            actor="saga",
        )
        return purchase.purchase_id

    async def validate_customer_payment(
        self,
        provider: str,
        account_reference: str,
        amount: Money,
        payer: Msisdn | None,
        *,
        reference: str | None = None,
    ) -> CustomerPaymentRefusal | None:
        """Pre-check a customer-initiated payment: None to accept, else why it is refused.

        An unknown (or empty) meter number is ``UNKNOWN_ACCOUNT``, an amount the tariff does not
        sell (range or currency) ``AMOUNT_OUT_OF_RANGE``, a blocked meter ``OTHER``: the
        provider's adapter answers its own code for each (Daraja: C2B00012, C2B00013, C2B00016).

        With ``reference`` (Daraja's ``TransID``) an accepted payment's account, amount and
        payer are recorded first (a ``LedgerError`` then refuses it: no money moves unless we
        kept what we accepted): its confirmation must name the same account
        (``_validation_contradiction``).
        """
        account = account_reference.strip()
        refusal: CustomerPaymentRefusal | None = None
        try:
            await self.quote(account, amount)
        except UnknownMeter:
            refusal = CustomerPaymentRefusal.UNKNOWN_ACCOUNT
        except TariffError:
            refusal = CustomerPaymentRefusal.AMOUNT_OUT_OF_RANGE
        except VendingError:
            refusal = CustomerPaymentRefusal.OTHER
        if refusal is None and reference is not None:
            await self._ledger.record_c2b_validation(
                provider=provider, trans_id=reference, account=account, amount=amount, payer=payer
            )
        return refusal

    async def _validation_contradiction(self, notice: PaymentNotice) -> str | None:
        """Why a C2B confirmation contradicts what its payment's validation said, else None.

        The account (meter) and the amount are the customer's, typed before money moved: a
        confirmation naming another is not this payment's (an exact copy front-running the
        genuine confirmation, say). No validation recorded (validation not enabled for the
        shortcode, or an older payment): nothing to compare (``docs/protocols.md`` §2.4).
        """
        validated = await self._ledger.c2b_validation(notice.provider, notice.reference)
        if validated is None:
            return None
        if validated.account != (notice.account_reference or "").strip():
            return "another account than the validated one"
        if notice.amount is not None and validated.amount != notice.amount:
            return "another amount than the validated one"
        return None

    def _matches(self, purchase: Purchase, status: PaymentStatus) -> tuple[bool, Money]:
        """Whether the provider's answer is exactly what we asked for, and the amount paid.

        A missing amount in a status answer is accepted only for a collection *we* requested
        (the prompt's amount is ours and the payer cannot change it); a customer-initiated
        payment must state its amount.
        """
        paid = status.amount
        if paid is None:
            if purchase.channel == CUSTOMER_INITIATED_CHANNEL:
                return False, Money(0, purchase.amount.currency)
            paid = purchase.amount
        payer_ok = status.payer is None or purchase.phone is None or status.payer == purchase.phone
        return paid == purchase.amount and payer_ok, paid

    async def confirm(
        self,
        purchase_id: str,
        *,
        claimed: PaymentState | None = None,
        claimed_receipt: str | None = None,
        record: PaymentStatus | None = None,
    ) -> Purchase:
        """Ask the provider what became of the purchase's payment, and act on its answer.

        Paid with the exact amount, currency and payer: PAID, then vended. Paid otherwise:
        REFUND_PENDING and a security event (never vends). A paybill purchase whose receipt the
        provider's record shows to be another payer's, amount's or an STK push's: PAYMENT_FAILED
        and the security event ``payment_claim_contradicted``; it takes nothing (the receipt
        stays free). Paid with a receipt that already pays for another purchase:
        REFUND_PENDING (an operator looks) and the security event ``payment_receipt_reused``,
        never vended; except a push our own query proved paid (STK Query), which is vended
        without the disputed receipt (the same event), never prompted again. Failed:
        PAYMENT_FAILED. Pending: unchanged. A success arriving after expiry still vends: money
        is never lost.

        ``claimed`` is what the callback that brought us here said: an answer of the provider
        that contradicts it (success against failure, either way), a provider that does not
        know the reference, or a failed customer-initiated payment (its confirmation said the
        money moved) is the security event ``payment_callback_contradicted``.

        The receipt on the vend and the token SMS comes from the provider's own records only:
        the status answer's, else (Daraja STK, whose query has none) a receipt a callback claimed
        (``claimed_receipt``, or the one kept with the payment) once the provider's record of it
        (``ReceiptVerifier``) shows this payment's amount and payer, and the kind of payment
        (a push's receipt for a push); else our purchase id.

        ``record`` is the provider's answer for the purchase's reference when the caller has
        just asked it (a paybill confirmation's check): it is not asked again.

        Raises:
            PaymentError: the provider could not answer (``ProviderUnavailable``, retryable).
            VendFailed: paid, but the token could not be made.
        """
        with structlog.contextvars.bound_contextvars(purchase_id=purchase_id):
            context = await self._ledger.vend_context(purchase_id)
            purchase = context.purchase
            if purchase.state in _SETTLED:
                if claimed_receipt is not None:
                    await self._late_receipt(context, claimed_receipt)
                return purchase
            if purchase.state is PurchaseState.PAID:
                outcome = await self._vend_locked(purchase_id, purchase.meter, payment=None)
                return outcome.purchase
            if purchase.provider_reference is None or purchase.state in {
                PurchaseState.REFUND_PENDING,
                PurchaseState.VEND_FAILED,
            }:
                return purchase
            provider = self._providers[purchase.provider]
            reference = purchase.provider_reference
            try:
                status = (
                    record
                    if record is not None and record.reference == reference
                    else await provider.query_status(ProviderReference(reference))
                )
            except ForgedCallback as exc:
                self._security_event(
                    "payment_callback_contradicted",
                    provider=provider.name,
                    reference=reference,
                    claimed=claimed.value if claimed else None,
                    answer="unknown to the provider",
                    reason=str(exc),
                )
                raise
            self._check_claim(purchase, claimed, status)
            if status.state is PaymentState.SUCCEEDED:
                return await self._on_success(context, status, claimed_receipt)
            if status.state in _FAILED_CLAIMS and purchase.state in {
                PurchaseState.CREATED,
                PurchaseState.AWAITING_PAYMENT,
            }:
                log.info("payment_failed", state=status.state.value, reason=status.reason)
                return await self._ledger.transition(
                    purchase_id,
                    PurchaseState.PAYMENT_FAILED,
                    kind="payment_failed",
                    actor=f"provider:{provider.name}",
                    data={"state": status.state.value, "reason": status.reason},
                )
            return purchase

    def _check_claim(
        self, purchase: Purchase, claimed: PaymentState | None, status: PaymentStatus
    ) -> None:
        """A security event when the provider's own answer contradicts what we were told."""
        if not status.state.is_final:
            return
        paid = status.state is PaymentState.SUCCEEDED
        if purchase.channel == CUSTOMER_INITIATED_CHANNEL and claimed is None:
            claimed = PaymentState.SUCCEEDED  # its confirmation said the money moved
        if claimed is None or not claimed.is_final or (claimed is PaymentState.SUCCEEDED) == paid:
            return
        self._security_event(
            "payment_callback_contradicted",
            provider=status.provider,
            reference=status.reference,
            claimed=claimed.value,
            answer=status.state.value,
            reason=status.reason,
            channel=purchase.channel,
        )

    async def _on_success(
        self, context: VendContext, status: PaymentStatus, claimed_receipt: str | None = None
    ) -> Purchase:
        purchase = context.purchase
        # Proven by our own query of our own request (STK Query: no receipt in the answer).
        own_query = status.receipt is None and status.reference == purchase.provider_reference
        if status.receipt is None:
            receipt = await self._proven_receipt(
                purchase, status.reference, (claimed_receipt, context.receipt)
            )
            status = replace(status, receipt=receipt)
        try:
            return await self._on_proven(context, status)
        except ReceiptReused as exc:
            if not own_query:
                return await self._receipt_reused(purchase, status, exc)
            # The provider said our own request was paid: only the receipt a callback named is
            # disputed. The purchase is paid and vended without it (never prompted again).
            data = {"provider": exc.provider, "receipt": exc.receipt, "reference": status.reference}
            self._security_event("payment_receipt_reused", **data)
            await self._ledger.append_event(
                purchase.purchase_id, "payment_receipt_reused", actor="saga", data=data
            )
            return await self._on_proven(context, replace(status, receipt=None))

    async def _late_receipt(self, context: VendContext, claimed: str) -> None:
        """A receipt claimed after the vend (the real callback behind a forged one, say).

        Once the provider's records prove it this payment's, it goes on the payment row, so
        that it can pay for nothing else (a second claim: ``payment_receipt_reused``).
        """
        purchase, vend = context.purchase, context.vend
        reference = purchase.provider_reference
        if reference is None or (vend is not None and vend.receipt == claimed):
            return
        proven = await self._proven_receipt(purchase, reference, (claimed,))
        if proven is None:
            return
        try:
            await self._ledger.prove_receipt(purchase.provider, reference, proven)
        except ReceiptReused as exc:
            data = {"provider": exc.provider, "receipt": exc.receipt, "reference": reference}
            self._security_event("payment_receipt_reused", **data)
            await self._ledger.append_event(
                purchase.purchase_id, "payment_receipt_reused", actor="saga", data=data
            )

    async def _proven_receipt(
        self, purchase: Purchase, reference: str, claims: Sequence[str | None]
    ) -> str | None:
        """A receipt callbacks claimed, as the provider's own record proves it; None if none.

        Each claim is looked up (``ReceiptVerifier``); one whose record is not a success of
        this purchase's amount and payer is the security event ``payment_receipt_unproven``. A
        lookup that fails leaves the claim unproven (the token goes out with our purchase id).
        """
        provider = self._providers.get(purchase.provider)
        if not isinstance(provider, ReceiptVerifier):
            return None
        for claimed in dict.fromkeys(c for c in claims if c):
            try:
                async with asyncio.timeout(self._policy.receipt_check_s):
                    record = await provider.verify_receipt(claimed)
            except (PaymentError, TimeoutError) as exc:
                log.warning("payment_receipt_unverified", receipt=claimed, error=repr(exc))
                continue
            customer = purchase.channel == CUSTOMER_INITIATED_CHANNEL
            if (
                record.state is PaymentState.SUCCEEDED
                and record.amount == purchase.amount
                and _claim_contradiction(record, purchase.amount, purchase.phone, customer=customer)
                is None
            ):
                return record.receipt or claimed
            self._security_event(
                "payment_receipt_unproven",
                provider=provider.name,
                reference=reference,
                receipt=claimed,
                answer=record.state.value,
                amount=str(record.amount) if record.amount else None,
            )
        return None

    async def _receipt_reused(
        self, purchase: Purchase, status: PaymentStatus, exc: ReceiptReused
    ) -> Purchase:
        """A proven receipt that already pays for another purchase: never vend; an operator."""
        data = {
            "provider": exc.provider,
            "receipt": exc.receipt,
            "reference": status.reference,
            "channel": purchase.channel,
        }
        self._security_event("payment_receipt_reused", **data)
        current = await self._ledger.get_purchase(purchase.purchase_id)
        if current.state is PurchaseState.REFUND_PENDING or current.state in _SETTLED:
            return current
        return await self._ledger.transition(
            purchase.purchase_id,
            PurchaseState.REFUND_PENDING,
            kind="payment_receipt_reused",
            actor="saga",
            data=data,
        )

    async def _on_proven(self, context: VendContext, status: PaymentStatus) -> Purchase:
        purchase = context.purchase
        if purchase.channel == CUSTOMER_INITIATED_CHANNEL:
            reason = _claim_contradiction(status, purchase.amount, purchase.phone, customer=True)
            if reason is not None:
                return await self._claim_contradicted(purchase, status, reason)
        matches, paid = self._matches(purchase, status)
        confirmed = ConfirmedPayment(
            provider=status.provider,
            reference=status.reference,
            amount=paid,
            payer=status.payer,
            # Only the provider's own records (the answer, or a verified claim: _on_success).
            receipt=status.receipt,
        )
        if not matches:
            log.warning(
                "payment_amount_mismatch",
                paid=str(paid),
                expected=str(purchase.amount),
                reference=status.reference,
            )
            return await self._ledger.mark_payment_mismatch(
                purchase.purchase_id, confirmed, expected=purchase.amount, actor="saga"
            )
        log.info("payment_confirmed", reference=status.reference, receipt=confirmed.receipt)
        outcome = await self._vend_locked(
            purchase.purchase_id, purchase.meter, payment=confirmed, context=context
        )
        if not outcome.replayed and self._observer is not None:
            # Requested when it became AWAITING_PAYMENT (its last update before the proof);
            # a customer-initiated payment was requested when it was opened.
            requested = (
                purchase.updated_at
                if purchase.state is PurchaseState.AWAITING_PAYMENT
                else purchase.created_at
            )
            seconds = max(0.0, (self._clock() - requested).total_seconds())
            self._observe(self._observer.payment_confirmed, seconds)
        return outcome.purchase

    async def _claim_contradicted(
        self, purchase: Purchase, status: PaymentStatus, reason: str
    ) -> Purchase:
        """A paybill purchase the provider's record contradicts: it takes nothing, never vends.

        PAYMENT_FAILED (an operator sees it: its confirmation said money moved), the payment
        row untouched (the receipt stays free), and the security event
        ``payment_claim_contradicted``.
        """
        data = {
            "provider": status.provider,
            "reference": status.reference,
            "account": purchase.meter,
            "reason": reason,
        }
        self._security_event("payment_claim_contradicted", **data)
        if purchase.state not in {PurchaseState.CREATED, PurchaseState.AWAITING_PAYMENT}:
            await self._ledger.append_event(
                purchase.purchase_id, "payment_claim_contradicted", actor="saga", data=data
            )
            return await self._ledger.get_purchase(purchase.purchase_id)
        return await self._ledger.transition(
            purchase.purchase_id,
            PurchaseState.PAYMENT_FAILED,
            kind="payment_claim_contradicted",
            actor="saga",
            data=data,
        )

    @staticmethod
    def _observe(report: Callable[[float], None], seconds: float) -> None:
        try:
            report(seconds)
        except Exception as exc:  # noqa: BLE001 - metrics must never break a purchase
            log.warning("saga_observer_failed", error=f"{type(exc).__name__}: {exc}")

    def _security_event(self, kind: str, **fields: object) -> None:
        """Log ``kind`` as a security event (``security_event=True``) and count it."""
        log.warning(kind, security_event=True, **fields)
        report = getattr(self._observer, "security_event", None)
        if report is not None:
            try:
                report(kind)
            except Exception as exc:  # noqa: BLE001 - metrics must never break a purchase
                log.warning("saga_observer_failed", error=f"{type(exc).__name__}: {exc}")

    async def check_payment(self, purchase_id: str) -> Purchase:
        """The sweeper's step for a purchase awaiting payment past its check time.

        Retries a collection that never started; otherwise asks the provider. A push whose
        outcome a crash left unknown is looked up in the provider's list of payments once the
        prompt's lifetime has passed (``reconcile_unknown_collection``); while that lookup fails
        or is ambiguous the purchase never expires. Still unpaid past the payment deadline:
        EXPIRED. Otherwise the next check is due ``check_interval_s`` later (a deferred request
        backs off; an ambiguous lookup waits ``ambiguous_recheck_s``). Provider errors are
        absorbed here (they only reschedule).
        """
        with structlog.contextvars.bound_contextvars(purchase_id=purchase_id):
            purchase = await self._ledger.get_purchase(purchase_id)
            if purchase.state not in {PurchaseState.CREATED, PurchaseState.AWAITING_PAYMENT}:
                return purchase
            if purchase.channel == VENDOR_CHANNEL:
                # A vendor sale is paid from its float with its vend, or never: one still open
                # at its check time was abandoned (no money moved); it is closed.
                return await self._ledger.transition(
                    purchase_id,
                    PurchaseState.EXPIRED,
                    kind="vendor_sale_abandoned",
                    actor="sweeper",
                    data={},
                )
            if purchase.provider_reference is None:
                purchase = await self.request_payment(purchase_id)
                try:
                    reconciled = await self._unknown.reconcile_unknown_collection(purchase)
                except PaymentError as exc:
                    # Unknown whether money moved: never expire it on this check.
                    log.warning("unknown_collection_lookup_failed", error=str(exc))
                    attempts = purchase.check_attempts + 1
                    await self._ledger.schedule_check(
                        purchase_id, at=self._clock() + self._check_interval(), attempts=attempts
                    )
                    return await self._ledger.get_purchase(purchase_id)
                if reconciled is not None:
                    purchase = reconciled
                    if await self._ambiguous(purchase):
                        attempts = purchase.check_attempts + 1
                        await self._ledger.schedule_check(
                            purchase_id,
                            at=self._clock() + timedelta(seconds=self._policy.ambiguous_recheck_s),
                            attempts=attempts,
                        )
                        return await self._ledger.get_purchase(purchase_id)
            else:
                try:
                    purchase = await self.confirm(purchase_id)
                except PaymentError as exc:
                    log.warning("payment_check_failed", error=str(exc), retryable=exc.retryable)
            return await self._expire_or_schedule(purchase)

    async def _expire_or_schedule(self, purchase: Purchase) -> Purchase:
        """After a check: EXPIRED past the deadline, else the next check (unless just scheduled)."""
        purchase_id = purchase.purchase_id
        if purchase.state in {PurchaseState.CREATED, PurchaseState.AWAITING_PAYMENT}:
            now = self._clock()
            deadline = purchase.created_at + timedelta(seconds=self._policy.payment_expiry_s)
            if now >= deadline:
                log.info("purchase_expired")
                return await self._ledger.transition(
                    purchase_id,
                    PurchaseState.EXPIRED,
                    kind="purchase_expired",
                    actor="sweeper",
                    data={"deadline": deadline.isoformat()},
                )
            # Unless this step scheduled the next check already: a request just sent (its first
            # check) or deferred (its backoff).
            if purchase.next_check_at is None or purchase.next_check_at <= now:
                await self._ledger.schedule_check(
                    purchase_id,
                    at=min(deadline, now + self._check_interval()),
                    attempts=purchase.check_attempts + 1,
                )
                purchase = await self._ledger.get_purchase(purchase_id)
        return purchase

    async def _ambiguous(self, purchase: Purchase) -> bool:
        """Whether a still-unpaid purchase waits for an operator (an ambiguous reconciliation)."""
        if purchase.state is not PurchaseState.CREATED:
            return False
        timeline = await self._ledger.timeline(purchase.purchase_id)
        return bool(timeline) and timeline[-1].kind == UNKNOWN_COLLECTION_AMBIGUOUS

    # -- vending --------------------------------------------------------------------------------

    def _meter_lock(self, meter: str) -> asyncio.Lock:
        lock = self._meter_locks.get(meter)
        if lock is None:
            lock = asyncio.Lock()
            self._meter_locks[meter] = lock
        return lock

    async def vend(self, purchase_id: str) -> Vend:
        """Make and store the purchase's token, once: TID, token, vend, SMS and events together.

        A purchase that has its vend returns it (nothing new is queued). Safe to call any number
        of times, concurrently.

        Raises:
            NotPaid: the purchase is not paid.
            VendFailed: the engine refused (unknown key, TID range ended, bad meter data): the
                purchase is now VEND_FAILED.
        """
        with structlog.contextvars.bound_contextvars(purchase_id=purchase_id):
            context = await self._ledger.vend_context(purchase_id)
            if context.vend is not None:
                return context.vend
            outcome = await self._vend_locked(purchase_id, context.purchase.meter, payment=None)
            return outcome.vend

    async def vend_from_float(self, purchase_id: str, debit: FloatDebit) -> VendOutcome:
        """A vendor sale's vend: the float's debit, the vend and its tokens in one transaction.

        A purchase that has its vend returns it (``replayed``): never a second debit.

        Raises:
            InsufficientFloat, VendorSuspended: refused, nothing written (the purchase stays
                CREATED: the same sale may be tried again).
            VendFailed: the engine refused (nothing debited).
        """
        with structlog.contextvars.bound_contextvars(purchase_id=purchase_id):
            context = await self._ledger.vend_context(purchase_id)
            if context.vend is not None:
                return VendOutcome(vend=context.vend, replayed=True, purchase=context.purchase)
            return await self._vend_locked(
                purchase_id, context.purchase.meter, payment=None, float_debit=debit
            )

    async def _vend_locked(
        self,
        purchase_id: str,
        meter: str,
        *,
        payment: ConfirmedPayment | None,
        context: VendContext | None = None,
        float_debit: FloatDebit | None = None,
    ) -> VendOutcome:
        """The vend step under the meter's lock; with ``payment``, paid and vended at once.

        With ``float_debit`` (a vendor sale), the vendor's float pays in the vend's transaction.

        The lock serialises this process's vends per meter; the ledger's compare-and-set on the
        meter's last TID guards against other writers (and against ``context`` having gone
        stale while the lock was awaited): a conflict is read again and retried.
        """
        started = time.perf_counter()
        lock = self._meter_lock(meter)
        if lock.locked():
            context = None  # another vend of this meter goes first: its TID makes ours stale
        async with lock:
            stored = self._stored_tids.get(meter)
            if (
                context is not None
                and stored is not None
                and (context.meter.last_tid or 0) < stored
            ):
                context = None  # read before this process's last vend of the meter: stale
            for attempt in range(self._policy.vend_attempts):
                try:
                    outcome = await self._vend_once(purchase_id, payment, context, float_debit)
                except TidConflict as exc:
                    # Another writer (another process) took the meter's next TID: read again.
                    # A short jittered pause breaks the symmetry between two retrying writers.
                    log.info("vend_tid_conflict", meter=exc.meter, attempt=attempt)
                    self.tid_conflicts += 1
                    context = None
                    await asyncio.sleep(random.random() * 0.002 * (attempt + 1))
                else:
                    if not outcome.replayed:
                        self._remember_tid(meter, outcome.vend)
                        if self._observer is not None:
                            self._observe(self._observer.vended, time.perf_counter() - started)
                    return outcome
            raise LedgerError(
                f"purchase {purchase_id}: the meter's TID kept moving during"
                f" {self._policy.vend_attempts} attempts",
                retryable=True,
            )

    def _remember_tid(self, meter: str, vend: Vend) -> None:
        if len(self._stored_tids) >= _STORED_TIDS and meter not in self._stored_tids:
            self._stored_tids.pop(next(iter(self._stored_tids)))
        self._stored_tids[meter] = vend.tid

    async def _vend_once(
        self,
        purchase_id: str,
        payment: ConfirmedPayment | None,
        context: VendContext | None,
        float_debit: FloatDebit | None = None,
    ) -> VendOutcome:
        if context is None:
            context = await self._ledger.vend_context(purchase_id)
        purchase, meter = context.purchase, context.meter
        if context.vend is not None:
            return VendOutcome(vend=context.vend, replayed=True, purchase=purchase)
        if (payment is None and float_debit is None) and purchase.state not in {
            PurchaseState.PAID,
            PurchaseState.VEND_FAILED,
        }:
            raise NotPaid(purchase_id, purchase.state)
        if meter.status is MeterStatus.BLOCKED:
            raise await self._vend_failed(purchase, payment, f"meter {meter.drn} is blocked")
        change = context.key_change
        if change is not None and not change.is_from(meter):
            log.warning("key_change_stale", meter=meter.drn, change_id=change.change_id)
            change = None
        units, recovered, balance = await self._debt_step(purchase)
        units = _carried_units(units)
        # Only a receipt the provider's records proved (the payment's): never a callback's claim.
        proven = payment.receipt if payment else await self._confirmed_receipt(purchase)
        receipt = proven or purchase.purchase_id
        currency = purchase.amount.currency
        # The month's free basic electricity rides on this vend: not on a key change's, nor on
        # one with no phone to send it to (its SMS would be held, and nothing reprints it), nor on
        # a vendor's sale (its answer carries the tokens it paid for, see the vendor API).
        fbe_possible = purchase.phone is not None and not float_debit

        def message(token: str, kcts: tuple[str, ...]) -> str:
            return token_message(
                token=token,
                units=units,
                amount=purchase.amount,
                meter=purchase.meter,
                receipt=receipt,
                language=context.language or "en",
                key_change_tokens=kcts,
                debt_recovered=Money(recovered, currency) if balance is not None else None,
                debt_remaining=(
                    Money(balance - recovered, currency) if balance is not None else None
                ),
            )

        draft = VendDraft(
            purchase_id=purchase.purchase_id,
            meter=purchase.meter,
            tid=0,
            expected_last_tid=None,
            token="",
            units=units,
            receipt=receipt,
            recipient=purchase.phone,
            message="",
            debt_recovery_minor=recovered,
            expected_debt_balance_minor=balance,
            float_debit=float_debit,
        )
        if self._ledger.mints_under_lock and change is None:
            outcome, fbe = await self._record_minted(
                context, draft, payment, message, fbe_possible=fbe_possible
            )
        else:
            tid, token, kcts = await self._make_tokens(context, change, payment, units)
            fbe = None if kcts or not fbe_possible else await self._fbe_step(context, tid)
            outcome = await self._ledger.record_vend(
                replace(
                    draft,
                    tid=tid,
                    expected_last_tid=meter.last_tid,
                    token=token,
                    message=message(token, kcts),
                    key_change_id=change.change_id if change is not None and kcts else None,
                    key_change_tokens=kcts,
                    fbe=fbe,
                ),
                actor="saga",
                payment=payment,
            )
        tid = outcome.vend.tid
        kcts = outcome.vend.key_change_tokens
        if not outcome.replayed:
            log.info(
                "token_vended",
                meter=purchase.meter,
                tid=tid,
                units=units,
                token=outcome.vend.masked_token,
                key_change_tokens=len(kcts),
                debt_recovered=recovered,
                fbe_units=fbe.units if fbe is not None else 0,
            )
            if purchase.phone is None and float_debit is None:
                # C2B with a masked MSISDN: the message is HELD for an operator (never retried),
                # the token stays for reprint.
                log.warning(
                    "token_held_no_recipient", meter=purchase.meter, channel=purchase.channel
                )
                await self._ledger.append_event(
                    purchase.purchase_id,
                    "token_held_no_recipient",
                    actor="saga",
                    data={"reason": "the payment named no phone number (masked MSISDN)"},
                )
        return outcome

    async def _record_minted(
        self,
        context: VendContext,
        draft: VendDraft,
        payment: ConfirmedPayment | None,
        message: Callable[[str, tuple[str, ...]], str],
        *,
        fbe_possible: bool,
    ) -> tuple[VendOutcome, FbeDraft | None]:
        """The vend with its tokens made under the meter's row lock; the FBE token it carried.

        The TID is taken from the meter's row, locked in the vend's own transaction
        (PostgreSQL): instances vending for one meter take turns and never conflict.
        """
        fbe_units = await self._fbe_units_due(context) if fbe_possible else (0, "")
        minted: list[Minted] = []  # the last one is what committed (a retry mints again)

        async def mint(locked: MeterRecord) -> Minted:
            tid, token = await self._credit_token(locked, draft.units)
            fbe = await self._fbe_token(context, locked, tid, *fbe_units)
            minted.append(Minted(tid=tid, token=token, message=message(token, ()), fbe=fbe))
            return minted[-1]

        try:
            outcome = await self._ledger.record_vend(
                replace(draft, mint=mint), actor="saga", payment=payment
            )
        except StsError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise await self._vend_failed(context.purchase, payment, reason) from exc
        return outcome, minted[-1].fbe if minted and not outcome.replayed else None

    async def _debt_step(self, purchase: Purchase) -> tuple[int, int, int | None]:
        """The units to vend, the debt recovery and the debt balance it is taken from.

        The quote planned ``purchase.debt_recovery_minor``; the vend never recovers more than the
        meter owes now. Should the debt have shrunk since (cleared, or recovered by another
        purchase), the money not recovered buys energy: the purchase is priced again under its
        tariff, and never gets fewer units than its quote promised (the tariff may have changed
        since: a dearer price, or one under which the amount buys nothing, still vends what was
        quoted and paid for). The balance is None when nothing was planned (the meter owed nothing).
        """
        planned = purchase.debt_recovery_minor
        if planned <= 0:
            return purchase.units, 0, None
        debt = await self._ledger.get_debt(purchase.meter)
        same_currency = debt is not None and debt.balance.currency == purchase.amount.currency
        balance = debt.balance.amount_minor if debt is not None and same_currency else 0
        recovered = min(planned, balance)
        if recovered == planned:
            return purchase.units, recovered, balance
        tariff = await self._ledger.get_tariff(purchase.tariff_id)
        repriced = 0
        try:
            if tariff.currency == purchase.amount.currency:  # else the quote is all there is
                repriced = price(
                    tariff,
                    purchase.amount,
                    debt_recovered_minor=recovered,
                    debt_balance_minor=balance,
                ).units
        except TariffError as exc:  # the tariff changed so much the amount buys nothing now
            log.warning("debt_repricing_refused", reason=str(exc))
        units = max(purchase.units, repriced)
        log.info("debt_recovery_reduced", planned=planned, recovered=recovered, units=units)
        return units, recovered, balance

    async def _fbe_step(self, context: VendContext, credit_tid: int) -> FbeDraft | None:
        """The month's free basic electricity token, when the meter has it due; else None.

        Its TID follows the credit token's. An engine refusal leaves the FBE for a later vend.
        """
        units, month = await self._fbe_units_due(context)
        return await self._fbe_token(context, context.meter, credit_tid, units, month)

    async def _fbe_units_due(self, context: VendContext) -> tuple[int, str]:
        """The free units the meter has due this month (0: none), and the month (YYYY-MM)."""
        month = self._clock().astimezone(self._fbe_zone).strftime("%Y-%m")
        if context.fbe_allowance <= 0:  # its tariff grants none: nothing to read
            return 0, month
        return max(0, await self._ledger.fbe_due(context.meter.drn, month)), month

    async def _credit_token(self, meter: MeterRecord, units: int) -> tuple[int, str]:
        """The TID after the meter's last and the credit token for ``units`` (raises StsError)."""
        tid = next_tid(self._clock(), meter.base_date, meter.last_tid)
        token = await self._engine.credit_token(self._profile(meter), units, tid)
        return tid, token.digits

    async def _fbe_token(
        self, context: VendContext, meter: MeterRecord, credit_tid: int, units: int, month: str
    ) -> FbeDraft | None:
        """The FBE token for ``units`` (none when 0), its TID after ``credit_tid``."""
        if units <= 0:
            return None
        try:
            tid = next_tid(self._clock(), meter.base_date, credit_tid)
            token = await self._engine.credit_token(self._profile(meter), units, tid)
        except StsError as exc:
            log.warning("fbe_deferred", meter=meter.drn, month=month, reason=str(exc))
            return None
        return FbeDraft(
            month=month,
            tid=tid,
            token=token.digits,
            units=units,
            message=fbe_message(
                token=token.digits,
                units=units,
                month=month,
                meter=meter.drn,
                language=context.language or "en",
            ),
        )

    async def _confirmed_receipt(self, purchase: Purchase) -> str | None:
        """The receipt the purchase's payment confirmation proved (its ``payment_confirmed``)."""
        for event in reversed(await self._ledger.timeline(purchase.purchase_id)):
            if event.kind == "payment_confirmed":
                receipt = event.data.get("receipt")
                return receipt if isinstance(receipt, str) and receipt else None
        return None

    async def _make_tokens(
        self,
        context: VendContext,
        change: KeyChange | None,
        payment: ConfirmedPayment | None,
        units: int,
    ) -> tuple[int, str, tuple[str, ...]]:
        """The TID, the credit token for ``units`` and the key-change tokens (none without one).

        With a pending key change, the key-change set is made under the meter's current key and
        the credit token under the new one, with a TID counted from the new base date (from
        scratch on a rollover: the meter clears its TID store). Should the key change be
        impossible now (the new key is not loaded yet), the credit token is made under the
        current key and the change stays pending for a later purchase.

        Raises:
            VendFailed: no token can be made (the purchase is VEND_FAILED).
        """
        purchase, meter = context.purchase, context.meter
        reasons: list[str] = []
        if change is not None:
            try:
                new_meter = change.applied_to(meter)
                new_profile = self._profile(new_meter)
                kcts = await self._engine.key_change_tokens(self._profile(meter), new_profile)
                last_tid = None if change.rollover else meter.last_tid
                tid = next_tid(self._clock(), new_meter.base_date, last_tid)
                token = await self._engine.credit_token(new_profile, units, tid)
            except StsError as exc:
                reason = f"key change {change.change_id}: {type(exc).__name__}: {exc}"
                reasons.append(reason)
                log.warning("key_change_deferred", meter=meter.drn, reason=reason)
            else:
                return tid, token.digits, tuple(_digits(kcts))
        try:
            tid, token_digits = await self._credit_token(meter, units)
        except StsError as exc:
            reasons.append(f"{type(exc).__name__}: {exc}")
            raise await self._vend_failed(purchase, payment, "; ".join(reasons)) from exc
        return tid, token_digits, ()

    def _profile(self, meter: MeterRecord) -> MeterProfile:
        """The engine's view of the meter, validated once per set of key attributes."""
        key = (
            meter.drn, meter.iin, meter.sgc, meter.tariff_index, meter.krn, meter.key_type,
            meter.base_date, meter.ea, meter.dkga, meter.ken,
        )  # fmt: skip
        profile = self._profiles.get(key)
        if profile is None:
            profile = MeterProfile(
                drn=meter.drn,
                iin=meter.iin,
                sgc=meter.sgc,
                tariff_index=meter.tariff_index,
                krn=meter.krn,
                key_type=meter.key_type,
                base_date=meter.base_date,
                ea=meter.ea,
                dkga=meter.dkga,
                ken=meter.ken,
            )
            if len(self._profiles) >= _PROFILE_CACHE:
                self._profiles.pop(next(iter(self._profiles)))
            self._profiles[key] = profile
        return profile

    async def _vend_failed(
        self, purchase: Purchase, payment: ConfirmedPayment | None, reason: str
    ) -> VendFailed:
        """Record that the token could not be made (paid first, then VEND_FAILED)."""
        state = purchase.state
        if payment is not None:
            state = (
                await self._ledger.mark_paid(purchase.purchase_id, payment, actor="saga")
            ).state
        if state is PurchaseState.PAID:
            await self._ledger.transition(
                purchase.purchase_id,
                PurchaseState.VEND_FAILED,
                kind="vend_failed",
                actor="saga",
                data={"reason": reason},
            )
        log.error("vend_failed", meter=purchase.meter, reason=reason)
        return VendFailed(purchase.purchase_id, reason)

    # -- operator and channel surface -----------------------------------------------------------

    async def reprint(self, purchase_id: str, *, actor: str = "operator") -> OutboxMessage:
        """Send the purchase's token again: the same token, never a new one.

        Raises:
            NothingToReprint: the purchase has no token (not paid, or not vended yet).
            NotFound: no such purchase.
        """
        return await reprint_token(self._ledger, purchase_id, actor=actor)

    async def last_token(self, phone: Msisdn, meter: str | None = None) -> Vend | None:
        """The newest token bought from ``phone`` (for ``meter`` if given), or None."""
        return await self._ledger.last_vend(phone, meter)

    async def finish_paid(self, *, limit: int = 100, lease_s: float = RECOVERY_LEASE_S) -> int:
        """Vend every paid-but-not-vended purchase (recovery); returns how many were vended.

        Each is claimed for ``lease_s`` first, so the sweepers of several workers and instances
        share the recovery instead of all trying the same purchases; one whose vend failed
        comes back when its lease lapses.
        """
        done = 0
        now = self._clock()
        lease_until = now + timedelta(seconds=lease_s)
        claimed = await self._ledger.claim_paid_not_vended(
            now, lease_until=lease_until, limit=limit
        )
        for purchase in claimed:
            try:
                await self.vend(purchase.purchase_id)
            except (VendingError, LedgerError, IllegalTransition) as exc:
                log.warning(
                    "recovery_vend_failed", purchase_id=purchase.purchase_id, error=str(exc)
                )
            else:
                done += 1
        return done


def _digits(tokens: Sequence[Token]) -> list[str]:
    return [token.digits for token in tokens]


async def reprint_token(ledger: SagaLedger, purchase_id: str, *, actor: str) -> OutboxMessage:
    """Queue the purchase's stored token again (XMLVend reprint): the same token, never a new one.

    Needs only the ledger, so the operator CLI can use it; the running outbox worker sends it.

    Raises:
        NothingToReprint: the purchase has no token (not paid, or not vended yet).
        NotFound: no such purchase.
    """
    with structlog.contextvars.bound_contextvars(purchase_id=purchase_id):
        context = await ledger.vend_context(purchase_id)
        purchase, vend = context.purchase, context.vend
        if vend is None:
            raise NothingToReprint(f"purchase {purchase_id} is {purchase.state}: no token yet")
        recovery = (
            await ledger.get_debt_recovery(purchase_id) if purchase.debt_recovery_minor else None
        )
        text = token_message(
            token=vend.token,
            units=vend.units,
            amount=purchase.amount,
            meter=vend.meter,
            receipt=vend.receipt or purchase.purchase_id,
            language=context.language or "en",
            key_change_tokens=vend.key_change_tokens,
            debt_recovered=recovery.amount if recovery is not None else None,
            debt_remaining=recovery.balance_after if recovery is not None else None,
        )
        message = await ledger.enqueue_message(
            purchase_id, kind=MessageKind.REPRINT, recipient=purchase.phone, body=text, actor=actor
        )
        log.info("token_reprinted", token=vend.masked_token, actor=actor)
        return message
