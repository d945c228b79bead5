"""The ledger's rules, written once: every operation as steps over a thin SQL dialect.

Each ``Ledger`` method is a generator here ("sans-I/O"): it yields the statements it needs
(``one``, ``rows``, ``run``, ``batch``, ``lock``) and receives their results, and it holds every
rule of the ledger: the state machine and its event rows, idempotency, the TID compare-and-set,
key changes, debts and free basic electricity, the outbox, row mapping. It never touches a
connection. A constraint's refusal comes back into the steps as our error (``DuplicateError``
…), so a rule may name it. A dialect drives the steps:

- ``SqliteLedger`` runs a write's steps synchronously in its writer thread, inside the batch the
  writer commits (so group commit and the optimistic batches stay as they are), and the hot
  reads on the loop's own ``query_only`` connection;
- ``PostgresLedger`` awaits each step on a pooled ``asyncpg`` connection inside one transaction,
  retried whole when the server fails transiently.

The statements are written once, with ``?`` placeholders, in the SQL both databases speak. A
dialect translates what differs: ``$n`` placeholders, and row locks (``FOR UPDATE``, which the
single SQLite writer does not need and SQLite does not have). ``lock(name)`` takes a lock on a
name for the rest of the transaction (PostgreSQL: an advisory lock; SQLite: nothing, its one
writer serialises every write). Timestamps go in as ``stamp(moment)`` (SQLite: ISO text,
PostgreSQL: ``TIMESTAMPTZ``) and come out through ``when`` (either form).

The pattern is eventsourcing's one recorder contract over thin per-database recorders, and
httpx's one base client over its sync and async I/O.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, NoReturn, Protocol, TypeVar

import structlog

from gateway.ledger.base import (
    C2B_VALIDATION_KEEP_S,
    EARLY_REPORT_LIMIT,
    EARLY_REPORT_TTL_S,
    MAX_SAVED_METERS,
    ORPHAN_CHECK_AFTER_S,
    PENDING_CLAIM_LEASE_S,
    RECEIPT_ONCE,
    STATUS_ACCEPTED,
    STATUS_CONTRADICTED,
    STATUS_EARLY_KEEP_S,
    STATUS_EARLY_MAX,
    STATUS_EARLY_MAX_BYTES,
    STATUS_HELD,
    STATUS_QUERY_KEEP_S,
    STATUS_UNMATCHED,
    C2bValidation,
    ConfirmedPayment,
    DebtRecovery,
    DuplicateError,
    Event,
    FbeDraft,
    FbeIssue,
    IdempotencyConflict,
    IllegalTransition,
    KeyChange,
    KeyChangeState,
    KeyRotation,
    LedgerError,
    MessageKind,
    MeterDebt,
    MeterInfo,
    MeterNumber,
    MeterRecord,
    MeterStatus,
    Minted,
    NotFound,
    NoticeOutcome,
    NoticeRecord,
    OutboxMessage,
    OutboxState,
    OutboxStats,
    PaymentRecord,
    PaymentRecordState,
    PendingClaim,
    Purchase,
    PurchaseDraft,
    PurchaseId,
    PurchaseState,
    ReceiptReused,
    ReportRow,
    SavedMeter,
    SavedMetersFull,
    SealedVendingKey,
    TidConflict,
    Vend,
    VendConflict,
    VendContext,
    VendDraft,
    VendOutcome,
    debt_event_data,
    is_legal,
    mask_name,
)
from gateway.ledger.vendor import VendorSteps
from gateway.money import Money
from gateway.phone import Msisdn
from gateway.tariff import DebtTerms, Tariff
from gateway.values.messages import DeliveryReport, DeliveryState

T = TypeVar("T")
Clock = Callable[[], datetime]

log = structlog.get_logger()


class Row(Protocol):
    """A result row as both drivers give it (``sqlite3.Row``, ``asyncpg.Record``)."""

    def __getitem__(self, key: str | int, /) -> Any: ...  # noqa: ANN401 - a column's value


# ------------------------------------------------------------------------------------ the steps

#: Step kinds: the first row or None, every row, the count of rows changed, a named lock, and
#: statements run together (the last one's result; the others' are not needed).
ONE: Final = 0
ROWS: Final = 1
RUN: Final = 2
LOCK: Final = 3
BATCH: Final = 4
CALL: Final = 5


Stmt = tuple[int, str, tuple[object, ...]]
"""One statement an operation needs: its kind, SQL with ``?`` placeholders, its parameters."""

Steps = Generator[Stmt, Any, T]
"""An operation: yields statements, is sent their results, returns the operation's result.

``row = yield one(sql, …)``: a step is a plain tuple, so an operation costs the writer thread
one generator and no more (the SQLite writer's CPU per vend is the budget).
"""

Operation = Callable[..., Steps[T]]


def one(sql: str, *params: object) -> Stmt:
    """A statement whose result is its first row (a ``Row``), or None."""
    return (ONE, sql, params)


def rows(sql: str, *params: object) -> Stmt:
    """A statement whose result is every row (a list of ``Row``)."""
    return (ROWS, sql, params)


def run(sql: str, *params: object) -> Stmt:
    """A statement whose result is how many rows it changed."""
    return (RUN, sql, params)


def batch(*stmts: Stmt) -> Stmt:
    """Statements run in order, answering the last one's result.

    None may depend on another's change but through constraints: PostgreSQL runs them as one
    statement (data-modifying ``WITH`` clauses, one snapshot, one round trip), SQLite one by one.
    """
    return (BATCH, "", stmts)


def lock(name: str) -> Stmt:
    """A lock on ``name`` held until the transaction ends (writers of one name take turns)."""
    return (LOCK, "", (name,))


def call(fn: Callable[..., Awaitable[object]], *args: object) -> Stmt:
    """Await ``fn(*args)`` inside the transaction, between two statements; its result.

    Only a dialect whose transactions may wait on the event loop runs it (PostgreSQL: the row
    locks taken so far are held meanwhile); SQLite's writer thread cannot (``mints_under_lock``).
    """
    return (CALL, "", (fn, *args))


# ------------------------------------------------------------------------------------ row mapping


def when(value: datetime | str) -> datetime:
    """A stored timestamp as an aware datetime (PostgreSQL gives one, SQLite ISO text)."""
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def _when_or_none(value: datetime | str | None) -> datetime | None:
    return when(value) if value else None


def purchase_of(row: Row) -> Purchase:
    """A ``purchases`` row."""
    return Purchase(
        purchase_id=PurchaseId(row["purchase_id"]),
        channel=row["channel"],
        phone=Msisdn(row["phone"]) if row["phone"] is not None else None,
        meter=MeterNumber(row["meter"]),
        amount=Money(row["amount_minor"], row["currency"]),
        units=row["units"],
        tariff_id=row["tariff_id"],
        state=PurchaseState(row["state"]),
        idempotency_key=row["idempotency_key"],
        provider=row["provider"],
        provider_reference=row["provider_reference"],
        check_attempts=row["check_attempts"],
        next_check_at=_when_or_none(row["next_check_at"]),
        created_at=when(row["created_at"]),
        updated_at=when(row["updated_at"]),
        debt_recovery_minor=row["debt_recovery_minor"],
    )


def meter_of(row: Row, prefix: str = "") -> MeterRecord:
    """A ``meters`` row (its columns named ``prefix`` + column in a join)."""
    return MeterRecord(
        drn=MeterNumber(row[prefix + "drn"]),
        customer_name=row[prefix + "customer_name"],
        area=row[prefix + "area"],
        iin=row[prefix + "iin"],
        sgc=row[prefix + "sgc"],
        tariff_index=row[prefix + "tariff_index"],
        krn=row[prefix + "krn"],
        key_type=row[prefix + "key_type"],
        ea=row[prefix + "ea"],
        dkga=row[prefix + "dkga"],
        base_date=row[prefix + "base_date"],
        ken=row[prefix + "ken"],
        last_tid=row[prefix + "last_tid"],
        tariff_id=row[prefix + "tariff_id"],
        status=MeterStatus(row[prefix + "status"]),
    )


def tariff_of(row: Row) -> Tariff:
    """A ``tariffs`` row."""
    return Tariff(
        tariff_id=row["tariff_id"],
        name=row["name"],
        currency=row["currency"],
        price_per_kwh_minor=row["price_per_kwh_minor"],
        vat_basis_points=row["vat_basis_points"],
        fixed_charge_minor=row["fixed_charge_minor"],
        min_purchase_minor=row["min_purchase_minor"],
        max_purchase_minor=row["max_purchase_minor"],
    )


def vend_of(row: Row, prefix: str = "") -> Vend:
    """A ``vends`` row (its columns named ``prefix`` + column in a join)."""
    return Vend(
        purchase_id=PurchaseId(row["purchase_id"]),
        meter=MeterNumber(row[prefix + "meter"]),
        tid=row[prefix + "tid"],
        token=row[prefix + "token"],
        units=row[prefix + "units"],
        receipt=row[prefix + "receipt"],
        created_at=when(row[prefix + "created_at"]),
        key_change_tokens=tuple(row[prefix + "key_change_tokens"].split()),
    )


def key_change_of(row: Row, prefix: str = "") -> KeyChange:
    """A ``key_changes`` row (its columns named ``prefix`` + column in a join)."""
    purchase_id = row[prefix + "purchase_id"]
    return KeyChange(
        change_id=row[prefix + "change_id"],
        meter=MeterNumber(row[prefix + "meter"]),
        from_sgc=row[prefix + "from_sgc"],
        from_krn=row[prefix + "from_krn"],
        from_tariff_index=row[prefix + "from_tariff_index"],
        from_base_date=row[prefix + "from_base_date"],
        sgc=row[prefix + "sgc"],
        krn=row[prefix + "krn"],
        tariff_index=row[prefix + "tariff_index"],
        base_date=row[prefix + "base_date"],
        state=KeyChangeState(row[prefix + "state"]),
        planned_at=when(row[prefix + "planned_at"]),
        applied_at=_when_or_none(row[prefix + "applied_at"]),
        purchase_id=PurchaseId(purchase_id) if purchase_id else None,
    )


def outbox_of(row: Row) -> OutboxMessage:
    """An ``outbox`` row."""
    return OutboxMessage(
        message_id=row["message_id"],
        purchase_id=PurchaseId(row["purchase_id"]) if row["purchase_id"] else None,
        kind=MessageKind(row["kind"]),
        recipient=Msisdn(row["recipient"]) if row["recipient"] else None,
        body=row["body"],
        state=OutboxState(row["state"]),
        attempts=row["attempts"],
        next_try_at=when(row["next_try_at"]),
        provider_message_id=row["provider_message_id"],
        cost=row["cost"],
        last_error=row["last_error"],
        created_at=when(row["created_at"]),
        updated_at=when(row["updated_at"]),
    )


def event_of(row: Row) -> Event:
    """An ``events`` row."""
    return Event(
        event_id=row["event_id"],
        purchase_id=PurchaseId(row["purchase_id"]) if row["purchase_id"] else None,
        kind=row["kind"],
        actor=row["actor"],
        data=json.loads(row["data"]),
        at=when(row["at"]),
    )


def sealed_of(row: Row) -> SealedVendingKey:
    """A ``vending_keys`` row."""
    return SealedVendingKey(
        sgc=row["sgc"],
        krn=row["krn"],
        key_type=row["key_type"],
        ea=row["ea"],
        dkga=row["dkga"],
        base_date=row["base_date"],
        nonce=bytes(row["nonce"]),
        ciphertext=bytes(row["ciphertext"]),
        tag=bytes(row["tag"]),
    )


def saved_of(row: Row) -> SavedMeter:
    """A ``saved_meters`` row."""
    return SavedMeter(
        phone=Msisdn(row["phone"]),
        meter=MeterNumber(row["meter"]),
        nickname=row["nickname"],
        created_at=when(row["created_at"]),
    )


def payment_of(row: Row) -> PaymentRecord:
    """A ``payments`` row."""
    return PaymentRecord(
        provider=row["provider"],
        reference=row["reference"],
        purchase_id=PurchaseId(row["purchase_id"]) if row["purchase_id"] else None,
        amount=Money(row["amount_minor"], row["currency"])
        if row["amount_minor"] is not None and row["currency"]
        else None,
        state=PaymentRecordState(row["state"]),
        payer=Msisdn(row["payer"]) if row["payer"] else None,
        receipt=row["receipt"],
        payload_hash=row["payload_hash"],
        created_at=when(row["created_at"]),
        updated_at=when(row["updated_at"]),
    )


def meter_debt_of(row: Row) -> MeterDebt:
    """A ``meter_debts`` row."""
    return MeterDebt(
        meter=MeterNumber(row["meter"]),
        balance=Money(row["balance_minor"], row["currency"]),
        rate_basis_points=row["rate_basis_points"],
        min_per_purchase_minor=row["min_per_purchase_minor"],
        cap_per_purchase_minor=row["cap_per_purchase_minor"],
        recovered_total_minor=row["recovered_total_minor"],
        updated_at=when(row["updated_at"]),
    )


def debt_recovery_of(row: Row) -> DebtRecovery:
    """A ``debt_recoveries`` row."""
    return DebtRecovery(
        purchase_id=PurchaseId(row["purchase_id"]),
        meter=MeterNumber(row["meter"]),
        amount=Money(row["amount_minor"], row["currency"]),
        balance_after=Money(row["balance_after_minor"], row["currency"]),
        created_at=when(row["created_at"]),
    )


def fbe_issue_of(row: Row) -> FbeIssue:
    """An ``fbe_issues`` row."""
    return FbeIssue(
        meter=MeterNumber(row["meter"]),
        month=row["month"],
        purchase_id=PurchaseId(row["purchase_id"]),
        tid=row["tid"],
        token=row["token"],
        units=row["units"],
        created_at=when(row["created_at"]),
    )


#: One encoder for every event row (``json.dumps`` with options builds a new one per call).
_ENCODE_JSON: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode


def to_json(data: Mapping[str, Any] | None) -> str:
    """An event's data as stored (sorted keys, compact)."""
    return _ENCODE_JSON(dict(data or {}))


# ------------------------------------------------------------------------------------------ SQL


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" for _ in values)


_METER_COLUMNS: Final = (
    "drn", "customer_name", "area", "iin", "sgc", "tariff_index", "krn", "key_type", "ea",
    "dkga", "base_date", "ken", "last_tid", "tariff_id", "status",
)  # fmt: skip
_VEND_COLUMNS: Final = ("meter", "tid", "token", "units", "receipt", "created_at")
_KEY_CHANGE_COLUMNS: Final = (
    "change_id", "meter", "from_sgc", "from_krn", "from_tariff_index", "from_base_date", "sgc",
    "krn", "tariff_index", "base_date", "state", "planned_at", "applied_at", "purchase_id",
)  # fmt: skip
#: Everything a vend needs in one statement: the purchase, its meter (``m_``), its vend (``v_``),
#: the payment's receipt, the phone's language and the meter's pending key change (``kc_``).
VEND_CONTEXT: Final = (
    "SELECT p.*, "  # noqa: S608 - built from our constant column names
    + ", ".join(f"m.{column} AS m_{column}" for column in _METER_COLUMNS)
    + ", "
    + ", ".join(f"kc.{column} AS kc_{column}" for column in _KEY_CHANGE_COLUMNS)
    + ", "
    + ", ".join(f"v.{column} AS v_{column}" for column in _VEND_COLUMNS)
    + ", v.key_change_tokens AS v_key_change_tokens,"
    " pay.receipt AS pay_receipt, pref.language AS language,"
    " fa.units_per_month AS fbe_allowance"
    " FROM purchases p JOIN meters m ON m.drn = p.meter"
    " LEFT JOIN fbe_allowances fa ON fa.tariff_id = m.tariff_id"
    " LEFT JOIN vends v ON v.purchase_id = p.purchase_id"
    " LEFT JOIN payments pay ON pay.provider = p.provider AND pay.reference = p.provider_reference"
    " LEFT JOIN customer_preferences pref ON pref.phone = p.phone"
    " LEFT JOIN key_changes kc ON kc.meter = p.meter AND kc.state = 'pending'"
    " WHERE p.purchase_id = ?"
)
_LOCK_PURCHASE_AND_METER: Final = (
    "SELECT p.*, v.vend_id, "  # noqa: S608 - built from our constant column names
    + ", ".join(f"m.{column} AS m_{column}" for column in _METER_COLUMNS)
    + " FROM purchases p JOIN meters m ON m.drn = p.meter"
    " LEFT JOIN vends v ON v.purchase_id = p.purchase_id WHERE p.purchase_id = ?"
    " FOR UPDATE OF p, m"
)
#: The first notice of a collection we asked for (attached to its purchase, no payload yet).
_KEEP_NOTICE: Final = (
    "UPDATE payments SET payload = ?, payload_hash = ?, updated_at = ?,"
    " receipt = COALESCE(receipt, ?) WHERE provider = ? AND reference = ?"
    " AND payload_hash IS NULL AND purchase_id IS NOT NULL RETURNING purchase_id"
)
#: PostgreSQL only (``modifies_in_with``): see ``LedgerCore._notice_once``.
_NOTICE_ONCE: Final = (
    "WITH kept AS ("  # noqa: S608 - built from our constants
    + _KEEP_NOTICE
    + ", false AS duplicate),"
    " seen AS (SELECT purchase_id, true AS duplicate FROM payments"
    " WHERE provider = ? AND reference = ? AND payload_hash = ?),"
    " hit AS (SELECT * FROM kept UNION ALL SELECT * FROM seen)"
    " INSERT INTO events (purchase_id, kind, actor, data, at)"
    " SELECT purchase_id, 'payment_notice', ?,"
    " CASE WHEN duplicate THEN ?::jsonb ELSE ?::jsonb END, ? FROM hit"
    " RETURNING purchase_id, data = ?::jsonb AS duplicate,"
    " (SELECT state FROM payments WHERE provider = ? AND reference = ?) AS payment_state"
)
_PURCHASE: Final = "SELECT * FROM purchases WHERE purchase_id = ?"
_LOCK_PURCHASE: Final = "SELECT * FROM purchases WHERE purchase_id = ? FOR UPDATE"
_METER: Final = "SELECT * FROM meters WHERE drn = ?"
_METER_EXISTS: Final = "SELECT 1 FROM meters WHERE drn = ?"
_BY_IDEMPOTENCY_KEY: Final = "SELECT * FROM purchases WHERE idempotency_key = ?"
_MOVE: Final = "UPDATE purchases SET state = ?, updated_at = ? WHERE purchase_id = ? RETURNING *"
_EVENT: Final = "INSERT INTO events (purchase_id, kind, actor, data, at) VALUES (?, ?, ?, ?, ?)"
_OUTBOX_MESSAGE: Final = "SELECT * FROM outbox WHERE message_id = ?"
_QUEUE_MESSAGE: Final = (
    "INSERT INTO outbox (purchase_id, kind, recipient, body, state, next_try_at, created_at,"
    " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_DEBT: Final = "SELECT * FROM meter_debts WHERE meter = ?"
_FBE_ALLOWANCE: Final = "SELECT units_per_month FROM fbe_allowances WHERE tariff_id = ?"
_PAYMENT_OWNER: Final = "SELECT purchase_id FROM payments WHERE provider = ? AND reference = ?"
_FINAL_OUTBOX: Final = (OutboxState.DELIVERED.value, OutboxState.FAILED.value)
_UNSENT: Final = (OutboxState.PENDING.value, OutboxState.SENDING.value)
_FINAL_DELIVERY: Final = tuple(state.value for state in DeliveryState if state.is_final)
_KEEP_EARLY_REPORT: Final = (
    "INSERT INTO early_delivery_reports (provider_message_id, state, failure_reason,"  # noqa: S608 - placeholders only
    " received_at) VALUES (?, ?, ?, ?) ON CONFLICT (provider_message_id) DO UPDATE"
    " SET state = excluded.state, failure_reason = excluded.failure_reason"
    f" WHERE ? OR early_delivery_reports.state NOT IN ({_marks(_FINAL_DELIVERY)})"
)
_VENDED_OR_LATER: Final = frozenset({PurchaseState.VENDED, PurchaseState.DELIVERED})
#: States a proven payment leaves unchanged (VEND_FAILED is reached from PAID only: it is paid).
_PAID_OR_LATER: Final = frozenset(
    {PurchaseState.PAID, PurchaseState.VENDED, PurchaseState.DELIVERED, PurchaseState.VEND_FAILED}
)


#: Payment rows the provider's answer proved paid: a copy of their notice has nothing to do (a
#: failed one may still turn out paid: its copies are confirmed again).
_PROVEN_PAID: Final = frozenset(
    {PaymentRecordState.SUCCEEDED.value, PaymentRecordState.MISMATCHED.value}
)


def _key_row(key: SealedVendingKey, now: object) -> tuple[object, ...]:
    """A sealed key's ``vending_keys`` values, in the column order both inserts name."""
    return (
        key.sgc,
        key.krn,
        key.key_type,
        key.ea,
        key.dkga,
        key.base_date,
        key.nonce,
        key.ciphertext,
        key.tag,
        now,
    )


def _receipt_refusal(exc: DuplicateError, provider: str, receipt: str | None) -> DuplicateError:
    """``ReceiptReused`` when the receipt's index refused the row, else the refusal itself."""
    if exc.constraint == RECEIPT_ONCE and receipt is not None:
        return ReceiptReused(provider, receipt)
    return exc


def _not_owner(provider: str, reference: str, owner: object, purchase_id: str) -> DuplicateError:
    return DuplicateError(
        f"{provider} reference {reference} belongs to purchase {owner}, not {purchase_id}",
        constraint="payments.provider_reference",
        key=f"{provider}:{reference}",
    )


# ------------------------------------------------------------------------------------- the core


class LedgerCore(VendorSteps):
    """Every ``Ledger`` method, once; a dialect subclass runs the steps (see the module doc).

    A dialect provides ``_write`` (the steps in one transaction: the SQLite writer's batch, a
    PostgreSQL transaction; ``atomic=False`` says the steps are one statement, which needs no
    BEGIN/COMMIT), ``_read`` (the steps on a read connection; ``hot`` marks the few indexed
    rows a USSD hop or a vend reads) and ``_stamp`` (a timestamp as the database stores it).
    """

    #: Whether a write may await between statements (``call``), holding its row locks: a
    #: ``VendDraft`` with ``mint`` then makes its token under the meter's lock (PostgreSQL).
    mints_under_lock: bool = False
    #: Whether one statement may modify rows in its ``WITH`` clauses and use what they return
    #: (PostgreSQL): some rules then take one statement where SQLite takes a transaction.
    modifies_in_with: bool = False

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    # -- what a dialect provides ----------------------------------------------------------------

    async def _write(self, op: Operation[T], /, *args: object, atomic: bool = True) -> T:
        raise NotImplementedError

    async def _read(self, op: Operation[T], /, *args: object, hot: bool = False) -> T:
        raise NotImplementedError

    def _stamp(self, moment: datetime) -> object:
        raise NotImplementedError

    # -- shared steps -----------------------------------------------------------------------------

    def _now(self) -> tuple[datetime, object]:
        moment = self._clock()
        return moment, self._stamp(moment)

    def _event(
        self,
        purchase_id: str | None,
        kind: str,
        actor: str,
        data: Mapping[str, Any] | None,
        at: object = None,
    ) -> Stmt:
        """The event row's statement (``at``: the stamp of the change it records, or now)."""
        stamp = self._stamp(self._clock()) if at is None else at
        return run(_EVENT, purchase_id, kind, actor, to_json(data), stamp)

    def _append_event(
        self, purchase_id: str | None, kind: str, actor: str, data: Mapping[str, Any] | None
    ) -> Steps[None]:
        yield self._event(purchase_id, kind, actor, data)

    @staticmethod
    def _lock_purchase(purchase_id: str) -> Steps[Row]:
        row: Row | None = yield one(_LOCK_PURCHASE, purchase_id)
        if row is None:
            raise NotFound("purchase", purchase_id)
        return row

    def _move(
        self,
        row: Row,
        to: PurchaseState,
        kind: str,
        actor: str,
        data: Mapping[str, Any] | None,
    ) -> Steps[Row]:
        """Move the (locked) purchase ``row`` to ``to`` with its event; the updated row."""
        current = PurchaseState(row["state"])
        purchase_id = row["purchase_id"]
        if not is_legal(current, to):
            raise IllegalTransition(purchase_id, current, to)
        stamp = self._stamp(self._clock())
        moved: Row | None = yield batch(
            self._event(
                purchase_id, kind, actor, {**(data or {}), "from": current, "to": to}, stamp
            ),
            one(_MOVE, to.value, stamp, purchase_id),
        )
        assert moved is not None  # noqa: S101 - the row is locked: it is there
        return moved

    # -- reference data -------------------------------------------------------------------------

    async def put_tariff(self, tariff: Tariff) -> None:
        """Insert or replace a tariff."""
        await self._write(self._put_tariff, tariff, atomic=False)

    @staticmethod
    def _put_tariff(tariff: Tariff) -> Steps[None]:
        yield run(
            "INSERT INTO tariffs (tariff_id, name, currency, price_per_kwh_minor,"
            " vat_basis_points, fixed_charge_minor, min_purchase_minor, max_purchase_minor)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tariff_id) DO UPDATE SET"
            " name = excluded.name, currency = excluded.currency,"
            " price_per_kwh_minor = excluded.price_per_kwh_minor,"
            " vat_basis_points = excluded.vat_basis_points,"
            " fixed_charge_minor = excluded.fixed_charge_minor,"
            " min_purchase_minor = excluded.min_purchase_minor,"
            " max_purchase_minor = excluded.max_purchase_minor",
            tariff.tariff_id,
            tariff.name,
            tariff.currency,
            tariff.price_per_kwh_minor,
            tariff.vat_basis_points,
            tariff.fixed_charge_minor,
            tariff.min_purchase_minor,
            tariff.max_purchase_minor,
        )

    async def get_tariff(self, tariff_id: str) -> Tariff:
        """The tariff. Raises ``NotFound``."""
        return await self._read(self._get_tariff, tariff_id, hot=True)

    @staticmethod
    def _get_tariff(tariff_id: str) -> Steps[Tariff]:
        row = yield one("SELECT * FROM tariffs WHERE tariff_id = ?", tariff_id)
        if row is None:
            raise NotFound("tariff", tariff_id)
        return tariff_of(row)

    async def put_meter(self, meter: MeterRecord) -> None:
        """Insert or update a meter's registration; its ``last_tid`` is kept when it exists."""
        await self._write(self._put_meter, meter, atomic=False)

    @staticmethod
    def _put_meter(meter: MeterRecord) -> Steps[None]:
        yield run(
            "INSERT INTO meters (drn, customer_name, area, iin, sgc, tariff_index, krn,"
            " key_type, ea, dkga, base_date, ken, last_tid, tariff_id, status)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (drn) DO UPDATE SET customer_name = excluded.customer_name,"
            " area = excluded.area, iin = excluded.iin, sgc = excluded.sgc,"
            " tariff_index = excluded.tariff_index, krn = excluded.krn,"
            " key_type = excluded.key_type, ea = excluded.ea, dkga = excluded.dkga,"
            " base_date = excluded.base_date, ken = excluded.ken,"
            " tariff_id = excluded.tariff_id, status = excluded.status",
            meter.drn,
            meter.customer_name,
            meter.area,
            meter.iin,
            meter.sgc,
            meter.tariff_index,
            meter.krn,
            meter.key_type,
            meter.ea,
            meter.dkga,
            meter.base_date,
            meter.ken,
            meter.last_tid,
            meter.tariff_id,
            meter.status.value,
        )

    async def get_meter(self, drn: str) -> MeterRecord:
        """The meter with everything the token engine needs. Raises ``NotFound``."""
        return await self._read(self._get_meter, drn, hot=True)

    @staticmethod
    def _get_meter(drn: str) -> Steps[MeterRecord]:
        row = yield one(_METER, drn)
        if row is None:
            raise NotFound("meter", drn)
        return meter_of(row)

    async def lookup_meter(self, drn: str) -> MeterInfo | None:
        """What a channel may show about a meter (masked name), or None if unknown."""
        return await self._read(self._lookup_meter, drn, hot=True)

    @staticmethod
    def _lookup_meter(drn: str) -> Steps[MeterInfo | None]:
        row = yield one(_METER, drn)
        if row is None:
            return None
        return MeterInfo(
            drn=MeterNumber(row["drn"]),
            masked_name=mask_name(row["customer_name"]),
            area=row["area"],
            status=MeterStatus(row["status"]),
            tariff_id=row["tariff_id"],
        )

    async def put_vending_key(self, key: SealedVendingKey) -> None:
        """Store a sealed vending key; replaces the one with the same (sgc, krn)."""
        await self._write(self._put_vending_key, key)

    def _put_vending_key(self, key: SealedVendingKey) -> Steps[None]:
        _, now = self._now()
        yield run(
            "INSERT INTO vending_keys (sgc, krn, key_type, ea, dkga, base_date, nonce,"
            " ciphertext, tag, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (sgc, krn) DO UPDATE SET key_type = excluded.key_type,"
            " ea = excluded.ea, dkga = excluded.dkga, base_date = excluded.base_date,"
            " nonce = excluded.nonce, ciphertext = excluded.ciphertext, tag = excluded.tag,"
            " created_at = excluded.created_at",
            *_key_row(key, now),
        )
        yield self._event(
            None, "vending_key_stored", "operator", {"sgc": key.sgc, "krn": key.krn}, now
        )

    async def add_vending_key(self, key: SealedVendingKey) -> bool:
        """Store a sealed vending key unless one with its (sgc, krn) exists; True if stored.

        Never replaces: two instances seeding one empty database at once both call this, one
        key wins, and both then read the winner (``vending_keys``).
        """
        return await self._write(self._add_vending_key, key)

    def _add_vending_key(self, key: SealedVendingKey) -> Steps[bool]:
        _, now = self._now()
        added = yield one(
            "INSERT INTO vending_keys (sgc, krn, key_type, ea, dkga, base_date, nonce,"
            " ciphertext, tag, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (sgc, krn) DO NOTHING RETURNING sgc",
            *_key_row(key, now),
        )
        if added is None:
            return False
        yield self._event(
            None, "vending_key_stored", "operator", {"sgc": key.sgc, "krn": key.krn}, now
        )
        return True

    async def vending_keys(self) -> list[SealedVendingKey]:
        """Every sealed vending key."""
        return await self._read(self._vending_keys)

    @staticmethod
    def _vending_keys() -> Steps[list[SealedVendingKey]]:
        found = yield rows("SELECT * FROM vending_keys ORDER BY sgc, krn")
        return [sealed_of(row) for row in found]

    # -- purchases ------------------------------------------------------------------------------

    async def open_purchase(self, draft: PurchaseDraft, *, actor: str) -> Purchase:
        """Open a purchase in CREATED; the same idempotency key returns the same purchase."""
        return await self._write(self._open_purchase, draft, actor)

    def _open_purchase(self, draft: PurchaseDraft, actor: str) -> Steps[Purchase]:
        if (yield one(_METER_EXISTS, draft.meter)) is None:
            existing = yield one(_BY_IDEMPOTENCY_KEY, draft.idempotency_key)
            if existing is None:
                raise NotFound("meter", draft.meter)
            return self._same_request(draft, existing)
        created, now = self._now()
        # Racing writers (PostgreSQL instances): the first insert wins, the others wait for its
        # commit and then read its row (READ COMMITTED takes a fresh snapshot per statement).
        row = yield one(
            "INSERT INTO purchases (purchase_id, channel, phone, meter, amount_minor, currency,"
            " units, tariff_id, state, idempotency_key, provider, created_at, updated_at,"
            " next_check_at, debt_recovery_minor)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (idempotency_key) DO NOTHING RETURNING *",
            draft.purchase_id,
            draft.channel,
            draft.phone,
            draft.meter,
            draft.amount.amount_minor,
            draft.amount.currency,
            draft.units,
            draft.tariff_id,
            PurchaseState.CREATED.value,
            draft.idempotency_key,
            draft.provider,
            now,
            now,
            self._stamp(draft.first_check_at or created + timedelta(seconds=ORPHAN_CHECK_AFTER_S)),
            draft.debt_recovery_minor,
        )
        if row is None:
            existing = yield one(_BY_IDEMPOTENCY_KEY, draft.idempotency_key)
            assert existing is not None  # noqa: S101 - the conflict was on this key
            return self._same_request(draft, existing)
        yield self._event(
            draft.purchase_id,
            "purchase_created",
            actor,
            {
                "channel": draft.channel,
                "meter": draft.meter,
                "amount_minor": draft.amount.amount_minor,
                "currency": draft.amount.currency,
                "units": draft.units,
                "provider": draft.provider,
                **(
                    {"debt_recovery_minor": draft.debt_recovery_minor}
                    if draft.debt_recovery_minor
                    else {}
                ),
            },
            now,
        )
        return purchase_of(row)

    @staticmethod
    def _same_request(draft: PurchaseDraft, row: Row) -> Purchase:
        existing = purchase_of(row)
        if (
            existing.phone != draft.phone
            or existing.meter != draft.meter
            or existing.amount != draft.amount
            or existing.channel != draft.channel
        ):
            raise IdempotencyConflict(
                f"idempotency key {draft.idempotency_key!r} belongs to purchase"
                f" {existing.purchase_id} ({existing.amount} for meter {existing.meter})",
                constraint="purchases.idempotency_key",
                key=draft.idempotency_key,
            )
        return existing

    async def get_purchase(self, purchase_id: str) -> Purchase:
        """The purchase. Raises ``NotFound``."""
        return await self._read(self._get_purchase, purchase_id, hot=True)

    @staticmethod
    def _get_purchase(purchase_id: str) -> Steps[Purchase]:
        row = yield one(_PURCHASE, purchase_id)
        if row is None:
            raise NotFound("purchase", purchase_id)
        return purchase_of(row)

    async def find_purchases(
        self,
        *,
        phone: str | None = None,
        meter: str | None = None,
        states: Sequence[PurchaseState] | None = None,
        limit: int = 20,
    ) -> list[Purchase]:
        """Purchases matching every given filter, newest first."""
        return await self._read(self._find_purchases, phone, meter, states, limit)

    @staticmethod
    def _find_purchases(
        phone: str | None, meter: str | None, states: Sequence[PurchaseState] | None, limit: int
    ) -> Steps[list[Purchase]]:
        clauses: list[str] = []
        params: list[object] = []
        if phone is not None:
            clauses.append("phone = ?")
            params.append(phone)
        if meter is not None:
            clauses.append("meter = ?")
            params.append(meter)
        if states:
            clauses.append(f"state IN ({_marks(states)})")
            params.extend(state.value for state in states)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        found = yield rows(
            f"SELECT * FROM purchases {where} ORDER BY created_at DESC, purchase_id LIMIT ?",  # noqa: S608 - clauses are ours
            *params,
            limit,
        )
        return [purchase_of(row) for row in found]

    async def transition(
        self,
        purchase_id: str,
        to: PurchaseState,
        *,
        kind: str,
        actor: str,
        data: Mapping[str, Any] | None = None,
    ) -> Purchase:
        """Move a purchase to ``to`` with its event; a no-op if it is there already."""
        return await self._write(self._transition, purchase_id, to, kind, actor, data)

    def _transition(
        self,
        purchase_id: str,
        to: PurchaseState,
        kind: str,
        actor: str,
        data: Mapping[str, Any] | None,
    ) -> Steps[Purchase]:
        row = yield from self._lock_purchase(purchase_id)
        if row["state"] != to.value:
            row = yield from self._move(row, to, kind, actor, data)
        return purchase_of(row)

    async def attach_payment(
        self, purchase_id: str, *, provider: str, reference: str, actor: str
    ) -> Purchase:
        """The provider accepted the collection: payment row, reference, AWAITING_PAYMENT."""
        return await self._write(self._attach_payment, purchase_id, provider, reference, actor)

    def _attach_payment(
        self, purchase_id: str, provider: str, reference: str, actor: str
    ) -> Steps[Purchase]:
        row = yield from self._lock_purchase(purchase_id)
        _, now = self._now()
        yield run(
            "INSERT INTO payments (purchase_id, provider, reference, amount_minor, currency,"
            " state, payer, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (provider, reference) DO NOTHING",
            purchase_id,
            provider,
            reference,
            row["amount_minor"],
            row["currency"],
            PaymentRecordState.PENDING.value,
            row["phone"],
            now,
            now,
        )
        payment = yield one(_PAYMENT_OWNER + " FOR UPDATE", provider, reference)
        owner = payment["purchase_id"] if payment is not None else None
        if owner is None:
            yield run(
                "UPDATE payments SET purchase_id = ?, updated_at = ?"
                " WHERE provider = ? AND reference = ?",
                purchase_id,
                now,
                provider,
                reference,
            )
        elif owner != purchase_id:
            raise _not_owner(provider, reference, owner, purchase_id)
        if row["provider_reference"] is None:
            updated = yield one(
                "UPDATE purchases SET provider_reference = ?, provider = ?, updated_at = ?"
                " WHERE purchase_id = ? RETURNING *",
                reference,
                provider,
                now,
                purchase_id,
            )
            assert updated is not None  # noqa: S101 - the row is locked: it is there
            row = updated
        if row["state"] == PurchaseState.CREATED.value:
            row = yield from self._move(
                row,
                PurchaseState.AWAITING_PAYMENT,
                "payment_requested",
                actor,
                {"provider": provider, "reference": reference},
            )
        return purchase_of(row)

    async def record_notice(self, notice: NoticeRecord, *, actor: str) -> NoticeOutcome:
        """Keep a callback's claim and say which purchase it concerns.

        On PostgreSQL a copy of a notice already kept (the same payload, byte for byte:
        providers send their callbacks again, balancers duplicate them) and the first notice of
        a collection we asked for are one statement each (``_notice_once``): no transaction.
        Anything else, and every notice on SQLite, takes the full path in one transaction.
        """
        if self.modifies_in_with:  # PostgreSQL: both common cases in one statement
            done = await self._write(self._notice_once, notice, actor, atomic=False)
            if done is not None:
                return done
        # SQLite: one operation in the writer thread (a round trip there is a queue hop, and
        # the writer's batch commits it with others: two operations would cost more than four
        # statements in one).
        return await self._write(self._record_notice, notice, actor)

    def _notice_once(self, notice: NoticeRecord, actor: str) -> Steps[NoticeOutcome | None]:
        """PostgreSQL: a repeated or first notice in one statement; None (nothing written) else.

        A repeated notice gets its audit line; the first notice of an attached collection is
        kept with its audit line. The statement sees one snapshot: the payload is kept only
        where none was (a concurrent first notice makes it keep nothing: the full path then
        sorts it out), and the audit line is inserted from what was kept or found, so it never
        exists alone.
        """
        _, now = self._now()
        data = {
            "provider": notice.provider,
            "reference": notice.reference,
            "claimed_state": notice.claimed_state,
            "duplicate": False,
            "payload_hash": notice.payload_hash,
        }
        first, repeated = to_json(data), to_json({**data, "duplicate": True})
        row = yield one(
            _NOTICE_ONCE,
            notice.raw,
            notice.payload_hash,
            now,
            notice.receipt,
            notice.provider,
            notice.reference,
            notice.provider,
            notice.reference,
            notice.payload_hash,
            actor,
            repeated,
            first,
            now,
            repeated,
            notice.provider,
            notice.reference,
        )
        if row is None:
            return None
        purchase_id = row["purchase_id"]
        duplicate = bool(row["duplicate"])
        return NoticeOutcome(
            purchase_id=PurchaseId(purchase_id) if purchase_id else None,
            is_duplicate=duplicate,
            payload_conflict=False,
            # As the statement's snapshot saw it (before this statement's own change).
            payment_settled=duplicate and row["payment_state"] in _PROVEN_PAID,
        )

    def _record_notice(self, notice: NoticeRecord, actor: str) -> Steps[NoticeOutcome]:
        _, now = self._now()
        inserted = yield one(
            "INSERT INTO payments (provider, reference, amount_minor, currency, state, payer,"
            " receipt, payload, payload_hash, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (provider, reference) DO NOTHING RETURNING payment_id",
            notice.provider,
            notice.reference,
            notice.amount.amount_minor if notice.amount else None,
            notice.amount.currency if notice.amount else None,
            PaymentRecordState.PENDING.value,
            notice.payer,
            notice.receipt,
            notice.raw,
            notice.payload_hash,
            now,
            now,
        )
        duplicate = False
        conflict = False
        purchase_id: str | None = None
        if inserted is None:
            row = yield one(
                "SELECT purchase_id, payload_hash FROM payments"
                " WHERE provider = ? AND reference = ? FOR UPDATE",
                notice.provider,
                notice.reference,
            )
            assert row is not None  # noqa: S101 - the conflict was on this reference
            purchase_id = row["purchase_id"]
            if row["payload_hash"] is None:
                # The callback's receipt is kept: a status answer may carry none (Daraja STK).
                yield run(
                    "UPDATE payments SET payload = ?, payload_hash = ?, updated_at = ?,"
                    " receipt = COALESCE(receipt, ?) WHERE provider = ? AND reference = ?",
                    notice.raw,
                    notice.payload_hash,
                    now,
                    notice.receipt,
                    notice.provider,
                    notice.reference,
                )
            else:
                duplicate = True
                conflict = row["payload_hash"] != notice.payload_hash
        if notice.pending_claim and purchase_id is None:
            moment, _ = self._now()
            yield run(
                "INSERT INTO pending_claims (provider, reference, received_at, next_try_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (provider, reference) DO NOTHING",
                notice.provider,
                notice.reference,
                now,
                self._stamp(moment + timedelta(seconds=PENDING_CLAIM_LEASE_S)),
            )
        yield self._event(
            purchase_id,
            "notice_payload_conflict" if conflict else "payment_notice",
            actor,
            {
                "provider": notice.provider,
                "reference": notice.reference,
                "claimed_state": notice.claimed_state,
                "duplicate": duplicate,
                "payload_hash": notice.payload_hash,
            },
            now,
        )
        return NoticeOutcome(
            purchase_id=PurchaseId(purchase_id) if purchase_id else None,
            is_duplicate=duplicate,
            payload_conflict=conflict,
        )

    async def record_c2b_validation(
        self, *, provider: str, trans_id: str, account: str, amount: Money, payer: Msisdn | None
    ) -> None:
        """Keep what a C2B validation said of ``trans_id`` (the first one; later ones ignored)."""
        await self._write(
            self._record_c2b_validation, provider, trans_id, account, amount, payer, atomic=False
        )

    def _record_c2b_validation(
        self, provider: str, trans_id: str, account: str, amount: Money, payer: Msisdn | None
    ) -> Steps[None]:
        moment, now = self._now()
        yield batch(
            run(
                "DELETE FROM c2b_validations WHERE validated_at < ?",
                self._stamp(moment - timedelta(seconds=C2B_VALIDATION_KEEP_S)),
            ),
            run(
                "INSERT INTO c2b_validations (provider, trans_id, account, amount_minor,"
                " currency, payer, validated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (provider, trans_id) DO NOTHING",
                provider,
                trans_id,
                account,
                amount.amount_minor,
                amount.currency,
                payer,
                now,
            ),
        )

    async def c2b_validation(self, provider: str, trans_id: str) -> C2bValidation | None:
        """What the C2B validation of ``trans_id`` said, if one was recorded."""
        return await self._read(self._c2b_validation, provider, trans_id)

    @staticmethod
    def _c2b_validation(provider: str, trans_id: str) -> Steps[C2bValidation | None]:
        row = yield one(
            "SELECT * FROM c2b_validations WHERE provider = ? AND trans_id = ?", provider, trans_id
        )
        if row is None:
            return None
        return C2bValidation(
            provider=row["provider"],
            trans_id=row["trans_id"],
            account=row["account"],
            amount=Money(int(row["amount_minor"]), row["currency"]),
            payer=Msisdn(row["payer"]) if row["payer"] else None,
            validated_at=when(row["validated_at"]),
        )

    async def claim_finished(self, provider: str, reference: str) -> None:
        """A pending claim was carried through (refused, or its purchase opened): forget it."""
        await self._write(self._claim_finished, provider, reference, atomic=False)

    @staticmethod
    def _claim_finished(provider: str, reference: str) -> Steps[None]:
        yield run(
            "DELETE FROM pending_claims WHERE provider = ? AND reference = ?", provider, reference
        )

    async def take_pending_claims(self, *, limit: int = 100) -> list[PendingClaim]:
        """Claims due (their lease passed), each leased for ``PENDING_CLAIM_LEASE_S`` more."""
        return await self._write(self._take_pending_claims, limit)

    def _take_pending_claims(self, limit: int) -> Steps[list[PendingClaim]]:
        moment, now = self._now()
        taken = yield rows(
            "UPDATE pending_claims SET attempts = attempts + 1, next_try_at = ?"
            " WHERE (provider, reference) IN (SELECT provider, reference FROM pending_claims"
            " WHERE next_try_at <= ? ORDER BY next_try_at LIMIT ? FOR UPDATE SKIP LOCKED)"
            " RETURNING provider, reference, attempts",
            self._stamp(moment + timedelta(seconds=PENDING_CLAIM_LEASE_S)),
            now,
            limit,
        )
        claims = []
        for row in taken:
            payment = yield one(
                "SELECT payload FROM payments WHERE provider = ? AND reference = ?",
                row["provider"],
                row["reference"],
            )
            payload = None if payment is None or payment["payload"] is None else payment["payload"]
            claims.append(
                PendingClaim(
                    provider=row["provider"],
                    reference=row["reference"],
                    payload=None if payload is None else bytes(payload),
                    attempts=int(row["attempts"]),
                )
            )
        return claims

    async def get_payment(self, provider: str, reference: str) -> PaymentRecord | None:
        """The payment row for (provider, reference), if any."""
        return await self._read(self._get_payment, provider, reference)

    @staticmethod
    def _get_payment(provider: str, reference: str) -> Steps[PaymentRecord | None]:
        row = yield one(
            "SELECT * FROM payments WHERE provider = ? AND reference = ?", provider, reference
        )
        return payment_of(row) if row is not None else None

    def _settle_payment_row(
        self, purchase_id: str, payment: ConfirmedPayment, state: PaymentRecordState
    ) -> Steps[None]:
        """Settle the payment row; ``ReceiptReused`` when its receipt proves another row already.

        The row is there most often (the collection was attached): one UPDATE settles it if it
        has no purchase or ours. Otherwise one statement inserts it or, when another writer
        inserted it meanwhile, settles it under the row's lock; nothing returned means another
        purchase owns the reference.
        """
        try:
            settled = yield from self._upsert_payment(purchase_id, payment, state)
        except DuplicateError as exc:
            raise _receipt_refusal(exc, payment.provider, payment.receipt) from exc
        if settled is None:
            owner = yield one(_PAYMENT_OWNER, payment.provider, payment.reference)
            raise _not_owner(
                payment.provider,
                payment.reference,
                owner["purchase_id"] if owner is not None else None,
                purchase_id,
            )

    def _upsert_payment(
        self, purchase_id: str, payment: ConfirmedPayment, state: PaymentRecordState
    ) -> Steps[object]:
        """The settled row's id (its update count when it was there), None if another owns it.

        The row's receipt becomes the one the provider's records proved (None: none), never a
        callback's claim kept from ``record_notice``: a claim takes no receipt unproven.
        """
        _, now = self._now()
        updated: int = yield run(
            "UPDATE payments SET amount_minor = ?, currency = ?, state = ?, payer = ?,"
            " receipt = ?, updated_at = ?, purchase_id = ?"
            " WHERE provider = ? AND reference = ? AND (purchase_id IS NULL OR purchase_id = ?)",
            payment.amount.amount_minor,
            payment.amount.currency,
            state.value,
            payment.payer,
            payment.receipt,
            now,
            purchase_id,
            payment.provider,
            payment.reference,
            purchase_id,
        )
        if updated == 1:
            return updated
        settled = yield one(
            "INSERT INTO payments (purchase_id, provider, reference, amount_minor, currency,"
            " state, payer, receipt, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (provider, reference) DO UPDATE SET"
            " amount_minor = excluded.amount_minor, currency = excluded.currency,"
            " state = excluded.state, payer = excluded.payer,"
            " receipt = excluded.receipt,"
            " updated_at = excluded.updated_at, purchase_id = excluded.purchase_id"
            " WHERE payments.purchase_id IS NULL OR payments.purchase_id = excluded.purchase_id"
            " RETURNING payment_id",
            purchase_id,
            payment.provider,
            payment.reference,
            payment.amount.amount_minor,
            payment.amount.currency,
            state.value,
            payment.payer,
            payment.receipt,
            now,
            now,
        )
        return settled

    def _pay(
        self, row: Row, payment: ConfirmedPayment, actor: str, *, move: bool = True
    ) -> Steps[Row]:
        """Record the (locked) purchase ``row`` paid by ``payment``; the updated row.

        Already PAID, VENDED, DELIVERED or VEND_FAILED: unchanged. ``move=False``: the state
        column is left to the caller's next move (``record_vend``), the event is written, and
        the row returned is ``row`` as it was (its ``provider_reference`` may be None still).
        """
        purchase_id = row["purchase_id"]
        current = PurchaseState(row["state"])
        if current in _PAID_OR_LATER:
            return row
        if not is_legal(current, PurchaseState.PAID):
            raise IllegalTransition(purchase_id, current, PurchaseState.PAID)
        yield from self._settle_payment_row(purchase_id, payment, PaymentRecordState.SUCCEEDED)
        if row["provider_reference"] is None:  # the move below reads the row again
            yield run(
                "UPDATE purchases SET provider_reference = ? WHERE purchase_id = ?",
                payment.reference,
                purchase_id,
            )
        data = {
            "provider": payment.provider,
            "reference": payment.reference,
            "receipt": payment.receipt,
            "amount_minor": payment.amount.amount_minor,
            "currency": payment.amount.currency,
            "late": current in {PurchaseState.EXPIRED, PurchaseState.PAYMENT_FAILED},
        }
        if move:
            return (
                yield from self._move(row, PurchaseState.PAID, "payment_confirmed", actor, data)
            )
        yield self._event(
            purchase_id,
            "payment_confirmed",
            actor,
            {**data, "from": current, "to": PurchaseState.PAID},
        )
        return row

    async def mark_paid(
        self, purchase_id: str, payment: ConfirmedPayment, *, actor: str
    ) -> Purchase:
        """A proven payment: payment row SUCCEEDED and the purchase PAID, one transaction."""
        return await self._write(self._mark_paid, purchase_id, payment, actor)

    def _mark_paid(
        self, purchase_id: str, payment: ConfirmedPayment, actor: str
    ) -> Steps[Purchase]:
        row = yield from self._lock_purchase(purchase_id)
        return purchase_of((yield from self._pay(row, payment, actor)))

    async def mark_payment_mismatch(
        self, purchase_id: str, payment: ConfirmedPayment, *, expected: Money, actor: str
    ) -> Purchase:
        """A proven payment of the wrong amount/currency/payer: REFUND_PENDING; never vends."""
        return await self._write(self._mark_payment_mismatch, purchase_id, payment, expected, actor)

    def _mark_payment_mismatch(
        self, purchase_id: str, payment: ConfirmedPayment, expected: Money, actor: str
    ) -> Steps[Purchase]:
        row = yield from self._lock_purchase(purchase_id)
        yield from self._settle_payment_row(purchase_id, payment, PaymentRecordState.MISMATCHED)
        data = {
            "provider": payment.provider,
            "reference": payment.reference,
            "paid_minor": payment.amount.amount_minor,
            "paid_currency": payment.amount.currency,
            "expected_minor": expected.amount_minor,
            "expected_currency": expected.currency,
            "payer": payment.payer,
        }
        yield self._event(purchase_id, "amount_mismatch", actor, data)
        current = PurchaseState(row["state"])
        if current is not PurchaseState.REFUND_PENDING and is_legal(
            current, PurchaseState.REFUND_PENDING
        ):
            row = yield from self._move(
                row, PurchaseState.REFUND_PENDING, "refund_needed", actor, data
            )
        return purchase_of(row)

    async def prove_receipt(self, provider: str, reference: str, receipt: str) -> None:
        """Record the receipt the provider's records prove for a payment row."""
        await self._write(self._prove_receipt, provider, reference, receipt, atomic=False)

    def _prove_receipt(self, provider: str, reference: str, receipt: str) -> Steps[None]:
        try:
            updated: int = yield run(
                "UPDATE payments SET receipt = ?, updated_at = ?"
                " WHERE provider = ? AND reference = ?",
                receipt,
                self._stamp(self._clock()),
                provider,
                reference,
            )
        except DuplicateError as exc:
            raise _receipt_refusal(exc, provider, receipt) from exc
        if updated != 1:
            raise NotFound("payment", f"{provider}:{reference}")

    async def record_status_query(
        self, *, provider: str, conversation_id: str, originator_id: str, transaction_id: str
    ) -> str | None:
        """Keep a status query the provider acknowledged. Idempotent.

        A result that came before it (held by ``answer_status_query``) is judged now, in the
        same transaction: its outcome (``STATUS_ACCEPTED`` …) is returned, None if none came.
        """
        return await self._write(
            self._record_status_query, provider, conversation_id, originator_id, transaction_id
        )

    def _record_status_query(
        self, provider: str, conversation_id: str, originator_id: str, transaction_id: str
    ) -> Steps[str | None]:
        # The result's write takes the same lock: one of the two sees the other (PostgreSQL's
        # READ COMMITTED would otherwise let both miss each other's uncommitted row).
        yield lock(f"status_query:{conversation_id}")
        moment, now = self._now()
        yield batch(
            run(
                "DELETE FROM status_queries WHERE asked_at < ?",
                self._stamp(moment - timedelta(seconds=STATUS_QUERY_KEEP_S)),
            ),
            run(
                "INSERT INTO status_queries (conversation_id, originator_id, provider,"
                " transaction_id, asked_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (conversation_id) DO NOTHING",
                conversation_id,
                originator_id,
                provider,
                transaction_id,
                now,
            ),
        )
        early = yield one(
            "SELECT provider, originator_id, transaction_id, result FROM status_results_early"
            " WHERE conversation_id = ? AND outcome IS NULL",
            conversation_id,
        )
        if early is None:
            return None
        if early["provider"] != provider or early["originator_id"] != originator_id:
            outcome = STATUS_UNMATCHED
        elif early["transaction_id"] != transaction_id:
            outcome = STATUS_CONTRADICTED
        else:
            answered: int = yield run(
                "UPDATE status_queries SET result = ?, answered_at = ?"
                " WHERE conversation_id = ? AND answered_at IS NULL",
                bytes(early["result"]),
                now,
                conversation_id,
            )
            outcome = STATUS_ACCEPTED if answered else STATUS_UNMATCHED
        yield run(
            "UPDATE status_results_early SET outcome = ?, result = ? WHERE conversation_id = ?",
            outcome,
            b"",
            conversation_id,
        )
        return outcome

    async def answer_status_query(
        self,
        *,
        provider: str,
        conversation_id: str,
        originator_id: str,
        transaction_id: str,
        result: bytes,
    ) -> str:
        """Store a result for the unanswered query it names, once (the row locked).

        A result naming no recorded query is held for one recorded soon after
        (``STATUS_HELD``), within ``STATUS_EARLY_MAX`` results of ``STATUS_EARLY_MAX_BYTES``.
        """
        return await self._write(
            self._answer_status_query,
            provider,
            conversation_id,
            originator_id,
            transaction_id,
            result,
        )

    def _answer_status_query(
        self,
        provider: str,
        conversation_id: str,
        originator_id: str,
        transaction_id: str,
        result: bytes,
    ) -> Steps[str]:
        yield lock(f"status_query:{conversation_id}")
        row = yield one(
            "SELECT originator_id, provider, transaction_id, answered_at FROM status_queries"
            " WHERE conversation_id = ? FOR UPDATE",
            conversation_id,
        )
        if row is None:
            return (
                yield from self._hold_status_result(
                    provider, conversation_id, originator_id, transaction_id, result
                )
            )
        if (
            row["provider"] != provider
            or row["originator_id"] != originator_id
            or row["answered_at"] is not None
        ):
            return STATUS_UNMATCHED
        if row["transaction_id"] != transaction_id:
            return STATUS_CONTRADICTED
        yield run(
            "UPDATE status_queries SET result = ?, answered_at = ? WHERE conversation_id = ?",
            result,
            self._stamp(self._clock()),
            conversation_id,
        )
        return STATUS_ACCEPTED

    def _hold_status_result(
        self,
        provider: str,
        conversation_id: str,
        originator_id: str,
        transaction_id: str,
        result: bytes,
    ) -> Steps[str]:
        """Keep a result whose query is not recorded (yet): ``STATUS_HELD``, or unmatched."""
        if len(result) > STATUS_EARLY_MAX_BYTES:
            return STATUS_UNMATCHED
        moment, now = self._now()
        held = yield one(
            "SELECT count(*) AS n FROM status_results_early WHERE outcome IS NULL"
            " AND received_at >= ?",
            self._stamp(moment - timedelta(seconds=STATUS_EARLY_KEEP_S)),
        )
        if held is not None and int(held["n"]) >= STATUS_EARLY_MAX:
            return STATUS_UNMATCHED
        inserted: int = yield batch(
            run(
                "DELETE FROM status_results_early WHERE received_at < ?",
                self._stamp(moment - timedelta(seconds=STATUS_EARLY_KEEP_S)),
            ),
            run(
                "INSERT INTO status_results_early (conversation_id, provider, originator_id,"
                " transaction_id, result, received_at) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (conversation_id) DO NOTHING",
                conversation_id,
                provider,
                originator_id,
                transaction_id,
                result,
                now,
            ),
        )
        return STATUS_HELD if inserted else STATUS_UNMATCHED

    async def status_query_result(self, conversation_id: str) -> bytes | None:
        """The stored result of a query, None while it has none."""
        return await self._read(self._status_query_result, conversation_id)

    @staticmethod
    def _status_query_result(conversation_id: str) -> Steps[bytes | None]:
        row = yield one(
            "SELECT result FROM status_queries WHERE conversation_id = ?", conversation_id
        )
        return None if row is None or row["result"] is None else bytes(row["result"])

    async def held_status_outcome(self, conversation_id: str) -> str | None:
        """What became of a held result: None while its query is not recorded (or it is gone)."""
        return await self._read(self._held_status_outcome, conversation_id)

    @staticmethod
    def _held_status_outcome(conversation_id: str) -> Steps[str | None]:
        row = yield one(
            "SELECT outcome FROM status_results_early WHERE conversation_id = ?", conversation_id
        )
        return None if row is None else row["outcome"]

    async def schedule_check(self, purchase_id: str, *, at: datetime, attempts: int) -> None:
        """When the sweeper should next ask the provider about this purchase (ends its lease)."""
        await self._write(self._schedule_check, purchase_id, at, attempts, atomic=False)

    def _schedule_check(self, purchase_id: str, at: datetime, attempts: int) -> Steps[None]:
        yield run(
            "UPDATE purchases SET next_check_at = ?, check_attempts = ?, lease_until = NULL"
            " WHERE purchase_id = ?",
            self._stamp(at),
            attempts,
            purchase_id,
        )

    async def due_for_check(self, now: datetime, *, limit: int = 100) -> list[Purchase]:
        """CREATED or AWAITING_PAYMENT purchases whose next status check is due."""
        return await self._read(self._due_for_check, now, limit)

    def _due_for_check(self, now: datetime, limit: int) -> Steps[list[Purchase]]:
        found = yield rows(
            "SELECT * FROM purchases WHERE state IN (?, ?) AND next_check_at IS NOT NULL"
            " AND next_check_at <= ? ORDER BY next_check_at LIMIT ?",
            PurchaseState.CREATED.value,
            PurchaseState.AWAITING_PAYMENT.value,
            self._stamp(now),
            limit,
        )
        return [purchase_of(row) for row in found]

    async def claim_due_checks(
        self, now: datetime, *, lease_until: datetime, limit: int = 100
    ) -> list[Purchase]:
        """Claim purchases due for a payment check until ``lease_until``, oldest due first.

        Shared background work: the sweepers of every worker and instance claim disjoint
        purchases (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite's one writer serialises the
        claims), so a provider is asked about a purchase by one of them at a time. A claimed
        purchase is due again for nobody until its lease lapses (a crashed claimer's comes back
        then) or the check schedules the next one (``schedule_check`` ends the lease).
        """
        return await self._write(self._claim_due_checks, now, lease_until, limit, atomic=False)

    def _claim_due_checks(
        self, now: datetime, lease_until: datetime, limit: int
    ) -> Steps[list[Purchase]]:
        stamp = self._stamp(now)
        claimed = yield rows(
            "UPDATE purchases SET lease_until = ? WHERE purchase_id IN (SELECT purchase_id"
            " FROM purchases WHERE state IN (?, ?) AND next_check_at IS NOT NULL"
            " AND next_check_at <= ? AND (lease_until IS NULL OR lease_until <= ?)"
            " ORDER BY next_check_at LIMIT ? FOR UPDATE SKIP LOCKED) RETURNING *",
            self._stamp(lease_until),
            PurchaseState.CREATED.value,
            PurchaseState.AWAITING_PAYMENT.value,
            stamp,
            stamp,
            limit,
        )
        return sorted(
            (purchase_of(row) for row in claimed),
            key=lambda p: (p.next_check_at or now, p.purchase_id),
        )

    async def claim_paid_not_vended(
        self, now: datetime, *, lease_until: datetime, limit: int = 100
    ) -> list[Purchase]:
        """Claim PAID purchases without a vend until ``lease_until``, oldest first.

        The recovery's share of the background work: two sweepers never both try to vend one
        purchase (a vend is exactly-once through the ledger anyway; this saves the duplicate
        work). A purchase whose recovery failed comes back when its lease lapses.
        """
        return await self._write(self._claim_paid_not_vended, now, lease_until, limit, atomic=False)

    def _claim_paid_not_vended(
        self, now: datetime, lease_until: datetime, limit: int
    ) -> Steps[list[Purchase]]:
        claimed = yield rows(
            "UPDATE purchases SET lease_until = ? WHERE purchase_id IN (SELECT p.purchase_id"
            " FROM purchases p LEFT JOIN vends v ON v.purchase_id = p.purchase_id"
            " WHERE p.state = ? AND v.vend_id IS NULL"
            " AND (p.lease_until IS NULL OR p.lease_until <= ?)"
            " ORDER BY p.updated_at LIMIT ? FOR UPDATE OF p SKIP LOCKED) RETURNING *",
            self._stamp(lease_until),
            PurchaseState.PAID.value,
            self._stamp(now),
            limit,
        )
        return sorted(
            (purchase_of(row) for row in claimed), key=lambda p: (p.updated_at, p.purchase_id)
        )

    async def paid_not_vended(self, *, limit: int = 100) -> list[Purchase]:
        """PAID purchases without a vend, oldest first."""
        return await self._read(self._paid_not_vended, limit)

    @staticmethod
    def _paid_not_vended(limit: int) -> Steps[list[Purchase]]:
        found = yield rows(
            "SELECT p.* FROM purchases p LEFT JOIN vends v ON v.purchase_id = p.purchase_id"
            " WHERE p.state = ? AND v.vend_id IS NULL ORDER BY p.updated_at LIMIT ?",
            PurchaseState.PAID.value,
            limit,
        )
        return [purchase_of(row) for row in found]

    # -- vends ----------------------------------------------------------------------------------

    async def vend_context(self, purchase_id: str) -> VendContext:
        """The purchase, its meter, vend, receipt and language in one read."""
        return await self._read(self._vend_context, purchase_id, hot=True)

    @staticmethod
    def _vend_context(purchase_id: str) -> Steps[VendContext]:
        row = yield one(VEND_CONTEXT, purchase_id)
        if row is None:
            raise NotFound("purchase", purchase_id)
        return VendContext(
            purchase=purchase_of(row),
            meter=meter_of(row, "m_"),
            vend=vend_of(row, "v_") if row["v_tid"] is not None else None,
            receipt=row["pay_receipt"],
            language=row["language"],
            key_change=key_change_of(row, "kc_") if row["kc_change_id"] is not None else None,
            fbe_allowance=row["fbe_allowance"] or 0,
        )

    async def record_vend(
        self, draft: VendDraft, *, actor: str, payment: ConfirmedPayment | None = None
    ) -> VendOutcome:
        """Store a vend (with its payment, if given) in one transaction.

        The common path is ten statements: the purchase (locked) with its vend check, the
        payment row and its event, the meter's TID compare-and-set (which also serialises
        writers of one meter: the loser finds the TID moved, gets ``TidConflict`` and nothing of
        its transaction stays), the vend, one state update to VENDED (the PAID step, when the
        payment comes along, is recorded by its event), its event and the message.
        """
        return await self._write(self._record_vend, draft, actor, payment)

    def _record_vend(
        self, draft: VendDraft, actor: str, payment: ConfirmedPayment | None
    ) -> Steps[VendOutcome]:
        if draft.mint is not None:
            return (yield from self._record_minted_vend(draft, actor, payment))
        row = yield one(
            "SELECT p.*, v.vend_id FROM purchases p"
            " LEFT JOIN vends v ON v.purchase_id = p.purchase_id WHERE p.purchase_id = ?"
            " FOR UPDATE OF p",
            draft.purchase_id,
        )
        replayed = yield from self._replayed_vend(draft, row)
        if replayed is not None:
            return replayed
        row, current = yield from self._paid_for_vend(row, draft, actor, payment)
        if not is_legal(current, PurchaseState.VENDED):
            raise IllegalTransition(draft.purchase_id, current, PurchaseState.VENDED)
        created, now = self._now()
        if draft.key_change_id is not None:
            yield from self._apply_key_change(draft, now)
        else:
            yield from self._advance_tid(draft)
        return (yield from self._store_vend(draft, row, current, actor, payment, created, now))

    def _record_minted_vend(
        self, draft: VendDraft, actor: str, payment: ConfirmedPayment | None
    ) -> Steps[VendOutcome]:
        """The vend whose tokens are made under the meter's row lock (``VendDraft.mint``).

        Four round trips on PostgreSQL: ``BEGIN``; the purchase and its meter locked in one
        statement (purchase first, the order every writer keeps); the mint; one fused statement
        with the payment settled (when it is the purchase's own attached collection, the common
        case), the meter's new last TID, the vend, the state, the events and the message; and
        ``COMMIT``. The lock is held until the commit: another instance's vend of this meter
        waits, then reads the TID this one stored, so TIDs never conflict and none is skipped.
        """
        assert draft.key_change_id is None  # noqa: S101 - the contract: no mint with a key change
        mint = draft.mint
        assert mint is not None  # noqa: S101 - the caller's branch
        row = yield one(_LOCK_PURCHASE_AND_METER, draft.purchase_id)
        replayed = yield from self._replayed_vend(draft, row)
        if replayed is not None:
            return replayed
        current = PurchaseState(row["state"])
        settle: list[Stmt] = []
        confirmed_from: PurchaseState | None = None
        if (
            payment is not None
            and current not in _PAID_OR_LATER
            and row["provider"] == payment.provider
            and row["provider_reference"] == payment.reference
        ):
            # The purchase's own attached collection: its row is there and is this purchase's
            # (``attach_payment``), so settling it joins the final statement.
            if not is_legal(current, PurchaseState.PAID):
                raise IllegalTransition(draft.purchase_id, current, PurchaseState.PAID)
            settle = [self._settle_attached(draft.purchase_id, payment)]
            confirmed_from, current = current, PurchaseState.PAID
        else:
            row, current = yield from self._paid_for_vend(row, draft, actor, payment)
        if not is_legal(current, PurchaseState.VENDED):
            raise IllegalTransition(draft.purchase_id, current, PurchaseState.VENDED)
        meter = meter_of(row, "m_")
        minted: Minted = yield call(mint, meter)
        if meter.last_tid is not None and minted.tid <= meter.last_tid:
            raise LedgerError(f"minted TID {minted.tid} is not after the meter's {meter.last_tid}")
        draft = dataclasses.replace(
            draft,
            tid=minted.tid,
            token=minted.token,
            message=minted.message,
            fbe=minted.fbe,
            expected_last_tid=meter.last_tid,
            mint=None,
        )
        advance = run(
            "UPDATE meters SET last_tid = ? WHERE drn = ?",
            draft.fbe.tid if draft.fbe else draft.tid,
            draft.meter,
        )
        created, now = self._now()
        try:
            return (
                yield from self._store_vend(
                    draft,
                    row,
                    current,
                    actor,
                    payment,
                    created,
                    now,
                    first=[*settle, advance],
                    confirmed_from=confirmed_from,
                )
            )
        except DuplicateError as exc:
            if settle and payment is not None:
                raise _receipt_refusal(exc, payment.provider, payment.receipt) from exc
            raise

    def _settle_attached(self, purchase_id: str, payment: ConfirmedPayment) -> Stmt:
        """The attached payment row settled, as one statement of the vend's final batch.

        Its ``payment_confirmed`` event is written with the vend's (``_vend_events``).
        """
        _, now = self._now()
        return run(
            "UPDATE payments SET amount_minor = ?, currency = ?, state = ?, payer = ?,"
            " receipt = ?, updated_at = ? WHERE provider = ? AND reference = ?"
            " AND purchase_id = ?",
            payment.amount.amount_minor,
            payment.amount.currency,
            PaymentRecordState.SUCCEEDED.value,
            payment.payer,
            payment.receipt,
            now,
            payment.provider,
            payment.reference,
            purchase_id,
        )

    def _replayed_vend(self, draft: VendDraft, row: Row | None) -> Steps[VendOutcome | None]:
        """The purchase's stored vend when it has one (a replay), else None."""
        if row is None:
            raise NotFound("purchase", draft.purchase_id)
        current = PurchaseState(row["state"])
        # A lock that waited for another writer's vend returns the purchase as that writer left
        # it but the join as it was before (PostgreSQL, READ COMMITTED): a vended purchase
        # without a vend in the join is read again.
        if row["vend_id"] is not None or current in _VENDED_OR_LATER:
            existing = yield one("SELECT * FROM vends WHERE purchase_id = ?", draft.purchase_id)
            if existing is not None:
                return VendOutcome(vend=vend_of(existing), replayed=True, purchase=purchase_of(row))
        return None

    def _store_vend(  # noqa: PLR0913 - the vend's parts, all from _record_vend
        self,
        draft: VendDraft,
        row: Row,
        current: PurchaseState,
        actor: str,
        payment: ConfirmedPayment | None,
        created: datetime,
        now: object,
        *,
        first: Sequence[Stmt] = (),
        confirmed_from: PurchaseState | None = None,
    ) -> Steps[VendOutcome]:
        """The vend, the state VENDED, its events and its message: one batch after ``first``.

        ``confirmed_from``: ``first`` settled ``payment`` from that state (``_record_minted_vend``);
        its ``payment_confirmed`` event goes in the same statement, before ``token_vended``.
        """
        # The TID counts from the meter's base date (the new one after a key change, applied
        # above): one TID per (meter, base date, TID), schema 0004.
        # A vendor's sale with no customer phone queues no SMS: the vendor prints the token.
        message = draft.recipient is not None or draft.float_debit is None
        yield batch(
            *first,
            run(
                "INSERT INTO vends (purchase_id, meter, tid, token, units, receipt, created_at,"
                " key_change_tokens, base_date) VALUES (?, ?, ?, ?, ?, ?, ?, ?,"
                " (SELECT base_date FROM meters WHERE drn = ?))",
                draft.purchase_id,
                draft.meter,
                draft.tid,
                draft.token,
                draft.units,
                draft.receipt,
                now,
                " ".join(draft.key_change_tokens),
                draft.meter,
            ),
            run(
                "UPDATE purchases SET state = ?, updated_at = ? WHERE purchase_id = ?",
                PurchaseState.VENDED.value,
                now,
                draft.purchase_id,
            ),
            self._vend_events(draft, current, actor, payment, now, confirmed_from),
            *(
                [
                    run(
                        _QUEUE_MESSAGE,
                        draft.purchase_id,
                        MessageKind.TOKEN.value,
                        draft.recipient,
                        draft.message,
                        (OutboxState.PENDING if draft.recipient else OutboxState.HELD).value,
                        now,
                        now,
                        now,
                    )
                ]
                if message
                else []
            ),
        )
        if draft.debt_recovery_minor or draft.fbe is not None:
            yield from self._vend_extras(draft, row["currency"], actor, now)
        vend = Vend(
            purchase_id=draft.purchase_id,
            meter=draft.meter,
            tid=draft.tid,
            token=draft.token,
            units=draft.units,
            receipt=draft.receipt,
            created_at=created,
            key_change_tokens=draft.key_change_tokens,
        )
        purchase = dataclasses.replace(
            purchase_of(row),
            state=PurchaseState.VENDED,
            updated_at=created,
            provider_reference=row["provider_reference"]
            or (payment.reference if payment else None),
        )
        return VendOutcome(vend=vend, replayed=False, purchase=purchase)

    def _vend_events(
        self,
        draft: VendDraft,
        current: PurchaseState,
        actor: str,
        payment: ConfirmedPayment | None,
        now: object,
        confirmed_from: PurchaseState | None,
    ) -> Stmt:
        """``token_vended``, after ``payment_confirmed`` when paid in this statement: one insert.

        One multi-row ``INSERT`` keeps the two events in order (the fused batch's clauses run in
        no set order).
        """
        vended = (
            draft.purchase_id,
            "token_vended",
            actor,
            to_json(
                {
                    "meter": draft.meter,
                    "tid": draft.tid,
                    "units": draft.units,
                    "token_last4": draft.token[-4:],
                    "from": current,
                    "to": PurchaseState.VENDED,
                }
            ),
            now,
        )
        if confirmed_from is None or payment is None:
            return run(_EVENT, *vended)
        confirmed = (
            draft.purchase_id,
            "payment_confirmed",
            actor,
            to_json(
                {
                    "provider": payment.provider,
                    "reference": payment.reference,
                    "receipt": payment.receipt,
                    "amount_minor": payment.amount.amount_minor,
                    "currency": payment.amount.currency,
                    "late": confirmed_from in {PurchaseState.EXPIRED, PurchaseState.PAYMENT_FAILED},
                    "from": confirmed_from,
                    "to": PurchaseState.PAID,
                }
            ),
            now,
        )
        return run(_EVENT + ", (?, ?, ?, ?, ?)", *confirmed, *vended)

    def _advance_tid(self, draft: VendDraft) -> Steps[None]:
        """The meter's ``last_tid`` becomes the draft's, if still the one it was made from."""
        expected = draft.expected_last_tid
        if expected is not None and draft.tid <= expected:
            raise TidConflict(draft.meter, expected, expected)
        moved = yield run(
            "UPDATE meters SET last_tid = ? WHERE drn = ? AND last_tid IS NOT DISTINCT FROM ?",
            draft.fbe.tid if draft.fbe else draft.tid,  # an FBE token's TID follows
            draft.meter,
            expected,
        )
        if moved != 1:
            yield from self._tid_conflict(draft)

    def _paid_for_vend(
        self, row: Row, draft: VendDraft, actor: str, payment: ConfirmedPayment | None
    ) -> Steps[tuple[Row, PurchaseState]]:
        """The payment that comes with a vend (a provider's, or a vendor's float debit)."""
        current = PurchaseState(row["state"])
        if current in _PAID_OR_LATER:
            return row, current
        if payment is not None:
            row = yield from self._pay(row, payment, actor, move=False)
            return row, PurchaseState.PAID
        if draft.float_debit is not None:
            # A vendor's sale: the float pays in this transaction (gateway/ledger/vendor.py).
            yield from self._debit_float(row, draft.float_debit, actor)
            return row, PurchaseState.PAID
        return row, current

    def _vend_extras(self, draft: VendDraft, currency: str, actor: str, now: object) -> Steps[None]:
        """The vend's debt recovery and FBE token, when it carries them."""
        if draft.debt_recovery_minor:
            yield from self._recover_debt(draft, currency, actor, now)
        if draft.fbe is not None:
            yield from self._issue_fbe(draft, draft.fbe, actor, now)

    def _recover_debt(
        self, draft: VendDraft, currency: str, actor: str, now: object
    ) -> Steps[None]:
        """Take the draft's recovery off the meter's debt (compare-and-set), with its row."""
        recovered, expected = draft.debt_recovery_minor, draft.expected_debt_balance_minor
        if expected is None or not 0 < recovered <= expected:
            raise ValueError(f"cannot recover {recovered} of a debt of {expected}")
        moved = yield run(
            "UPDATE meter_debts SET balance_minor = balance_minor - ?,"
            " recovered_total_minor = recovered_total_minor + ?, updated_at = ?"
            " WHERE meter = ? AND balance_minor = ? AND currency = ?",
            recovered,
            recovered,
            now,
            draft.meter,
            expected,
            currency,
        )
        if moved != 1:
            raise VendConflict(draft.meter, "the debt balance")
        yield run(
            "INSERT INTO debt_recoveries (purchase_id, meter, amount_minor, currency,"
            " balance_after_minor, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            draft.purchase_id,
            draft.meter,
            recovered,
            currency,
            expected - recovered,
            now,
        )
        yield self._event(
            draft.purchase_id,
            "debt_recovered",
            actor,
            {
                "meter": draft.meter,
                "amount_minor": recovered,
                "currency": currency,
                "balance_before_minor": expected,
                "balance_after_minor": expected - recovered,
            },
            now,
        )

    def _issue_fbe(self, draft: VendDraft, fbe: FbeDraft, actor: str, now: object) -> Steps[None]:
        """Store the month's FBE token and queue its message; the month's second is refused."""
        if fbe.tid <= draft.tid or draft.key_change_id is not None:
            raise ValueError("an FBE token follows the credit token's TID, never with a key change")
        issued = yield one(
            "INSERT INTO fbe_issues (meter, month, purchase_id, tid, token, units, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (meter, month) DO NOTHING"
            " RETURNING issue_id",
            draft.meter,
            fbe.month,
            draft.purchase_id,
            fbe.tid,
            fbe.token,
            fbe.units,
            now,
        )
        if issued is None:
            raise VendConflict(draft.meter, f"free basic electricity for {fbe.month}")
        yield run(
            _QUEUE_MESSAGE,
            draft.purchase_id,
            MessageKind.FBE.value,
            draft.recipient,
            fbe.message,
            (OutboxState.PENDING if draft.recipient else OutboxState.HELD).value,
            now,
            now,
            now,
        )
        yield self._event(
            draft.purchase_id,
            "fbe_issued",
            actor,
            {
                "meter": draft.meter,
                "month": fbe.month,
                "tid": fbe.tid,
                "units": fbe.units,
                "token_last4": fbe.token[-4:],
            },
            now,
        )

    @staticmethod
    def _tid_conflict(draft: VendDraft) -> Generator[Stmt, Any, NoReturn]:
        meter = yield one("SELECT last_tid FROM meters WHERE drn = ?", draft.meter)
        if meter is None:
            raise NotFound("meter", draft.meter)
        raise TidConflict(draft.meter, draft.expected_last_tid, meter["last_tid"])

    def _apply_key_change(self, draft: VendDraft, now: object) -> Steps[None]:
        """The meter takes the pending change's key; ``last_tid`` restarts on a rollover."""
        row = yield one(
            "SELECT * FROM key_changes WHERE change_id = ? AND meter = ? AND state = ? FOR UPDATE",
            draft.key_change_id,
            draft.meter,
            KeyChangeState.PENDING.value,
        )
        if row is None:  # applied or superseded meanwhile: read again
            yield from self._tid_conflict(draft)
        assert row is not None  # noqa: S101 - _tid_conflict raises
        change = key_change_of(row)
        expected = draft.expected_last_tid
        if not change.rollover and expected is not None and draft.tid <= expected:
            raise TidConflict(draft.meter, expected, expected)
        moved = yield run(
            "UPDATE meters SET last_tid = ?, sgc = ?, krn = ?, tariff_index = ?, base_date = ?"
            " WHERE drn = ? AND last_tid IS NOT DISTINCT FROM ? AND sgc = ? AND krn = ?"
            " AND base_date = ?",
            draft.tid,
            change.sgc,
            change.krn,
            change.tariff_index,
            change.base_date,
            draft.meter,
            expected,
            change.from_sgc,
            change.from_krn,
            change.from_base_date,
        )
        if moved != 1:
            yield from self._tid_conflict(draft)
        yield run(
            "UPDATE key_changes SET state = ?, applied_at = ?, purchase_id = ? WHERE change_id = ?",
            KeyChangeState.APPLIED.value,
            now,
            draft.purchase_id,
            change.change_id,
        )
        yield self._event(
            draft.purchase_id,
            "key_changed",
            "saga",
            {
                "meter": draft.meter,
                "change_id": change.change_id,
                "from": f"{change.from_sgc}/{change.from_krn}/{change.from_base_date}",
                "to": f"{change.sgc}/{change.krn}/{change.base_date}",
                "rollover": change.rollover,
                "tokens": len(draft.key_change_tokens),
                "tid": draft.tid,
            },
            now,
        )

    async def get_vend(self, purchase_id: str) -> Vend | None:
        """The purchase's vend, if it has one."""
        return await self._read(self._get_vend, purchase_id)

    @staticmethod
    def _get_vend(purchase_id: str) -> Steps[Vend | None]:
        row = yield one("SELECT * FROM vends WHERE purchase_id = ?", purchase_id)
        return vend_of(row) if row is not None else None

    async def last_vend(self, phone: str, meter: str | None = None) -> Vend | None:
        """The newest vend bought from ``phone`` (for ``meter`` if given)."""
        return await self._read(self._last_vend, phone, meter)

    @staticmethod
    def _last_vend(phone: str, meter: str | None) -> Steps[Vend | None]:
        sql = (
            "SELECT v.* FROM vends v JOIN purchases p ON p.purchase_id = v.purchase_id"
            " WHERE p.phone = ?"
        )
        params: list[object] = [phone]
        if meter is not None:
            sql += " AND v.meter = ?"
            params.append(meter)
        row = yield one(sql + " ORDER BY v.created_at DESC, v.vend_id DESC LIMIT 1", *params)
        return vend_of(row) if row is not None else None

    # -- debt recovery and free basic electricity -----------------------------------------------

    async def get_debt(self, meter: str) -> MeterDebt | None:
        """The meter's debt account, if it ever had one (a cleared debt has balance 0)."""
        return await self._read(self._get_debt, meter, hot=True)

    @staticmethod
    def _get_debt(meter: str) -> Steps[MeterDebt | None]:
        row = yield one(_DEBT, meter)
        return meter_debt_of(row) if row is not None else None

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
        """Set the meter's debt balance and recovery terms; appends ``debt_set``."""
        terms = DebtTerms(
            balance_minor=balance.amount_minor,
            currency=balance.currency,
            rate_basis_points=rate_basis_points,
            min_per_purchase_minor=min_per_purchase_minor,
            cap_per_purchase_minor=cap_per_purchase_minor,
        )  # validates
        return await self._write(self._set_debt, meter, terms, actor, reason)

    def _set_debt(self, meter: str, terms: DebtTerms, actor: str, reason: str) -> Steps[MeterDebt]:
        if (yield one(_METER_EXISTS + " FOR UPDATE", meter)) is None:
            raise NotFound("meter", meter)
        old = yield one(_DEBT, meter)
        row = yield one(
            "INSERT INTO meter_debts (meter, currency, balance_minor, rate_basis_points,"
            " min_per_purchase_minor, cap_per_purchase_minor, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (meter) DO UPDATE SET"
            " currency = excluded.currency, balance_minor = excluded.balance_minor,"
            " rate_basis_points = excluded.rate_basis_points,"
            " min_per_purchase_minor = excluded.min_per_purchase_minor,"
            " cap_per_purchase_minor = excluded.cap_per_purchase_minor,"
            " updated_at = excluded.updated_at RETURNING *",
            meter,
            terms.currency,
            terms.balance_minor,
            terms.rate_basis_points,
            terms.min_per_purchase_minor,
            terms.cap_per_purchase_minor,
            self._stamp(self._clock()),
        )
        debt = meter_debt_of(row)
        before = meter_debt_of(old) if old is not None else None
        yield self._event(None, "debt_set", actor, debt_event_data(debt, before, reason))
        return debt

    async def clear_debt(self, meter: str, *, actor: str, reason: str = "") -> MeterDebt:
        """Write the meter's debt off (balance 0, terms kept); appends ``debt_cleared``."""
        return await self._write(self._clear_debt, meter, actor, reason)

    def _clear_debt(self, meter: str, actor: str, reason: str) -> Steps[MeterDebt]:
        old = yield one(_DEBT + " FOR UPDATE", meter)
        if old is None:
            raise NotFound("debt", meter)
        row = yield one(
            "UPDATE meter_debts SET balance_minor = 0, updated_at = ? WHERE meter = ? RETURNING *",
            self._stamp(self._clock()),
            meter,
        )
        debt = meter_debt_of(row)
        yield self._event(
            None, "debt_cleared", actor, debt_event_data(debt, meter_debt_of(old), reason)
        )
        return debt

    async def debt_recoveries(self, meter: str, *, limit: int = 50) -> list[DebtRecovery]:
        """What the meter's vends recovered, newest first."""
        return await self._read(self._debt_recoveries, meter, limit)

    @staticmethod
    def _debt_recoveries(meter: str, limit: int) -> Steps[list[DebtRecovery]]:
        found = yield rows(
            "SELECT * FROM debt_recoveries WHERE meter = ?"
            " ORDER BY created_at DESC, purchase_id DESC LIMIT ?",
            meter,
            limit,
        )
        return [debt_recovery_of(row) for row in found]

    async def get_debt_recovery(self, purchase_id: str) -> DebtRecovery | None:
        """What the purchase's vend recovered, if anything."""
        return await self._read(self._get_debt_recovery, purchase_id, hot=True)

    @staticmethod
    def _get_debt_recovery(purchase_id: str) -> Steps[DebtRecovery | None]:
        row = yield one("SELECT * FROM debt_recoveries WHERE purchase_id = ?", purchase_id)
        return debt_recovery_of(row) if row is not None else None

    async def set_fbe_allowance(self, tariff_id: str, units_per_month: int, *, actor: str) -> None:
        """The tariff's monthly free basic electricity in tenths of a kWh (0 stops it)."""
        if units_per_month < 0:
            raise ValueError(f"FBE units cannot be negative, got {units_per_month}")
        await self._write(self._set_fbe_allowance, tariff_id, units_per_month, actor)

    def _set_fbe_allowance(self, tariff_id: str, units_per_month: int, actor: str) -> Steps[None]:
        if (yield one("SELECT 1 FROM tariffs WHERE tariff_id = ?", tariff_id)) is None:
            raise NotFound("tariff", tariff_id)
        old = yield one(_FBE_ALLOWANCE + " FOR UPDATE", tariff_id)
        if units_per_month == 0:
            yield run("DELETE FROM fbe_allowances WHERE tariff_id = ?", tariff_id)
        else:
            yield run(
                "INSERT INTO fbe_allowances (tariff_id, units_per_month, updated_at)"
                " VALUES (?, ?, ?) ON CONFLICT (tariff_id) DO UPDATE SET"
                " units_per_month = excluded.units_per_month, updated_at = excluded.updated_at",
                tariff_id,
                units_per_month,
                self._stamp(self._clock()),
            )
        yield self._event(
            None,
            "fbe_allowance_set",
            actor,
            {
                "tariff_id": tariff_id,
                "units_per_month": units_per_month,
                "previous_units_per_month": old["units_per_month"] if old is not None else 0,
            },
        )

    async def fbe_allowance(self, tariff_id: str) -> int:
        """The tariff's monthly FBE units (0: none)."""
        return await self._read(self._fbe_allowance, tariff_id, hot=True)

    @staticmethod
    def _fbe_allowance(tariff_id: str) -> Steps[int]:
        row = yield one(_FBE_ALLOWANCE, tariff_id)
        return int(row["units_per_month"]) if row is not None else 0

    async def fbe_due(self, meter: str, month: str) -> int:
        """The FBE units the meter may still get in ``month``: 0 if issued already, or none."""
        return await self._read(self._fbe_due, meter, month, hot=True)

    @staticmethod
    def _fbe_due(meter: str, month: str) -> Steps[int]:
        row = yield one(
            "SELECT a.units_per_month FROM meters m"
            " JOIN fbe_allowances a ON a.tariff_id = m.tariff_id"
            " LEFT JOIN fbe_issues f ON f.meter = m.drn AND f.month = ?"
            " WHERE m.drn = ? AND f.issue_id IS NULL",
            month,
            meter,
        )
        return int(row["units_per_month"]) if row is not None else 0

    async def fbe_issues(self, meter: str, *, limit: int = 24) -> list[FbeIssue]:
        """The meter's FBE tokens, newest first."""
        return await self._read(self._fbe_issues, meter, limit)

    @staticmethod
    def _fbe_issues(meter: str, limit: int) -> Steps[list[FbeIssue]]:
        found = yield rows(
            "SELECT * FROM fbe_issues WHERE meter = ? ORDER BY month DESC LIMIT ?", meter, limit
        )
        return [fbe_issue_of(row) for row in found]

    # -- key changes ----------------------------------------------------------------------------

    async def meters_on_key(
        self, sgc: str, krn: int, *, meters: Sequence[str] | None = None
    ) -> list[MeterRecord]:
        """The meters whose key is (``sgc``, ``krn``), among ``meters`` if given, by DRN."""
        return await self._read(self._meters_on_key, sgc, krn, meters)

    @staticmethod
    def _meters_on_key(
        sgc: str, krn: int, meters: Sequence[str] | None
    ) -> Steps[list[MeterRecord]]:
        found = yield rows("SELECT * FROM meters WHERE sgc = ? AND krn = ? ORDER BY drn", sgc, krn)
        wanted = set(meters) if meters is not None else None
        return [meter_of(row) for row in found if wanted is None or row["drn"] in wanted]

    async def plan_key_rotation(
        self, rotation: KeyRotation, *, meters: Sequence[str] | None = None, actor: str
    ) -> list[KeyChange]:
        """Plan a pending key change for each meter on the old key; supersede earlier plans."""
        return await self._write(self._plan_key_rotation, rotation, meters, actor)

    def _plan_key_rotation(
        self, rotation: KeyRotation, meters: Sequence[str] | None, actor: str
    ) -> Steps[list[KeyChange]]:
        wanted = set(meters) if meters is not None else None
        _, now = self._now()
        on_key = yield rows(
            "SELECT drn, sgc, krn, tariff_index, base_date FROM meters"
            " WHERE sgc = ? AND krn = ? ORDER BY drn FOR UPDATE",
            rotation.sgc,
            rotation.from_krn,
        )
        planned: list[KeyChange] = []
        for row in on_key:
            if wanted is not None and row["drn"] not in wanted:
                continue
            yield run(
                "UPDATE key_changes SET state = ? WHERE meter = ? AND state = ?",
                KeyChangeState.SUPERSEDED.value,
                row["drn"],
                KeyChangeState.PENDING.value,
            )
            change = yield one(
                "INSERT INTO key_changes (meter, from_sgc, from_krn, from_tariff_index,"
                " from_base_date, sgc, krn, tariff_index, base_date, state, planned_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
                row["drn"],
                row["sgc"],
                row["krn"],
                row["tariff_index"],
                row["base_date"],
                rotation.to_sgc or row["sgc"],
                rotation.to_krn,
                rotation.to_tariff_index or row["tariff_index"],
                rotation.to_base_date,
                KeyChangeState.PENDING.value,
                now,
            )
            assert change is not None  # noqa: S101 - an INSERT … RETURNING answers its row
            planned.append(key_change_of(change))
            stuck = yield rows(
                "SELECT * FROM purchases WHERE meter = ? AND state = ? ORDER BY purchase_id"
                " FOR UPDATE",
                row["drn"],
                PurchaseState.VEND_FAILED.value,
            )
            for purchase in stuck:
                yield from self._move(
                    purchase,
                    PurchaseState.PAID,
                    "vend_retry_queued",
                    actor,
                    {"reason": "key change planned", "change_id": change["change_id"]},
                )
        yield self._event(
            None,
            "key_rotation_planned",
            actor,
            {
                "sgc": rotation.sgc,
                "from_krn": rotation.from_krn,
                "to_sgc": rotation.to_sgc or rotation.sgc,
                "to_krn": rotation.to_krn,
                "to_base_date": rotation.to_base_date,
                "meters": len(planned),
            },
            now,
        )
        return planned

    async def key_changes(self, meter: str) -> list[KeyChange]:
        """The meter's key changes, oldest first."""
        return await self._read(self._key_changes, meter)

    @staticmethod
    def _key_changes(meter: str) -> Steps[list[KeyChange]]:
        found = yield rows("SELECT * FROM key_changes WHERE meter = ? ORDER BY change_id", meter)
        return [key_change_of(row) for row in found]

    # -- outbox ---------------------------------------------------------------------------------

    async def enqueue_message(
        self,
        purchase_id: str | None,
        *,
        kind: MessageKind,
        recipient: str | None,
        body: str,
        actor: str,
    ) -> OutboxMessage:
        """Queue an SMS now (reprints); token messages are queued by ``record_vend``."""
        return await self._write(self._enqueue_message, purchase_id, kind, recipient, body, actor)

    def _enqueue_message(
        self,
        purchase_id: str | None,
        kind: MessageKind,
        recipient: str | None,
        body: str,
        actor: str,
    ) -> Steps[OutboxMessage]:
        _, now = self._now()
        row = yield one(
            _QUEUE_MESSAGE + " RETURNING *",
            purchase_id,
            kind.value,
            recipient,
            body,
            (OutboxState.PENDING if recipient else OutboxState.HELD).value,
            now,
            now,
            now,
        )
        assert row is not None  # noqa: S101 - an INSERT … RETURNING answers its row
        yield self._event(purchase_id, f"{kind.value}_queued", actor, {"recipient": recipient}, now)
        return outbox_of(row)

    async def claim_outbox(
        self, now: datetime, *, lease_until: datetime, limit: int = 50
    ) -> list[OutboxMessage]:
        """Claim due messages until ``lease_until`` (expired leases come back).

        ``FOR UPDATE SKIP LOCKED``: workers on several PostgreSQL instances claim disjoint
        messages.
        """
        return await self._write(self._claim_outbox, now, lease_until, limit)

    def _claim_outbox(
        self, now: datetime, lease_until: datetime, limit: int
    ) -> Steps[list[OutboxMessage]]:
        stamp = self._stamp(now)
        claimed = yield rows(
            "UPDATE outbox SET state = ?, next_try_at = ?, attempts = attempts + 1,"
            " updated_at = ? WHERE message_id IN (SELECT message_id FROM outbox"
            " WHERE state IN (?, ?) AND next_try_at <= ? ORDER BY next_try_at, message_id"
            " LIMIT ? FOR UPDATE SKIP LOCKED) RETURNING *",
            OutboxState.SENDING.value,
            self._stamp(lease_until),
            stamp,
            *_UNSENT,
            stamp,
            limit,
        )
        return sorted((outbox_of(row) for row in claimed), key=lambda m: m.message_id)

    async def outbox_sent(
        self,
        message_id: int,
        *,
        provider_message_id: str,
        cost: str | None,
        state: DeliveryState,
    ) -> None:
        """The provider took the message; a delivery report that came first is applied now."""
        await self._write(self._outbox_sent, message_id, provider_message_id, cost, state)

    def _outbox_sent(
        self, message_id: int, provider_message_id: str, cost: str | None, state: DeliveryState
    ) -> Steps[None]:
        # Serialised with a report for the same id (``apply_delivery_report``): either the
        # report sees the id recorded, or it is kept and this transaction applies it.
        yield lock(provider_message_id)
        new_state = OutboxState.DELIVERED if state is DeliveryState.DELIVERED else OutboxState.SENT
        _, now = self._now()
        yield run(
            "UPDATE outbox SET state = ?, provider_message_id = ?, cost = ?, last_error = NULL,"
            " updated_at = ? WHERE message_id = ? AND state NOT IN (?, ?)",
            new_state.value,
            provider_message_id,
            cost,
            now,
            message_id,
            *_FINAL_OUTBOX,
        )
        row = yield one("SELECT purchase_id FROM outbox WHERE message_id = ?", message_id)
        yield self._event(
            row["purchase_id"] if row else None,
            "sms_sent",
            "outbox",
            {"message_id": message_id, "provider_message_id": provider_message_id, "cost": cost},
            now,
        )
        early = yield one(
            "DELETE FROM early_delivery_reports WHERE provider_message_id = ?"
            " RETURNING state, failure_reason",
            provider_message_id,
        )
        if early is not None:
            message = yield one(_OUTBOX_MESSAGE + " FOR UPDATE", message_id)
            assert message is not None  # noqa: S101 - the message was just updated
            yield from self._apply_report(
                message, DeliveryState(early["state"]), early["failure_reason"]
            )

    async def outbox_retry(self, message_id: int, *, next_try_at: datetime, error: str) -> None:
        """Sending failed for now; try again at ``next_try_at``."""
        await self._write(self._outbox_retry, message_id, next_try_at, error, atomic=False)

    def _outbox_retry(self, message_id: int, next_try_at: datetime, error: str) -> Steps[None]:
        yield run(
            "UPDATE outbox SET state = ?, next_try_at = ?, last_error = ?, updated_at = ?"
            " WHERE message_id = ? AND state NOT IN (?, ?)",
            OutboxState.PENDING.value,
            self._stamp(next_try_at),
            error,
            self._stamp(self._clock()),
            message_id,
            *_FINAL_OUTBOX,
        )

    async def outbox_failed(self, message_id: int, *, error: str) -> None:
        """Sending failed for good; an operator must look."""
        await self._write(self._outbox_failed, message_id, error)

    def _outbox_failed(self, message_id: int, error: str) -> Steps[None]:
        _, now = self._now()
        row = yield one(
            "UPDATE outbox SET state = ?, last_error = ?, updated_at = ? WHERE message_id = ?"
            " RETURNING purchase_id",
            OutboxState.FAILED.value,
            error,
            now,
            message_id,
        )
        yield self._event(
            row["purchase_id"] if row else None,
            "sms_failed",
            "outbox",
            {"message_id": message_id, "error": error},
            now,
        )

    def _apply_report(
        self, row: Row, state: DeliveryState, failure_reason: str | None
    ) -> Steps[OutboxMessage]:
        """A delivery report on the (locked) message ``row``; a delivered token: DELIVERED."""
        message = outbox_of(row)
        if message.state.value in _FINAL_OUTBOX:
            return message
        if state is DeliveryState.DELIVERED:
            new_state = OutboxState.DELIVERED
        elif state.is_final:
            new_state = OutboxState.FAILED
        else:
            new_state = OutboxState.SENT
        _, now = self._now()
        updated = yield one(
            "UPDATE outbox SET state = ?, last_error = ?, updated_at = ? WHERE message_id = ?"
            " RETURNING *",
            new_state.value,
            failure_reason,
            now,
            message.message_id,
        )
        assert updated is not None  # noqa: S101 - the row is locked: it is there
        yield self._event(
            message.purchase_id,
            f"sms_{state.value}",
            "delivery_report",
            {"message_id": message.message_id, "reason": failure_reason},
            now,
        )
        if (
            new_state is OutboxState.DELIVERED
            and message.purchase_id is not None
            and message.kind is MessageKind.TOKEN
        ):
            purchase = yield from self._lock_purchase(message.purchase_id)
            if purchase["state"] == PurchaseState.VENDED.value:
                yield from self._move(
                    purchase,
                    PurchaseState.DELIVERED,
                    "token_delivered",
                    "delivery_report",
                    {"message_id": message.message_id},
                )
        return outbox_of(updated)

    def _keep_early_report(self, report: DeliveryReport) -> Steps[None]:
        """Keep a report whose message id is not recorded yet (bounded, expiring)."""
        moment, now = self._now()
        yield run(
            "DELETE FROM early_delivery_reports WHERE received_at < ?",
            self._stamp(moment - timedelta(seconds=EARLY_REPORT_TTL_S)),
        )
        kept = yield one("SELECT count(*) FROM early_delivery_reports")
        if kept is not None and kept[0] >= EARLY_REPORT_LIMIT:
            log.warning("delivery_report_dropped", provider_message_id=report.provider_message_id)
            return
        # A final state is never replaced by a later non-final one ("Sent" after "Success").
        yield run(
            _KEEP_EARLY_REPORT,
            report.provider_message_id,
            report.state.value,
            report.failure_reason,
            now,
            report.state.is_final,
            *_FINAL_DELIVERY,
        )

    async def apply_delivery_report(self, report: DeliveryReport) -> OutboxMessage | None:
        """Record a delivery report; a delivered token message makes its purchase DELIVERED.

        An unknown message id is kept for ``outbox_sent`` (see ``Ledger``) and answers None.
        """
        return await self._write(self._apply_delivery_report, report)

    def _apply_delivery_report(self, report: DeliveryReport) -> Steps[OutboxMessage | None]:
        yield lock(report.provider_message_id)
        row = yield one(
            "SELECT * FROM outbox WHERE provider_message_id = ? FOR UPDATE",
            report.provider_message_id,
        )
        if row is None:
            yield from self._keep_early_report(report)
            return None
        return (yield from self._apply_report(row, report.state, report.failure_reason))

    async def outbox_for(self, purchase_id: str) -> list[OutboxMessage]:
        """The purchase's messages, oldest first."""
        return await self._read(self._outbox_for, purchase_id)

    @staticmethod
    def _outbox_for(purchase_id: str) -> Steps[list[OutboxMessage]]:
        found = yield rows(
            "SELECT * FROM outbox WHERE purchase_id = ? ORDER BY message_id", purchase_id
        )
        return [outbox_of(row) for row in found]

    # -- events ---------------------------------------------------------------------------------

    async def append_event(
        self,
        purchase_id: str | None,
        kind: str,
        *,
        actor: str,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Append an audit event (security events may have no purchase)."""
        await self._write(self._append_event, purchase_id, kind, actor, data, atomic=False)

    async def timeline(self, purchase_id: str) -> list[Event]:
        """The purchase's events, oldest first."""
        return await self._read(self._timeline, purchase_id)

    @staticmethod
    def _timeline(purchase_id: str) -> Steps[list[Event]]:
        found = yield rows(
            "SELECT * FROM events WHERE purchase_id = ? ORDER BY event_id", purchase_id
        )
        return [event_of(row) for row in found]

    async def events(self, *, kind: str | None = None, limit: int = 100) -> list[Event]:
        """Recent events, newest first, optionally of one kind."""
        return await self._read(self._events, kind, limit)

    @staticmethod
    def _events(kind: str | None, limit: int) -> Steps[list[Event]]:
        if kind is None:
            found = yield rows("SELECT * FROM events ORDER BY event_id DESC LIMIT ?", limit)
        else:
            found = yield rows(
                "SELECT * FROM events WHERE kind = ? ORDER BY event_id DESC LIMIT ?", kind, limit
            )
        return [event_of(row) for row in found]

    # -- channels -------------------------------------------------------------------------------

    async def save_meter(self, phone: str, meter: str, *, nickname: str = "") -> SavedMeter:
        """Keep a meter for a phone (renames it if kept already).

        The phone's saved meters are counted under a lock on the phone, so two PostgreSQL
        instances cannot both add the sixth.
        """
        return await self._write(self._save_meter, phone, meter, nickname)

    def _save_meter(self, phone: str, meter: str, nickname: str) -> Steps[SavedMeter]:
        if (yield one(_METER_EXISTS, meter)) is None:
            raise NotFound("meter", meter)
        yield lock("saved_meters:" + phone)
        row = yield one(
            "UPDATE saved_meters SET nickname = ? WHERE phone = ? AND meter = ? RETURNING *",
            nickname,
            phone,
            meter,
        )
        if row is None:
            counted = yield one("SELECT count(*) FROM saved_meters WHERE phone = ?", phone)
            if counted is not None and counted[0] >= MAX_SAVED_METERS:
                raise SavedMetersFull(f"{phone} already keeps {MAX_SAVED_METERS} meters")
            row = yield one(
                "INSERT INTO saved_meters (phone, meter, nickname, created_at)"
                " VALUES (?, ?, ?, ?) RETURNING *",
                phone,
                meter,
                nickname,
                self._stamp(self._clock()),
            )
            assert row is not None  # noqa: S101 - an INSERT … RETURNING answers its row
        return saved_of(row)

    async def saved_meters(self, phone: str) -> list[SavedMeter]:
        """The phone's saved meters, oldest first."""
        return await self._read(self._saved_meters, phone, hot=True)

    @staticmethod
    def _saved_meters(phone: str) -> Steps[list[SavedMeter]]:
        found = yield rows(
            "SELECT * FROM saved_meters WHERE phone = ? ORDER BY created_at, meter", phone
        )
        return [saved_of(row) for row in found]

    async def remove_saved_meter(self, phone: str, meter: str) -> bool:
        """Forget a saved meter; False if it was not saved."""
        return await self._write(self._remove_saved_meter, phone, meter, atomic=False)

    @staticmethod
    def _remove_saved_meter(phone: str, meter: str) -> Steps[bool]:
        removed: int = yield run(
            "DELETE FROM saved_meters WHERE phone = ? AND meter = ?", phone, meter
        )
        return removed > 0

    async def get_language(self, phone: str) -> str | None:
        """The phone's chosen language code, if any."""
        return await self._read(self._get_language, phone, hot=True)

    @staticmethod
    def _get_language(phone: str) -> Steps[str | None]:
        row = yield one("SELECT language FROM customer_preferences WHERE phone = ?", phone)
        return str(row["language"]) if row is not None else None

    async def set_language(self, phone: str, language: str) -> None:
        """Remember the phone's language code."""
        await self._write(self._set_language, phone, language, atomic=False)

    def _set_language(self, phone: str, language: str) -> Steps[None]:
        yield run(
            "INSERT INTO customer_preferences (phone, language, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (phone) DO UPDATE SET language = excluded.language,"
            " updated_at = excluded.updated_at",
            phone,
            language,
            self._stamp(self._clock()),
        )

    async def probe_write(self) -> None:
        """Commit a write that changes nothing (its fsync; a read-only database refuses it)."""
        await self._write(self._probe_write)

    @staticmethod
    def _probe_write() -> Steps[None]:
        yield run(
            "UPDATE schema_migrations SET applied_at = applied_at"
            " WHERE version = (SELECT max(version) FROM schema_migrations)"
        )

    # -- reports --------------------------------------------------------------------------------

    async def daily_report(self, day: date) -> list[ReportRow]:
        """Counts and sums of the purchases created on ``day`` (UTC), by provider and state."""
        return await self._read(self._daily_report, day)

    def _daily_report(self, day: date) -> Steps[list[ReportRow]]:
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        found = yield rows(
            "SELECT provider, state, currency, count(*) AS n,"
            " CAST(sum(amount_minor) AS BIGINT) AS total"
            " FROM purchases WHERE created_at >= ? AND created_at < ?"
            " GROUP BY provider, state, currency ORDER BY provider, state, currency",
            self._stamp(start),
            self._stamp(start + timedelta(days=1)),
        )
        return [
            ReportRow(
                day=day,
                provider=row["provider"],
                state=PurchaseState(row["state"]),
                currency=row["currency"],
                count=row["n"],
                amount_minor=row["total"],
            )
            for row in found
        ]

    # -- metrics --------------------------------------------------------------------------------

    async def purchase_counts(self) -> dict[str, int]:
        """How many purchases are in each state (every state named, zeros included)."""
        return await self._read(self._purchase_counts)

    @staticmethod
    def _purchase_counts() -> Steps[dict[str, int]]:
        counts = dict.fromkeys((state.value for state in PurchaseState), 0)
        for row in (yield rows("SELECT state, count(*) AS n FROM purchases GROUP BY state")):
            counts[row["state"]] = row["n"]
        return counts

    async def outbox_stats(self, now: datetime) -> OutboxStats:
        """The outbox backlog (pending or sending), its oldest message's age, and held ones."""
        return await self._read(self._outbox_stats, now)

    @staticmethod
    def _outbox_stats(now: datetime) -> Steps[OutboxStats]:
        row = yield one(
            "SELECT count(*) FILTER (WHERE state IN (?, ?)) AS backlog,"
            " min(created_at) FILTER (WHERE state IN (?, ?)) AS oldest,"
            " count(*) FILTER (WHERE state = ?) AS held"
            " FROM outbox WHERE state IN (?, ?, ?)",
            *_UNSENT,
            *_UNSENT,
            OutboxState.HELD.value,
            *_UNSENT,
            OutboxState.HELD.value,
        )
        assert row is not None  # noqa: S101 - an aggregate always answers one row
        oldest = row["oldest"]
        age = max(0.0, (now - when(oldest)).total_seconds()) if oldest else 0.0
        return OutboxStats(backlog=row["backlog"], oldest_age_s=age, held=row["held"])
