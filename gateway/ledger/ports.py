"""The ledger's ports, one per role: each caller depends on the slice of the ledger it uses.

```
SagaLedger       gateway/vending.py            the purchase saga: every state change, the vend
PaymentChecks    gateway/sweeper.py            which purchases are due for a payment check
CustomerLedger   gateway/customer_services.py  meters, saved meters, language, replies
OutboxLedger     gateway/sms/outbox.py         claim, send, retry, fail, delivery reports
StatusQueries    gateway/payments/daraja.py    Transaction Status queries and their results
OperatorReads    gateway/web/admin.py          what the operator page shows of a purchase
LedgerStats      gateway/metrics.py            the gauges read at scrape time
Registry         gateway/commands/             tariffs, meters, keys, key rotations, reports
Ledger           gateway/app.py                every role: what a backend provides
```

The roles share two small ones: ``PurchaseReads`` (a purchase, its payment, events and debt
recovery: the saga and the operator page) and ``MessageQueue`` (an SMS queued now: the saga's
reprints, the customer services' replies).

Meters and phones are typed (``MeterNumber``, ``Msisdn``: two digit strings that must never
swap). Purchase ids are taken as ``str`` where the saga and the operator pages hand over ids
they received as text; every record returns a ``PurchaseId``.

Every method is one transaction and safe to retry. Raises (every method): ``LedgerUnavailable``
when the database cannot take the operation now (nothing was written); other ``LedgerError``s as
stated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date, datetime
from typing import Any, Protocol

from gateway.ledger.base import (
    C2bValidation,
    ConfirmedPayment,
    DebtRecovery,
    Event,
    FbeIssue,
    KeyChange,
    KeyRotation,
    MessageKind,
    MeterDebt,
    MeterInfo,
    MeterNumber,
    MeterRecord,
    NoticeOutcome,
    NoticeRecord,
    OutboxMessage,
    OutboxStats,
    PaymentRecord,
    PendingClaim,
    Purchase,
    PurchaseDraft,
    PurchaseState,
    ReportRow,
    SavedMeter,
    SealedVendingKey,
    Vend,
    VendContext,
    VendDraft,
    VendOutcome,
)
from gateway.money import Money
from gateway.phone import Msisdn
from gateway.tariff import Tariff
from gateway.values.messages import DeliveryReport, DeliveryState


class PaymentChecks(Protocol):
    """Which purchases are due for a payment check (the sweeper's one read)."""

    async def due_for_check(self, now: datetime, *, limit: int = 100) -> list[Purchase]:
        """CREATED or AWAITING_PAYMENT purchases whose next status check is due."""
        ...

    async def claim_due_checks(
        self, now: datetime, *, lease_until: datetime, limit: int = 100
    ) -> list[Purchase]:
        """Claim purchases due for a check until ``lease_until`` (disjoint among claimers)."""
        ...


class PurchaseReads(Protocol):
    """A purchase and what became of it: its payment, its events, its debt recovery."""

    async def get_purchase(self, purchase_id: str) -> Purchase:
        """The purchase. Raises ``NotFound``."""
        ...

    async def find_purchases(
        self,
        *,
        phone: str | None = None,
        meter: str | None = None,
        states: Sequence[PurchaseState] | None = None,
        limit: int = 20,
    ) -> list[Purchase]:
        """Purchases matching every given filter, newest first."""
        ...

    async def get_payment(self, provider: str, reference: str) -> PaymentRecord | None:
        """The payment row for (provider, reference), if any."""
        ...

    async def timeline(self, purchase_id: str) -> list[Event]:
        """The purchase's events, oldest first."""
        ...

    async def get_debt_recovery(self, purchase_id: str) -> DebtRecovery | None:
        """What the purchase's vend recovered, if anything."""
        ...


class MessageQueue(Protocol):
    """Queue an SMS now (reprints, replies); token messages are queued by the vend."""

    async def enqueue_message(
        self,
        purchase_id: str | None,
        *,
        kind: MessageKind,
        recipient: Msisdn | None,
        body: str,
        actor: str,
    ) -> OutboxMessage:
        """Queue an SMS now; a ``HELD`` one when there is no recipient."""
        ...


class SagaLedger(PaymentChecks, PurchaseReads, MessageQueue, Protocol):
    """What the purchase saga reads and writes: the only caller of the transition methods.

    The saga also schedules the checks the sweeper finds (``PaymentChecks``).
    """

    @property
    def mints_under_lock(self) -> bool:
        """Whether ``record_vend`` takes a ``VendDraft.mint`` (tokens made under the meter lock)."""
        ...

    async def get_meter(self, drn: str) -> MeterRecord:
        """The meter with everything the token engine needs. Raises ``NotFound``."""
        ...

    async def get_tariff(self, tariff_id: str) -> Tariff:
        """The tariff. Raises ``NotFound``."""
        ...

    async def vending_keys(self) -> list[SealedVendingKey]:
        """Every sealed vending key."""
        ...

    async def open_purchase(self, draft: PurchaseDraft, *, actor: str) -> Purchase:
        """Open a purchase in CREATED; the same idempotency key returns the same purchase.

        Raises:
            IdempotencyConflict: the key was used for another phone, meter or amount.
            NotFound: the meter or tariff does not exist.
        """
        ...

    async def transition(
        self,
        purchase_id: str,
        to: PurchaseState,
        *,
        kind: str,
        actor: str,
        data: Mapping[str, Any] | None = None,
    ) -> Purchase:
        """Move a purchase to ``to`` and append the event ``kind``, in one transaction.

        Already in ``to``: returns it unchanged and appends nothing (a retry is harmless).

        Raises:
            IllegalTransition: ``TRANSITIONS`` forbids the move from the current state.
            NotFound: no such purchase.
        """
        ...

    async def attach_payment(
        self, purchase_id: str, *, provider: str, reference: str, actor: str
    ) -> Purchase:
        """Record that the provider accepted the collection. Idempotent.

        Writes the pending payment row, the reference on the purchase, and CREATED →
        AWAITING_PAYMENT.

        Raises:
            DuplicateError: the reference already belongs to another purchase.
        """
        ...

    async def record_notice(self, notice: NoticeRecord, *, actor: str) -> NoticeOutcome:
        """Keep a callback's claim (raw body and its hash) and say which purchase it concerns.

        A reference never seen creates a pending payment row with no purchase. Appends a
        ``payment_notice`` event (or ``notice_payload_conflict`` when the body differs from the
        first one seen for that reference).
        """
        ...

    async def record_c2b_validation(
        self, *, provider: str, trans_id: str, account: str, amount: Money, payer: Msisdn | None
    ) -> None:
        """Keep what a C2B validation request said of a payment (the first one per ``trans_id``).

        Kept ``C2B_VALIDATION_KEEP_S``; older ones are dropped in the same write.
        """
        ...

    async def c2b_validation(self, provider: str, trans_id: str) -> C2bValidation | None:
        """What the C2B validation of ``trans_id`` said, if one was recorded."""
        ...

    async def claim_finished(self, provider: str, reference: str) -> None:
        """A pending customer claim (``NoticeRecord.pending_claim``) was carried through."""
        ...

    async def take_pending_claims(self, *, limit: int = 100) -> list[PendingClaim]:
        """Pending claims whose lease passed (a crash left them), each leased again.

        Instances share them: a claim taken is not due again for ``PENDING_CLAIM_LEASE_S``.
        """
        ...

    async def mark_paid(
        self, purchase_id: str, payment: ConfirmedPayment, *, actor: str
    ) -> Purchase:
        """A proven payment: payment row SUCCEEDED and the purchase PAID, one transaction.

        Already PAID, VENDED, DELIVERED or VEND_FAILED: unchanged, nothing appended.

        Raises:
            IllegalTransition: the purchase is in a state that cannot become paid.
        """
        ...

    async def mark_payment_mismatch(
        self, purchase_id: str, payment: ConfirmedPayment, *, expected: Money, actor: str
    ) -> Purchase:
        """A proven payment of the wrong amount, currency or payer. Never vends.

        The payment row becomes MISMATCHED, the purchase REFUND_PENDING, and a security event
        ``amount_mismatch`` is appended.
        """
        ...

    async def prove_receipt(self, provider: str, reference: str, receipt: str) -> None:
        """Record ``receipt`` as the one the provider's records prove for a confirmed payment.

        It replaces whatever receipt a callback claimed for that payment row.

        Raises:
            ReceiptReused: the receipt already proves another payment.
            NotFound: no payment row for (provider, reference).
        """
        ...

    async def schedule_check(self, purchase_id: str, *, at: datetime, attempts: int) -> None:
        """When the sweeper should next ask the provider about this purchase (ends its lease)."""
        ...

    async def paid_not_vended(self, *, limit: int = 100) -> list[Purchase]:
        """PAID purchases without a vend, oldest first (the sweeper finishes them)."""
        ...

    async def claim_paid_not_vended(
        self, now: datetime, *, lease_until: datetime, limit: int = 100
    ) -> list[Purchase]:
        """Claim PAID purchases without a vend until ``lease_until`` (disjoint among claimers)."""
        ...

    async def vend_context(self, purchase_id: str) -> VendContext:
        """The purchase, its meter, vend, receipt and language in one read. Raises ``NotFound``."""
        ...

    async def record_vend(
        self, draft: VendDraft, *, actor: str, payment: ConfirmedPayment | None = None
    ) -> VendOutcome:
        """Store a vend in one transaction.

        With ``payment``, the purchase is first recorded paid exactly as ``mark_paid`` does, in
        the same transaction (a proven payment and its token become durable together). Then the
        meter's TID advances (compare-and-set on ``expected_last_tid``), the vend row is
        inserted, PAID → VENDED, the token message goes to the outbox, ``token_vended`` is
        appended.

        With ``draft.key_change_id``, the same transaction applies the meter's pending key change:
        the meter row takes the new key's attributes, ``last_tid`` becomes the draft's TID
        (counted from the new base date: on a rollover it may be lower than the old one), the
        change becomes APPLIED for this purchase, the vend keeps the key-change tokens, and
        ``key_changed`` is appended.

        With ``draft.debt_recovery_minor``, the same transaction takes it off the meter's debt
        (compare-and-set on ``expected_debt_balance_minor``), writes the purchase's
        ``debt_recoveries`` row and appends ``debt_recovered``. With ``draft.fbe``, it stores the
        FBE token (UNIQUE (meter, month)), advances ``last_tid`` to its TID, queues its message
        (kind ``fbe``) and appends ``fbe_issued``.

        A purchase that has its vend already: returns it with ``replayed=True``, writes nothing
        (so a replay never recovers debt or issues FBE again).

        Raises:
            TidConflict: the meter's last TID moved, or the key change is no longer pending: read
                it again, make new tokens, retry. ``VendConflict`` (a ``TidConflict``): the debt
                balance moved, or the month's FBE was issued meanwhile.
            IllegalTransition: the purchase is not PAID (or VEND_FAILED), and ``payment`` cannot
                make it so.
        """
        ...

    async def last_vend(self, phone: Msisdn, meter: str | None = None) -> Vend | None:
        """The newest vend bought from ``phone`` (for ``meter`` if given)."""
        ...

    async def get_debt(self, meter: str) -> MeterDebt | None:
        """The meter's debt account, if it ever had one (a cleared debt has balance 0)."""
        ...

    async def fbe_due(self, meter: str, month: str) -> int:
        """The FBE units the meter may still get in ``month`` (YYYY-MM): 0 if issued or none."""
        ...

    async def append_event(
        self,
        purchase_id: str | None,
        kind: str,
        *,
        actor: str,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Append an audit event (security events may have no purchase)."""
        ...


class OutboxLedger(Protocol):
    """What the outbox worker needs: the messages it sends and what became of them."""

    async def claim_outbox(
        self, now: datetime, *, lease_until: datetime, limit: int = 50
    ) -> list[OutboxMessage]:
        """Claim due messages until ``lease_until``.

        Due PENDING messages, and SENDING ones whose lease expired: a crashed worker's claims
        come back when the lease ends.
        """
        ...

    async def outbox_sent(
        self,
        message_id: int,
        *,
        provider_message_id: str,
        cost: str | None,
        state: DeliveryState,
    ) -> None:
        """The provider took the message; a delivery report that came first is applied now."""
        ...

    async def outbox_retry(self, message_id: int, *, next_try_at: datetime, error: str) -> None:
        """Sending failed for now; try again at ``next_try_at``."""
        ...

    async def outbox_failed(self, message_id: int, *, error: str) -> None:
        """Sending failed for good; an operator must look."""
        ...

    async def apply_delivery_report(self, report: DeliveryReport) -> OutboxMessage | None:
        """Record a delivery report; a delivered token message moves its purchase to DELIVERED.

        Unknown message ids return None, and the report is kept (bounded, for
        ``EARLY_REPORT_TTL_S``): the provider may report before ``outbox_sent`` recorded the id
        (Africa's Talking posts "Sent" at once), and ``outbox_sent`` applies it then. A final
        state is never overwritten.
        """
        ...


class StatusQueries(Protocol):
    """Asynchronous status queries and their results (``gateway.payments.StatusQueryStore``).

    A result posted to any instance reaches whichever instance waits, accepted only against the
    query the provider acknowledged, once.
    """

    async def record_status_query(
        self, *, provider: str, conversation_id: str, originator_id: str, transaction_id: str
    ) -> str | None:
        """Keep a status query the provider acknowledged (Daraja Transaction Status). Idempotent.

        Queries asked more than ``STATUS_QUERY_KEEP_S`` ago are dropped in the same write. A
        result held for these ids (it came first) is judged in the same transaction, as
        ``answer_status_query`` would have: its outcome is returned (None: none was held).
        """
        ...

    async def answer_status_query(
        self,
        *,
        provider: str,
        conversation_id: str,
        originator_id: str,
        transaction_id: str,
        result: bytes,
    ) -> str:
        """Store an asynchronous result for the query it answers, once, in one transaction.

        ``STATUS_ACCEPTED`` when ``conversation_id`` and ``originator_id`` are an unanswered
        query of ``provider`` about ``transaction_id``; ``STATUS_CONTRADICTED`` (nothing stored)
        when they are, but about another transaction; ``STATUS_HELD`` when no query has
        ``conversation_id`` yet (kept, within ``STATUS_EARLY_MAX`` results of at most
        ``STATUS_EARLY_MAX_BYTES`` for ``STATUS_EARLY_KEEP_S``, for ``record_status_query`` to
        judge); else ``STATUS_UNMATCHED``. The query's recording and this write take one named
        lock, so neither misses the other.
        """
        ...

    async def status_query_result(self, conversation_id: str) -> bytes | None:
        """The stored result of a query, None while (or if) it has none."""
        ...

    async def held_status_outcome(self, conversation_id: str) -> str | None:
        """A held result's outcome once its query was recorded; None until then (or if gone)."""
        ...


class OperatorReads(PurchaseReads, Protocol):
    """What the operator page reads of a purchase (its actions go through the saga)."""

    async def get_vend(self, purchase_id: str) -> Vend | None:
        """The purchase's vend, if it has one."""
        ...

    async def outbox_for(self, purchase_id: str) -> list[OutboxMessage]:
        """The purchase's messages, oldest first."""
        ...


class LedgerStats(Protocol):
    """What ``/metrics`` reads at scrape time."""

    async def purchase_counts(self) -> dict[str, int]:
        """How many purchases are in each state (every ``PurchaseState`` value, zeros included)."""
        ...

    async def outbox_stats(self, now: datetime) -> OutboxStats:
        """The outbox backlog (pending or sending), its oldest message's age, and held ones."""
        ...


class CustomerLedger(MessageQueue, Protocol):
    """What the customer services read and keep for a phone (purchases go through the saga)."""

    async def lookup_meter(self, drn: MeterNumber) -> MeterInfo | None:
        """What a channel may show about a meter (masked name), or None if unknown."""
        ...

    async def get_tariff(self, tariff_id: str) -> Tariff:
        """The tariff. Raises ``NotFound``."""
        ...

    async def get_purchase(self, purchase_id: str) -> Purchase:
        """The purchase. Raises ``NotFound``."""
        ...

    async def save_meter(
        self, phone: Msisdn, meter: MeterNumber, *, nickname: str = ""
    ) -> SavedMeter:
        """Keep a meter for a phone (renames it if kept already).

        Raises:
            SavedMetersFull: the phone keeps ``MAX_SAVED_METERS`` meters already.
            NotFound: no such meter.
        """
        ...

    async def saved_meters(self, phone: Msisdn) -> list[SavedMeter]:
        """The phone's saved meters, oldest first."""
        ...

    async def remove_saved_meter(self, phone: Msisdn, meter: MeterNumber) -> bool:
        """Forget a saved meter; False if it was not saved."""
        ...

    async def get_language(self, phone: Msisdn) -> str | None:
        """The phone's chosen language code, if any."""
        ...

    async def set_language(self, phone: Msisdn, language: str) -> None:
        """Remember the phone's language code."""
        ...


class Registry(Protocol):
    """The operator's commands: reference data, vending keys, key rotations, reports, events."""

    async def put_tariff(self, tariff: Tariff) -> None:
        """Insert or replace a tariff."""
        ...

    async def put_meter(self, meter: MeterRecord) -> None:
        """Insert or update a meter's registration; its ``last_tid`` is kept when it exists."""
        ...

    async def put_vending_key(self, key: SealedVendingKey) -> None:
        """Store a sealed vending key; replaces the one with the same (sgc, krn)."""
        ...

    async def add_vending_key(self, key: SealedVendingKey) -> bool:
        """Store a sealed vending key unless its (sgc, krn) exists (never replaces); True if so."""
        ...

    async def meters_on_key(
        self, sgc: str, krn: int, *, meters: Sequence[MeterNumber] | None = None
    ) -> list[MeterRecord]:
        """The meters whose key is (``sgc``, ``krn``), among ``meters`` if given, by DRN."""
        ...

    async def plan_key_rotation(
        self, rotation: KeyRotation, *, meters: Sequence[MeterNumber] | None = None, actor: str
    ) -> list[KeyChange]:
        """Plan a pending key change for each meter on the rotation's old key (among ``meters``).

        One transaction. A meter's earlier pending change is SUPERSEDED by the new one; meters
        not on (``rotation.sgc``, ``rotation.from_krn``) are left alone. The planned meters'
        VEND_FAILED purchases (a 1993 key past its TID range …) go back to PAID with a
        ``vend_retry_queued`` event: the sweeper vends them, the first one delivering the key
        change. Appends one ``key_rotation_planned`` event. Returns the planned changes, by DRN.
        """
        ...

    async def key_changes(self, meter: MeterNumber) -> list[KeyChange]:
        """The meter's key changes, oldest first (at most one is PENDING)."""
        ...

    async def events(self, *, kind: str | None = None, limit: int = 100) -> list[Event]:
        """Recent events, newest first, optionally of one kind (security review)."""
        ...

    async def daily_report(self, day: date) -> list[ReportRow]:
        """Counts and sums of the purchases created on ``day`` (UTC), by provider and state."""
        ...

    async def get_debt(self, meter: str) -> MeterDebt | None:
        """The meter's debt account, if it ever had one (a cleared debt has balance 0)."""
        ...

    async def set_debt(
        self,
        meter: str,
        *,
        balance: Money,
        rate_basis_points: int,
        min_per_purchase_minor: int = 0,
        cap_per_purchase_minor: int | None = None,
        actor: str,
        reason: str = "",
    ) -> MeterDebt:
        """Set the meter's debt balance and recovery terms; appends ``debt_set`` (old and new).

        Raises:
            NotFound: no such meter.
            ValueError: the terms are invalid (``DebtTerms``'s rules).
        """
        ...

    async def clear_debt(self, meter: str, *, actor: str, reason: str = "") -> MeterDebt:
        """Write the meter's debt off (balance 0, terms kept); appends ``debt_cleared``.

        Raises:
            NotFound: the meter has no debt account.
        """
        ...

    async def debt_recoveries(self, meter: str, *, limit: int = 50) -> list[DebtRecovery]:
        """What the meter's vends recovered, newest first."""
        ...

    async def set_fbe_allowance(self, tariff_id: str, units_per_month: int, *, actor: str) -> None:
        """The tariff's monthly free basic electricity in tenths of a kWh (0 stops it).

        Appends ``fbe_allowance_set``. Raises ``NotFound`` (no such tariff).
        """
        ...

    async def fbe_allowance(self, tariff_id: str) -> int:
        """The tariff's monthly FBE units (0: none)."""
        ...

    async def fbe_issues(self, meter: str, *, limit: int = 24) -> list[FbeIssue]:
        """The meter's FBE tokens, newest first."""
        ...


class Ledger(
    SagaLedger,
    OutboxLedger,
    StatusQueries,
    OperatorReads,
    LedgerStats,
    CustomerLedger,
    Registry,
    Protocol,
):
    """The whole ledger, every role: what a backend provides and the composition root holds."""

    async def close(self) -> None:
        """Finish queued writes and close the connections."""
        ...

    async def probe_write(self) -> None:
        """Commit a write that changes nothing (readiness: the write path works end to end).

        Raises:
            LedgerError: the database cannot take a write now (disk full, read-only, gone).
        """
        ...
