"""The ledger's records and its error tree (its ports, by role, are in ``ports.py``).

The ledger is the durable, idempotent log every purchase lives in. Each method is one transaction
and safe to retry; constraints do the guarding (UNIQUE idempotency key per purchase, UNIQUE
(provider, reference) per payment, UNIQUE purchase per vend, UNIQUE (meter, TID) per vend, one
token message per purchase, append-only events). The rules live once in ``core.py``; the SQLite
and PostgreSQL dialects share the schema and pass the same contract tests
(``tests/ledger/test_ledger_contract.py``).

The ledger enforces *which* purchase transitions are legal (``TRANSITIONS``) and applies them
atomically with their event row; *when* to move a purchase is the saga's business
(``gateway/vending.py``), the only caller of the transition methods.

```
LedgerError                  gateway.errors.GatewayError
  DuplicateError             a UNIQUE constraint refused a row (constraint, key)
    IdempotencyConflict      an idempotency key reused for a different request
  NotFound                   no such purchase / meter / tariff (what, key)
  IllegalTransition          purchase_id, current, requested: the state machine forbids it
  TidConflict                the meter's last TID moved since it was read: read again (retryable)
    VendConflict             the meter's debt or free basic electricity moved since it was read
  SavedMetersFull            a phone already has the maximum number of saved meters
  VendingKeyUnreadable       the master key does not open a sealed vending key
  LedgerUnavailable          locked, disk full, I/O error: nothing was written (retryable)
  MigrationError             the schema could not be brought up to date
```
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final

from gateway.errors import GatewayError
from gateway.money import Money
from gateway.phone import Msisdn
from gateway.tariff import DebtTerms

# Re-exported from here too: these moved to gateway/values/, shared by the ledger and sms.
from gateway.values.ids import MeterNumber as MeterNumber  # noqa: PLC0414
from gateway.values.ids import PurchaseId as PurchaseId  # noqa: PLC0414
from gateway.values.messages import DeliveryReport as DeliveryReport  # noqa: PLC0414
from gateway.values.messages import DeliveryState as DeliveryState  # noqa: PLC0414
from gateway.values.messages import MessageKind as MessageKind  # noqa: PLC0414
from gateway.values.messages import OutboxMessage as OutboxMessage  # noqa: PLC0414
from gateway.values.messages import OutboxState as OutboxState  # noqa: PLC0414

MAX_SAVED_METERS: Final = 5
#: A new purchase is due for the sweeper this long after creation unless the saga schedules its
#: check sooner (it does, right after): a process killed between the two still gets its prompt.
ORPHAN_CHECK_AFTER_S: Final = 60.0
#: How long a delivery report for a message id not recorded yet is kept, and how many are kept.
EARLY_REPORT_TTL_S: Final = 3600
EARLY_REPORT_LIMIT: Final = 10_000
_ID_ALPHABET: Final = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def new_purchase_id() -> PurchaseId:
    """A fresh, unguessable purchase id (60 random bits, no look-alike characters)."""
    return PurchaseId("P" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(12)))


class PurchaseState(StrEnum):
    """Where a purchase stands. Failed purchases keep their state: nothing is rolled away."""

    CREATED = "created"
    AWAITING_PAYMENT = "awaiting_payment"
    PAID = "paid"
    VENDED = "vended"
    DELIVERED = "delivered"
    PAYMENT_FAILED = "payment_failed"
    EXPIRED = "expired"
    VEND_FAILED = "vend_failed"  # needs an operator (unknown key, meter blocked …)
    REFUND_PENDING = "refund_pending"  # money arrived that must not be vended (wrong amount …)


_S = PurchaseState

#: The legal moves, target → the states it may be reached from. A late success after a failure
#: or expiry still reaches PAID: money is never lost.
TRANSITIONS: Final[Mapping[PurchaseState, frozenset[PurchaseState]]] = MappingProxyType(
    {
        _S.AWAITING_PAYMENT: frozenset({_S.CREATED}),
        # VEND_FAILED → PAID: a key change planned for its meter queues the vend again.
        _S.PAID: frozenset(
            {_S.CREATED, _S.AWAITING_PAYMENT, _S.PAYMENT_FAILED, _S.EXPIRED, _S.VEND_FAILED}
        ),
        _S.VENDED: frozenset({_S.PAID, _S.VEND_FAILED}),
        _S.DELIVERED: frozenset({_S.VENDED}),
        _S.PAYMENT_FAILED: frozenset({_S.CREATED, _S.AWAITING_PAYMENT}),
        _S.EXPIRED: frozenset({_S.CREATED, _S.AWAITING_PAYMENT}),
        _S.VEND_FAILED: frozenset({_S.PAID}),
        _S.REFUND_PENDING: frozenset(
            {
                _S.CREATED,
                _S.AWAITING_PAYMENT,
                _S.PAYMENT_FAILED,
                _S.EXPIRED,
                _S.PAID,
                _S.VEND_FAILED,
            }
        ),
    }
)


def is_legal(current: PurchaseState, requested: PurchaseState) -> bool:
    """Whether a purchase in ``current`` may move to ``requested``."""
    return current in TRANSITIONS.get(requested, frozenset())


class MeterStatus(StrEnum):
    """Whether a meter may be sold to."""

    ACTIVE = "active"
    BLOCKED = "blocked"


# ---------------------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterRecord:
    """A meter as the utility registered it, with what the token engine needs.

    Attributes:
        drn: decoder reference number. ``sgc``: supply group code. ``krn``: key revision number.
        ``ea``: encryption algorithm (7 = STA, 11 = MISTY1). ``dkga``: decoder key generation
        algorithm. ``ken``: key expiry number. ``last_tid``: the last token identifier issued,
        minutes since ``base_date`` (None before the first token).
    """

    drn: MeterNumber
    customer_name: str
    area: str = ""
    iin: str = "600727"
    sgc: str
    tariff_index: str
    krn: int
    key_type: int = 2
    ea: int = 7
    dkga: int = 4
    base_date: int = 2014
    ken: int = 255
    last_tid: int | None = None
    tariff_id: str
    status: MeterStatus = MeterStatus.ACTIVE


def mask_name(name: str) -> str:
    """A customer name for screens: first letter of each word, the rest starred (``J*** K****``)."""
    return " ".join(word[0] + "*" * (len(word) - 1) for word in name.split())


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterInfo:
    """What a channel may show about a meter: the name is masked."""

    drn: MeterNumber
    masked_name: str
    area: str
    status: MeterStatus
    tariff_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PurchaseDraft:
    """A purchase to open. ``idempotency_key`` is minted once per logical request by the channel."""

    purchase_id: PurchaseId
    channel: str
    phone: Msisdn | None
    meter: MeterNumber
    amount: Money
    units: int
    tariff_id: str
    idempotency_key: str
    provider: str
    # When the sweeper should first look at it, stored with the purchase itself (so a crash
    # right after cannot leave it unswept); None: ``ORPHAN_CHECK_AFTER_S`` after creation.
    first_check_at: datetime | None = None
    # What the quote gave to the meter's debt (``units`` were priced after it); the vend
    # recovers it (never more than the debt then owed).
    debt_recovery_minor: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Purchase:
    """One customer purchase and where it stands."""

    purchase_id: PurchaseId
    channel: str
    phone: Msisdn | None
    meter: MeterNumber
    amount: Money
    units: int  # tenths of a kWh, as quoted when the purchase was opened
    tariff_id: str
    state: PurchaseState
    idempotency_key: str
    provider: str
    provider_reference: str | None
    check_attempts: int
    next_check_at: datetime | None
    created_at: datetime
    updated_at: datetime
    debt_recovery_minor: int = 0  # the recovery the quote planned (minor units of ``amount``)


class PaymentRecordState(StrEnum):
    """What we know of one collection."""

    PENDING = "pending"  # requested, or claimed by a callback, not yet proven
    SUCCEEDED = "succeeded"  # proven by the provider's status answer
    FAILED = "failed"
    MISMATCHED = "mismatched"  # proven paid, but not the amount/currency/payer expected


@dataclass(frozen=True, slots=True, kw_only=True)
class PaymentRecord:
    """One collection attempt with a provider."""

    provider: str
    reference: str
    purchase_id: PurchaseId | None
    amount: Money | None
    state: PaymentRecordState
    payer: Msisdn | None
    receipt: str | None
    payload_hash: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfirmedPayment:
    """A payment the provider's own status answer proved, with the exact amount and payer."""

    provider: str
    reference: str
    amount: Money
    payer: Msisdn | None
    receipt: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class NoticeRecord:
    """A callback's claim as received (the raw body is kept with its SHA-256)."""

    provider: str
    reference: str
    claimed_state: str
    amount: Money | None
    payer: Msisdn | None
    receipt: str | None
    raw: bytes = field(repr=False)
    payload_hash: str
    #: A customer-initiated claim (C2B confirmation) that belongs to no purchase yet: kept in
    #: ``pending_claims`` in the same transaction until ``claim_finished``, so a crash after the
    #: route answered loses nothing (the sweeper finishes it).
    pending_claim: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingClaim:
    """A recorded C2B confirmation not yet carried through, and its stored payload."""

    provider: str
    reference: str
    payload: bytes | None = field(repr=False)
    attempts: int


@dataclass(frozen=True, slots=True, kw_only=True)
class C2bValidation:
    """What a C2B validation request said of a payment before money moved (first one kept)."""

    provider: str
    trans_id: str
    account: str
    amount: Money
    payer: Msisdn | None
    validated_at: datetime


#: C2B validations are kept this long (a confirmation follows its validation within seconds;
#: Daraja retries an unanswered confirmation for a while).
C2B_VALIDATION_KEEP_S: Final = 7 * 24 * 3600.0


#: A pending claim is left to the background task that took it for this long before the
#: sweeper takes it (and again, per attempt, after a crash).
PENDING_CLAIM_LEASE_S: Final = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class NoticeOutcome:
    """What recording a notice found: the purchase it belongs to, and whether it was seen before.

    ``payload_conflict`` is True when the same reference arrived earlier with another body: a
    security event. ``payment_settled``: a copy of a kept notice whose payment the provider's
    own answer has already proven paid (succeeded or mismatched): there is nothing left for it
    to do (known only where it costs nothing to tell: PostgreSQL; else False).
    """

    purchase_id: PurchaseId | None
    is_duplicate: bool
    payload_conflict: bool
    payment_settled: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class FloatDebit:
    """What a vendor sale takes off the float, in ``record_vend``'s transaction.

    ``amount_minor`` is the debit (the sale less the vendor's commission), > 0.
    """

    vendor_id: str
    amount_minor: int
    commission_minor: int


@dataclass(frozen=True, slots=True, kw_only=True)
class VendDraft:
    """A token made for a paid purchase, to be stored with its message in one transaction.

    ``expected_last_tid`` is the meter's ``last_tid`` the TID was computed from: the write is
    refused with ``TidConflict`` if it has moved, so a TID is never reused.

    With ``mint`` (a ledger whose ``mints_under_lock`` is true: PostgreSQL), the TID, token,
    message and FBE token are not made beforehand: the write locks the meter's row, awaits
    ``mint(meter as locked)`` and stores what it returns (``Minted``). The TID is taken from the
    locked row, so writers of one meter on any number of instances take turns on the row lock
    and never conflict; ``tid``, ``token``, ``message`` and ``expected_last_tid`` are then
    ignored (pass 0, "", "" and None). Never with a key change (``key_change_id``).

    With ``key_change_id`` (the meter's pending ``KeyChange``), ``key_change_tokens`` were made
    under the meter's current key and ``token`` under the new one: the write applies the change
    (the meter row takes the new key's attributes) in the same transaction.
    """

    purchase_id: PurchaseId
    meter: MeterNumber
    tid: int
    expected_last_tid: int | None
    token: str = field(repr=False)
    units: int
    receipt: str | None
    recipient: Msisdn | None
    message: str = field(repr=False)
    key_change_id: int | None = None
    key_change_tokens: tuple[str, ...] = field(default=(), repr=False)
    # Debt recovery: ``debt_recovery_minor`` comes off the meter's debt, whose balance must still
    # be ``expected_debt_balance_minor`` (compare-and-set, else ``VendConflict``).
    debt_recovery_minor: int = 0
    expected_debt_balance_minor: int | None = None
    fbe: FbeDraft | None = None
    # A vendor sale: the float pays, in the same transaction (the purchase goes PAID with the
    # debit; ``InsufficientFloat`` refuses the whole vend). With no recipient, no SMS is queued.
    float_debit: FloatDebit | None = None
    mint: Callable[[MeterRecord], Awaitable[Minted]] | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Minted:
    """What a ``VendDraft``'s ``mint`` made under the meter's row lock."""

    tid: int
    token: str = field(repr=False)
    message: str = field(repr=False)
    fbe: FbeDraft | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class FbeDraft:
    """The month's free basic electricity token, made with a purchase's vend.

    Its TID follows the credit token's (the meter's ``last_tid`` becomes ``tid``); ``message`` is
    its own SMS (kind ``fbe``). Never with a key change (``ValueError``): the meter is changing key.
    """

    month: str  # YYYY-MM in the FBE time zone
    tid: int
    token: str = field(repr=False)
    units: int
    message: str = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class FbeIssue:
    """A free basic electricity token issued: a vend of zero money with its own TID."""

    meter: MeterNumber
    month: str
    purchase_id: PurchaseId
    tid: int
    token: str = field(repr=False)
    units: int
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterDebt:
    """A meter's debt to the utility and how each purchase recovers it (``terms``)."""

    meter: MeterNumber
    balance: Money
    rate_basis_points: int
    min_per_purchase_minor: int = 0
    cap_per_purchase_minor: int | None = None
    recovered_total_minor: int = 0
    updated_at: datetime

    @property
    def terms(self) -> DebtTerms:
        """The recovery terms the quote applies."""
        return DebtTerms(
            balance_minor=self.balance.amount_minor,
            currency=self.balance.currency,
            rate_basis_points=self.rate_basis_points,
            min_per_purchase_minor=self.min_per_purchase_minor,
            cap_per_purchase_minor=self.cap_per_purchase_minor,
        )


def debt_event_data(debt: MeterDebt, before: MeterDebt | None, reason: str) -> dict[str, Any]:
    """The data of a ``debt_set`` / ``debt_cleared`` event: the account before and after."""
    return {
        "meter": debt.meter,
        "currency": debt.balance.currency,
        "balance_before_minor": before.balance.amount_minor if before is not None else 0,
        "balance_minor": debt.balance.amount_minor,
        "rate_basis_points": debt.rate_basis_points,
        "min_per_purchase_minor": debt.min_per_purchase_minor,
        "cap_per_purchase_minor": debt.cap_per_purchase_minor,
        "reason": reason,
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class DebtRecovery:
    """What one purchase's vend recovered, and what the meter owed after it."""

    purchase_id: PurchaseId
    meter: MeterNumber
    amount: Money
    balance_after: Money
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Vend:
    """A token issued for a purchase. ``token`` is the full 20 digits: never log it."""

    purchase_id: PurchaseId
    meter: MeterNumber
    tid: int
    token: str = field(repr=False)
    units: int
    receipt: str | None
    created_at: datetime
    key_change_tokens: tuple[str, ...] = field(default=(), repr=False)

    @property
    def masked_token(self) -> str:
        """The token for logs and screens: only the last four digits."""
        return "****-****-****-****-" + self.token[-4:]


@dataclass(frozen=True, slots=True, kw_only=True)
class VendOutcome:
    """The vend stored, and whether it was there already (a replay enqueues nothing).

    ``purchase`` is the purchase as it stands after the operation.
    """

    vend: Vend
    replayed: bool
    purchase: Purchase


@dataclass(frozen=True, slots=True, kw_only=True)
class VendContext:
    """Everything a vend needs, read at once.

    The purchase, its meter, its vend if it has one, the payment's receipt number, the phone's
    language, the meter's pending key change (the next vend delivers it) and the free basic
    electricity units a month its tariff grants (0: none, so nothing more is read for FBE).
    """

    purchase: Purchase
    meter: MeterRecord
    vend: Vend | None
    receipt: str | None
    language: str | None
    key_change: KeyChange | None = None
    fbe_allowance: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One append-only audit row: who did what to which purchase, when."""

    event_id: int
    purchase_id: PurchaseId | None
    kind: str
    actor: str
    data: Mapping[str, Any]
    at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class SavedMeter:
    """A meter a phone keeps for quick purchases."""

    phone: Msisdn
    meter: MeterNumber
    nickname: str
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportRow:
    """One line of the daily reconciliation: purchases of one provider in one state."""

    day: date
    provider: str
    state: PurchaseState
    currency: str
    count: int
    amount_minor: int


class KeyChangeState(StrEnum):
    """Where a planned key change stands."""

    PENDING = "pending"  # the meter's next vend delivers it
    APPLIED = "applied"  # delivered with a vend; the meter row carries the new key
    SUPERSEDED = "superseded"  # replaced by a later plan before it was delivered


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyRotation:
    """A key revision change for the meters of one supply group (``gateway keys rotate``).

    The meters on (``sgc``, ``from_krn``) move to (``to_sgc`` or ``sgc``, ``to_krn``) with
    ``to_base_date`` (the new vending key's), keeping their tariff index unless
    ``to_tariff_index`` is given. Key type, algorithm and KEN are kept.
    """

    sgc: str
    from_krn: int
    to_krn: int
    to_base_date: int
    to_sgc: str | None = None
    to_tariff_index: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyChange:
    """One meter's key change: planned by a rotation, delivered by the meter's next vend.

    ``from_*`` is the key the meter had when it was planned (the key-change tokens are made
    under it); ``sgc``, ``krn``, ``tariff_index`` and ``base_date`` are the new key's.
    """

    change_id: int
    meter: MeterNumber
    from_sgc: str
    from_krn: int
    from_tariff_index: str
    from_base_date: int
    sgc: str
    krn: int
    tariff_index: str
    base_date: int
    state: KeyChangeState
    planned_at: datetime
    applied_at: datetime | None = None
    purchase_id: PurchaseId | None = None

    @property
    def rollover(self) -> bool:
        """Whether the base date changes: RO = 1, the meter clears its TID store."""
        return self.base_date != self.from_base_date

    def is_from(self, meter: MeterRecord) -> bool:
        """Whether ``meter`` still has the key this change was planned from."""
        return (meter.sgc, meter.krn, meter.tariff_index, meter.base_date) == (
            self.from_sgc,
            self.from_krn,
            self.from_tariff_index,
            self.from_base_date,
        )

    def applied_to(self, meter: MeterRecord) -> MeterRecord:
        """``meter`` with the new key's attributes (its ``last_tid`` is left to the vend)."""
        return dataclasses.replace(
            meter,
            sgc=self.sgc,
            krn=self.krn,
            tariff_index=self.tariff_index,
            base_date=self.base_date,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxStats:
    """The outbox at a glance, for metrics.

    Attributes:
        backlog: messages not sent yet (pending, or being sent).
        oldest_age_s: seconds since the oldest of them was queued (0 when there are none).
        held: messages with no recipient, waiting for an operator.
    """

    backlog: int
    oldest_age_s: float
    held: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SealedVendingKey:
    """A vending key encrypted at rest (AES-GCM); see ``gateway.ledger.keys``."""

    sgc: str
    krn: int
    key_type: int
    ea: int
    dkga: int
    base_date: int
    nonce: bytes
    ciphertext: bytes = field(repr=False)
    tag: bytes


# ----------------------------------------------------------------------------------------- errors


#: ``Ledger.answer_status_query``'s answers.
STATUS_ACCEPTED: Final = "accepted"  # it answers an outstanding query of ours: stored, once
STATUS_UNMATCHED: Final = "unmatched"  # no outstanding query has these ids (or already answered)
STATUS_CONTRADICTED: Final = "contradicted"  # our query's ids, another transaction
STATUS_HELD: Final = "held"  # no query has these ids yet: kept for one recorded soon after
#: Results held for a query not yet recorded: at most this many at once, each at most this big,
#: for this long (Daraja answers within moments of acknowledging a query).
STATUS_EARLY_MAX: Final = 256
STATUS_EARLY_MAX_BYTES: Final = 16_384
STATUS_EARLY_KEEP_S: Final = 300.0
#: Status queries older than this are dropped when a new one is recorded (a result that late is
#: unmatched: the query gave up after ``status_result_wait_s`` long before).
STATUS_QUERY_KEEP_S: Final = 3600.0


class LedgerError(GatewayError):
    """The ledger refused or could not perform an operation."""


class DuplicateError(LedgerError):
    """A UNIQUE constraint refused a row.

    Attributes:
        constraint: which uniqueness rule (``payments.provider_reference`` …).
        key: the duplicated value, as text.
    """

    def __init__(self, message: str, *, constraint: str, key: str) -> None:
        super().__init__(message)
        self.constraint = constraint
        self.key = key


class IdempotencyConflict(DuplicateError):
    """An idempotency key was reused for a request with different details."""


#: The unique index (migration 0003) that lets a provider's receipt pay for one purchase only.
RECEIPT_ONCE: Final = "payments_receipt_once"


class ReceiptReused(DuplicateError):
    """A provider's receipt already proves the payment of another payment row (another purchase).

    Raised by ``mark_paid``, ``record_vend`` (with a payment) and ``mark_payment_mismatch``: the
    transaction wrote nothing. ``key`` is ``provider:receipt``.
    """

    def __init__(self, provider: str, receipt: str) -> None:
        super().__init__(
            f"{provider} receipt {receipt} already pays for another purchase",
            constraint=RECEIPT_ONCE,
            key=f"{provider}:{receipt}",
        )
        self.provider = provider
        self.receipt = receipt


class NotFound(LedgerError):
    """No such record. ``what`` names the kind (``purchase``, ``meter``, ``tariff``)."""

    def __init__(self, what: str, key: str) -> None:
        super().__init__(f"no {what} {key!r}")
        self.what = what
        self.key = key


class IllegalTransition(LedgerError):
    """The purchase state machine forbids this move."""

    def __init__(self, purchase_id: str, current: PurchaseState, requested: PurchaseState) -> None:
        super().__init__(f"purchase {purchase_id} cannot go from {current} to {requested}")
        self.purchase_id = purchase_id
        self.current = current
        self.requested = requested


class TidConflict(LedgerError):
    """The meter's last TID changed since it was read; read it again and make a new token."""

    def __init__(self, meter: str, expected: int | None, actual: int | None) -> None:
        super().__init__(
            f"meter {meter}: last TID is {actual}, the vend was computed from {expected}",
            retryable=True,
        )
        self.meter = meter
        self.expected = expected
        self.actual = actual


class VendConflict(TidConflict):
    """The meter's debt balance or this month's FBE moved since the vend read them: read again.

    A ``TidConflict``, so the saga's retry loop reads the context again and makes new tokens.
    """

    def __init__(self, meter: str, what: str) -> None:
        LedgerError.__init__(self, f"meter {meter}: {what} moved since it was read", retryable=True)
        self.meter = meter
        self.expected = None
        self.actual = None


class SavedMetersFull(LedgerError):
    """The phone already keeps ``MAX_SAVED_METERS`` meters."""


class VendingKeyUnreadable(LedgerError):
    """The master key does not open a sealed vending key (wrong key, or tampered row)."""

    def __init__(self, sgc: str, krn: int) -> None:
        super().__init__(
            f"master key does not open vending key sgc={sgc} krn={krn}: wrong GATEWAY_MASTER_KEY?"
        )
        self.sgc = sgc
        self.krn = krn


class LedgerUnavailable(LedgerError):
    """The database could not take the write now (locked, disk full, I/O); nothing was written."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


class MigrationError(LedgerError):
    """The schema could not be brought up to date."""
