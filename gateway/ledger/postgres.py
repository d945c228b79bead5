"""The PostgreSQL ledger: SQLite's schema, constraints and contract, shared by several instances.

Where the SQLite backend has one writer, here every gateway instance writes, so the guarding moves
into PostgreSQL itself:

Transactions
    Every ``Ledger`` method is one transaction (``READ COMMITTED``) on a connection from an
    ``asyncpg`` pool (a method that is a single statement runs without ``BEGIN``/``COMMIT``: the
    statement is atomic by itself). Rows a method decides on are locked first (``SELECT … FOR
    UPDATE``), always in the same order (purchase, then its payment row, then its meter; a
    delivery report locks its message, then the purchase), so two instances acting on one
    purchase wait for each other instead of both acting, and never deadlock on each other.

TIDs
    ``record_vend`` (with the proven payment, when given, in the same transaction) locks the
    meter's row (``SELECT last_tid … FOR UPDATE``) and compares it with the TID the vend was
    computed from: two instances vending for one meter in the same minute are serialised there,
    the loser gets ``TidConflict`` (and nothing of its transaction stays, payment included) and
    the saga makes a new token from the new last TID. ``UNIQUE (meter, base_date, tid)`` stays
    as the last net (a TID rollover starts TIDs again from a later base date).

Idempotent inserts
    Inserts two instances may race on (one idempotency key, one provider reference) use
    ``INSERT … ON CONFLICT DO NOTHING`` and then read the winner's row, exactly as the single
    SQLite writer would have answered.

Outbox
    ``claim_outbox`` claims with ``FOR UPDATE SKIP LOCKED``: workers on several instances take
    disjoint messages and never wait for each other.

Retries
    Transient failures (serialization failures, deadlocks, a dropped or refused connection, ``too
    many connections``, a server shutting down) are retried here with capped, jittered
    exponential backoff (``RetryPolicy``), never by callers: every method is safe to run again.
    When the attempts run out, the caller gets ``LedgerUnavailable``. A connection lost during
    ``COMMIT`` leaves it unknown whether the transaction committed; running it again is harmless
    for every method (each finds its own earlier work and returns it) except ``enqueue_message``
    and ``append_event``, which may then write their row twice (a second reprint of the same
    token, a repeated audit line): never a second vend or a second token message.

Errors
    ``asyncpg`` errors are translated here and nowhere else (``translate_error``): a unique
    violation → ``DuplicateError``; other constraint violations and the append-only trigger →
    ``LedgerError``; connection, resource and shutdown errors → ``LedgerUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, NoReturn, TypeVar, cast
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import structlog

from gateway.ledger.base import (
    EARLY_REPORT_LIMIT,
    EARLY_REPORT_TTL_S,
    MAX_SAVED_METERS,
    ORPHAN_CHECK_AFTER_S,
    RECEIPT_ONCE,
    STATUS_ACCEPTED,
    STATUS_CONTRADICTED,
    STATUS_QUERY_KEEP_S,
    STATUS_UNMATCHED,
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
    LedgerUnavailable,
    MessageKind,
    MeterDebt,
    MeterInfo,
    MeterNumber,
    MeterRecord,
    MeterStatus,
    MigrationError,
    NotFound,
    NoticeOutcome,
    NoticeRecord,
    OutboxMessage,
    OutboxState,
    OutboxStats,
    PaymentRecord,
    PaymentRecordState,
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
from gateway.money import Money
from gateway.phone import Msisdn
from gateway.tariff import DebtTerms, Tariff
from gateway.values.messages import DeliveryReport, DeliveryState

T = TypeVar("T")
Clock = Callable[[], datetime]
Connection = Any  # asyncpg.Connection (asyncpg is untyped)
Row = Any  # asyncpg.Record
Pool = Any  # asyncpg.Pool

log = structlog.get_logger()

_MIGRATION_NAME: Final = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_SCHEMA_NAME: Final = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_MIGRATION_LOCK: Final = "sts-gateway:ledger-migrations:"

#: Transient by nature: the same transaction run again may well succeed.
_TRANSIENT: Final[tuple[type[BaseException], ...]] = (
    asyncpg.exceptions.SerializationError,  # 40001
    asyncpg.exceptions.DeadlockDetectedError,  # 40P01
    asyncpg.exceptions.TooManyConnectionsError,  # 53300
    asyncpg.exceptions.CannotConnectNowError,  # 57P03: starting up
    asyncpg.exceptions.AdminShutdownError,  # 57P01: connection terminated by the server
    asyncpg.exceptions.CrashShutdownError,  # 57P02
    asyncpg.exceptions.InternalClientError,  # the protocol lost its state (a dropped connection)
    asyncpg.exceptions.PostgresConnectionError,  # class 08, incl. a connection dropped mid-query
    asyncpg.exceptions.ConnectionFailureError,
    ConnectionError,
    OSError,  # refused, reset, unreachable
    TimeoutError,  # connect or pool acquire timed out
)


#: The connection itself is unusable: it is dropped rather than given back to the pool.
_BROKEN_CONNECTION: Final[tuple[type[BaseException], ...]] = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InternalClientError,  # protocol state lost (a server error while idle)
    asyncpg.exceptions.InterfaceError,
    ConnectionError,
    TimeoutError,  # a cancelled statement may leave the protocol mid-message
)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def is_transient(exc: BaseException) -> bool:
    """Whether running the same transaction again may succeed (the retry decision, in one place)."""
    if type(exc) is asyncpg.exceptions.InterfaceError:  # "connection is closed"; not its
        return True  # subclasses, which are client mistakes (bad arguments, bad configuration)
    return isinstance(exc, _TRANSIENT)


def translate_error(exc: BaseException) -> BaseException:  # noqa: PLR0911 - one answer per kind
    """Our error for an ``asyncpg``/connection error; anything else is returned unchanged."""
    if isinstance(exc, LedgerError):
        return exc
    if isinstance(exc, asyncpg.exceptions.UniqueViolationError):
        constraint = exc.constraint_name or (exc.table_name or "unique")
        return DuplicateError(
            f"duplicate {constraint}: {exc.detail or exc}", constraint=constraint, key=""
        )
    if isinstance(exc, asyncpg.exceptions.IntegrityConstraintViolationError):
        return LedgerError(f"constraint refused the write: {exc}")
    if isinstance(exc, asyncpg.exceptions.RaiseError):
        return LedgerError(f"the database refused the write: {exc}")
    if is_transient(exc):
        return LedgerUnavailable(
            f"ledger database unavailable ({type(exc).__name__}: {exc}): nothing was written;"
            " retry later"
        )
    if isinstance(
        exc,
        asyncpg.exceptions.InsufficientResourcesError  # class 53: disk full, out of memory
        | asyncpg.exceptions.OperatorInterventionError  # class 57: cancelled, shutting down
        | asyncpg.exceptions.ReadOnlySQLTransactionError,  # a standby after failover
    ):
        return LedgerUnavailable(
            f"ledger database cannot take writes now ({type(exc).__name__}: {exc}):"
            " nothing was written"
        )
    if isinstance(exc, asyncpg.exceptions.PostgresError):
        return LedgerError(f"ledger database error: {type(exc).__name__}: {exc}")
    return exc


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How transient failures are retried inside the ledger.

    Attempt ``n`` (from 0) waits a uniformly random time up to ``min(max_delay_s, base_delay_s *
    2**n)`` ("full jitter"), so instances that failed together do not retry together.

    Attributes:
        attempts: runs of one transaction at most (1 = no retry).
        base_delay_s, max_delay_s: the backoff's start and cap, seconds.
        random: the jitter source in [0, 1) (a seam for tests).
        sleep: how to wait (a seam for tests).
    """

    attempts: int = 8
    base_delay_s: float = 0.01
    max_delay_s: float = 1.0
    random: Callable[[], float] = field(default=random.random)
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep)

    def delay_s(self, attempt: int) -> float:
        """The wait before retry number ``attempt`` (0-based), seconds."""
        return float(self.random()) * min(self.max_delay_s, self.base_delay_s * 2.0**attempt)


# ----------------------------------------------------------------------------------- migrations


def migration_scripts() -> list[tuple[int, str, str]]:
    """The packaged PostgreSQL migrations as (version, file name, SQL), in order."""
    folder = importlib.resources.files("gateway.ledger.migrations.postgres")
    found: list[tuple[int, str, str]] = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    return found


async def apply_migrations(conn: Connection) -> list[str]:
    """Bring the schema on ``conn``'s ``search_path`` up to date; the names applied.

    Instances starting together take turns (an advisory lock per schema); each migration and its
    ``schema_migrations`` row commit together or not at all.

    Raises:
        MigrationError: a migration failed (nothing of it stays).
    """
    schema = cast("str", await conn.fetchval("SELECT current_schema()"))
    lock_key = _MIGRATION_LOCK + schema
    await conn.execute("SELECT pg_advisory_lock(hashtext($1))", lock_key)
    applied: list[str] = []
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
            " name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL)"
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in migration_scripts():
            if version in done:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at)"
                        " VALUES ($1, $2, $3)",
                        version,
                        name,
                        _utc_now(),
                    )
            except asyncpg.exceptions.PostgresError as exc:
                error = translate_error(exc)
                if isinstance(error, LedgerUnavailable):
                    raise error from exc
                raise MigrationError(f"migration {name} failed: {exc}") from exc
            applied.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", lock_key)
    return applied


# ------------------------------------------------------------------------------------ row mappers


def _purchase(row: Row) -> Purchase:
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
        next_check_at=row["next_check_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        debt_recovery_minor=row["debt_recovery_minor"],
    )


def _meter_debt(row: Row) -> MeterDebt:
    return MeterDebt(
        meter=MeterNumber(row["meter"]),
        balance=Money(row["balance_minor"], row["currency"]),
        rate_basis_points=row["rate_basis_points"],
        min_per_purchase_minor=row["min_per_purchase_minor"],
        cap_per_purchase_minor=row["cap_per_purchase_minor"],
        recovered_total_minor=row["recovered_total_minor"],
        updated_at=row["updated_at"],
    )


def _debt_recovery(row: Row) -> DebtRecovery:
    return DebtRecovery(
        purchase_id=PurchaseId(row["purchase_id"]),
        meter=MeterNumber(row["meter"]),
        amount=Money(row["amount_minor"], row["currency"]),
        balance_after=Money(row["balance_after_minor"], row["currency"]),
        created_at=row["created_at"],
    )


def _fbe_issue(row: Row) -> FbeIssue:
    return FbeIssue(
        meter=MeterNumber(row["meter"]),
        month=row["month"],
        purchase_id=PurchaseId(row["purchase_id"]),
        tid=row["tid"],
        token=row["token"],
        units=row["units"],
        created_at=row["created_at"],
    )


def _meter(row: Row) -> MeterRecord:
    return MeterRecord(
        drn=MeterNumber(row["drn"]),
        customer_name=row["customer_name"],
        area=row["area"],
        iin=row["iin"],
        sgc=row["sgc"],
        tariff_index=row["tariff_index"],
        krn=row["krn"],
        key_type=row["key_type"],
        ea=row["ea"],
        dkga=row["dkga"],
        base_date=row["base_date"],
        ken=row["ken"],
        last_tid=row["last_tid"],
        tariff_id=row["tariff_id"],
        status=MeterStatus(row["status"]),
    )


def _tariff(row: Row) -> Tariff:
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


def _vend(row: Row) -> Vend:
    return Vend(
        purchase_id=PurchaseId(row["purchase_id"]),
        meter=MeterNumber(row["meter"]),
        tid=row["tid"],
        token=row["token"],
        units=row["units"],
        receipt=row["receipt"],
        created_at=row["created_at"],
        key_change_tokens=tuple(row["key_change_tokens"].split()),
    )


def _key_change(row: Mapping[str, Any]) -> KeyChange:
    return KeyChange(
        change_id=row["change_id"],
        meter=MeterNumber(row["meter"]),
        from_sgc=row["from_sgc"],
        from_krn=row["from_krn"],
        from_tariff_index=row["from_tariff_index"],
        from_base_date=row["from_base_date"],
        sgc=row["sgc"],
        krn=row["krn"],
        tariff_index=row["tariff_index"],
        base_date=row["base_date"],
        state=KeyChangeState(row["state"]),
        planned_at=row["planned_at"],
        applied_at=row["applied_at"],
        purchase_id=PurchaseId(row["purchase_id"]) if row["purchase_id"] else None,
    )


def _outbox(row: Row) -> OutboxMessage:
    return OutboxMessage(
        message_id=row["message_id"],
        purchase_id=PurchaseId(row["purchase_id"]) if row["purchase_id"] else None,
        kind=MessageKind(row["kind"]),
        recipient=Msisdn(row["recipient"]) if row["recipient"] else None,
        body=row["body"],
        state=OutboxState(row["state"]),
        attempts=row["attempts"],
        next_try_at=row["next_try_at"],
        provider_message_id=row["provider_message_id"],
        cost=row["cost"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _event(row: Row) -> Event:
    return Event(
        event_id=row["event_id"],
        purchase_id=PurchaseId(row["purchase_id"]) if row["purchase_id"] else None,
        kind=row["kind"],
        actor=row["actor"],
        data=json.loads(row["data"]),
        at=row["at"],
    )


def _sealed(row: Row) -> SealedVendingKey:
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


def _saved(row: Row) -> SavedMeter:
    return SavedMeter(
        phone=Msisdn(row["phone"]),
        meter=MeterNumber(row["meter"]),
        nickname=row["nickname"],
        created_at=row["created_at"],
    )


def _json(data: Mapping[str, Any] | None) -> str:
    return json.dumps(dict(data or {}), sort_keys=True, separators=(",", ":"), default=str)


_METER_COLUMNS: Final = (
    "drn",
    "customer_name",
    "area",
    "iin",
    "sgc",
    "tariff_index",
    "krn",
    "key_type",
    "ea",
    "dkga",
    "base_date",
    "ken",
    "last_tid",
    "tariff_id",
    "status",
)
_VEND_COLUMNS: Final = (
    "vend_id",
    "purchase_id",
    "meter",
    "tid",
    "token",
    "units",
    "receipt",
    "created_at",
    "key_change_tokens",
)
_KEY_CHANGE_COLUMNS: Final = (
    "change_id", "meter", "from_sgc", "from_krn", "from_tariff_index", "from_base_date", "sgc",
    "krn", "tariff_index", "base_date", "state", "planned_at", "applied_at", "purchase_id",
)  # fmt: skip
#: Everything a vend needs in one statement: the purchase, its meter (``m_``), its vend (``v_``),
#: the payment's receipt, the phone's language and the meter's pending key change (``kc_``).
_VEND_CONTEXT: Final = (
    "SELECT p.*, "  # noqa: S608 - the column names are the constants above
    + ", ".join(f"m.{name} AS m_{name}" for name in _METER_COLUMNS)
    + ", "
    + ", ".join(f"v.{name} AS v_{name}" for name in _VEND_COLUMNS)
    + ", "
    + ", ".join(f"kc.{name} AS kc_{name}" for name in _KEY_CHANGE_COLUMNS)
    + ", pay.receipt AS pay_receipt, cp.language AS pref_language"
    " FROM purchases p JOIN meters m ON m.drn = p.meter"
    " LEFT JOIN vends v ON v.purchase_id = p.purchase_id"
    " LEFT JOIN payments pay ON pay.provider = p.provider"
    " AND pay.reference = p.provider_reference"
    " LEFT JOIN customer_preferences cp ON cp.phone = p.phone"
    " LEFT JOIN key_changes kc ON kc.meter = p.meter AND kc.state = 'pending'"
    " WHERE p.purchase_id = $1"
)
_FINAL_OUTBOX: Final = [OutboxState.DELIVERED.value, OutboxState.FAILED.value]
_UNSENT: Final = [OutboxState.PENDING.value, OutboxState.SENDING.value]
_FINAL_DELIVERY: Final = [state.value for state in DeliveryState if state.is_final]
#: States a proven payment leaves unchanged (VEND_FAILED is reached from PAID only: it is paid).
_PAID_OR_LATER: Final = frozenset(
    {PurchaseState.PAID, PurchaseState.VENDED, PurchaseState.DELIVERED, PurchaseState.VEND_FAILED}
)


# ------------------------------------------------------------------------------------ the ledger


class PostgresLedger:
    """The ``Ledger`` on PostgreSQL, shared by any number of gateway instances.

    Build it with ``open_postgres_ledger`` (or ``open_ledger``); it owns its pool.

    Args:
        pool: an ``asyncpg`` pool whose connections' ``search_path`` names the ledger's schema.
        clock: the time source for every timestamp (UTC, aware).
        retry: how transient failures are retried.
    """

    def __init__(
        self, pool: Pool, *, clock: Clock = _utc_now, retry: RetryPolicy | None = None
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._retry = retry or RetryPolicy()
        self.retries = 0

    # -- lifecycle ------------------------------------------------------------------------------

    async def migrate(self) -> list[str]:
        """Apply pending migrations; the names applied (see ``apply_migrations``)."""

        async def run(conn: Connection) -> list[str]:
            return await apply_migrations(conn)

        return await self._with_retry(run, transaction=False)

    async def close(self) -> None:
        """Wait for the methods in flight, then close the pool's connections."""
        await self._pool.close()

    async def _with_retry(
        self, fn: Callable[[Connection], Awaitable[T]], *, transaction: bool = True
    ) -> T:
        """Run ``fn`` on a pooled connection, retrying transient failures.

        ``transaction``: run ``fn`` inside one transaction (False only for a single statement,
        which PostgreSQL runs atomically anyway, saving the BEGIN and COMMIT round trips).
        """
        policy = self._retry
        attempt = 0
        while True:
            try:
                async with self._pool.acquire() as conn:
                    try:
                        if not transaction:
                            return await fn(conn)
                        async with conn.transaction():
                            return await fn(conn)
                    except _BROKEN_CONNECTION:
                        conn.terminate()  # the pool opens a fresh one for the next attempt
                        raise
            except LedgerError:
                raise
            except Exception as exc:
                attempt += 1
                if not is_transient(exc) or attempt >= policy.attempts:
                    raise translate_error(exc) from exc
                self.retries += 1
                delay = policy.delay_s(attempt - 1)
                log.info(
                    "ledger_retrying",
                    attempt=attempt,
                    error=type(exc).__name__,
                    delay_ms=round(delay * 1000, 1),
                )
                await policy.sleep(delay)

    async def _fetch(self, sql: str, *args: object) -> list[Row]:
        async def run(conn: Connection) -> list[Row]:
            return cast("list[Row]", await conn.fetch(sql, *args))

        return await self._with_retry(run, transaction=False)

    async def _fetchrow(self, sql: str, *args: object) -> Row | None:
        rows = await self._fetch(sql, *args)
        return rows[0] if rows else None

    # -- shared helpers (inside a transaction) --------------------------------------------------

    async def _append(
        self,
        conn: Connection,
        purchase_id: str | None,
        kind: str,
        actor: str,
        data: Mapping[str, Any] | None,
    ) -> None:
        await conn.execute(
            "INSERT INTO events (purchase_id, kind, actor, data, at)"
            " VALUES ($1, $2, $3, $4::jsonb, $5)",
            purchase_id,
            kind,
            actor,
            _json(data),
            self._clock(),
        )

    @staticmethod
    async def _lock_purchase(conn: Connection, purchase_id: str) -> Row:
        row = await conn.fetchrow(
            "SELECT * FROM purchases WHERE purchase_id = $1 FOR UPDATE", purchase_id
        )
        if row is None:
            raise NotFound("purchase", purchase_id)
        return row

    async def _move(
        self,
        conn: Connection,
        row: Row,
        to: PurchaseState,
        kind: str,
        actor: str,
        data: Mapping[str, Any] | None,
    ) -> Row:
        """Move the (locked) purchase ``row`` to ``to`` with its event; the updated row."""
        current = PurchaseState(row["state"])
        if not is_legal(current, to):
            raise IllegalTransition(row["purchase_id"], current, to)
        # One round trip: the state change and its event row are one statement.
        return await conn.fetchrow(
            "WITH moved AS (UPDATE purchases SET state = $1, updated_at = $2"
            " WHERE purchase_id = $3 RETURNING *), logged AS (INSERT INTO events"
            " (purchase_id, kind, actor, data, at) VALUES ($3, $4, $5, $6::jsonb, $2))"
            " SELECT * FROM moved",
            to.value,
            self._clock(),
            row["purchase_id"],
            kind,
            actor,
            _json({**(data or {}), "from": current, "to": to}),
        )

    # -- reference data -------------------------------------------------------------------------

    async def put_tariff(self, tariff: Tariff) -> None:
        """Insert or replace a tariff."""

        async def op(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO tariffs (tariff_id, name, currency, price_per_kwh_minor,"
                " vat_basis_points, fixed_charge_minor, min_purchase_minor, max_purchase_minor)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (tariff_id) DO UPDATE SET"
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

        await self._with_retry(op, transaction=False)

    async def get_tariff(self, tariff_id: str) -> Tariff:
        """The tariff. Raises ``NotFound``."""
        row = await self._fetchrow("SELECT * FROM tariffs WHERE tariff_id = $1", tariff_id)
        if row is None:
            raise NotFound("tariff", tariff_id)
        return _tariff(row)

    async def put_meter(self, meter: MeterRecord) -> None:
        """Insert or update a meter's registration; its ``last_tid`` is kept when it exists."""

        async def op(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO meters (drn, customer_name, area, iin, sgc, tariff_index, krn,"
                " key_type, ea, dkga, base_date, ken, last_tid, tariff_id, status)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
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

        await self._with_retry(op, transaction=False)

    async def get_meter(self, drn: str) -> MeterRecord:
        """The meter with everything the token engine needs. Raises ``NotFound``."""
        row = await self._fetchrow("SELECT * FROM meters WHERE drn = $1", drn)
        if row is None:
            raise NotFound("meter", drn)
        return _meter(row)

    async def lookup_meter(self, drn: str) -> MeterInfo | None:
        """What a channel may show about a meter (masked name), or None if unknown."""
        row = await self._fetchrow("SELECT * FROM meters WHERE drn = $1", drn)
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

        async def op(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO vending_keys (sgc, krn, key_type, ea, dkga, base_date, nonce,"
                " ciphertext, tag, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                " ON CONFLICT (sgc, krn) DO UPDATE SET key_type = excluded.key_type,"
                " ea = excluded.ea, dkga = excluded.dkga, base_date = excluded.base_date,"
                " nonce = excluded.nonce, ciphertext = excluded.ciphertext, tag = excluded.tag,"
                " created_at = excluded.created_at",
                key.sgc,
                key.krn,
                key.key_type,
                key.ea,
                key.dkga,
                key.base_date,
                key.nonce,
                key.ciphertext,
                key.tag,
                self._clock(),
            )
            await self._append(
                conn, None, "vending_key_stored", "operator", {"sgc": key.sgc, "krn": key.krn}
            )

        await self._with_retry(op)

    async def vending_keys(self) -> list[SealedVendingKey]:
        """Every sealed vending key."""
        rows = await self._fetch("SELECT * FROM vending_keys ORDER BY sgc, krn")
        return [_sealed(row) for row in rows]

    # -- purchases ------------------------------------------------------------------------------

    async def open_purchase(self, draft: PurchaseDraft, *, actor: str) -> Purchase:
        """Open a purchase in CREATED; the same idempotency key returns the same purchase."""

        async def op(conn: Connection) -> Purchase:
            if await conn.fetchval("SELECT 1 FROM meters WHERE drn = $1", draft.meter) is None:
                existing = await conn.fetchrow(
                    "SELECT * FROM purchases WHERE idempotency_key = $1", draft.idempotency_key
                )
                if existing is None:
                    raise NotFound("meter", draft.meter)
                return self._same_request(draft, existing)
            now = self._clock()
            # Racing instances: the first insert wins, the others wait for its commit and then
            # read its row (READ COMMITTED takes a fresh snapshot per statement).
            row = await conn.fetchrow(
                "INSERT INTO purchases (purchase_id, channel, phone, meter, amount_minor,"
                " currency, units, tariff_id, state, idempotency_key, provider, created_at,"
                " updated_at, next_check_at, debt_recovery_minor)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13, $14)"
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
                draft.first_check_at or now + timedelta(seconds=ORPHAN_CHECK_AFTER_S),
                draft.debt_recovery_minor,
            )
            if row is None:
                existing = await conn.fetchrow(
                    "SELECT * FROM purchases WHERE idempotency_key = $1", draft.idempotency_key
                )
                return self._same_request(draft, existing)
            await self._append(
                conn,
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
            )
            return _purchase(row)

        return await self._with_retry(op)

    @staticmethod
    def _same_request(draft: PurchaseDraft, row: Row) -> Purchase:
        existing = _purchase(row)
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
        row = await self._fetchrow("SELECT * FROM purchases WHERE purchase_id = $1", purchase_id)
        if row is None:
            raise NotFound("purchase", purchase_id)
        return _purchase(row)

    async def find_purchases(
        self,
        *,
        phone: str | None = None,
        meter: str | None = None,
        states: Sequence[PurchaseState] | None = None,
        limit: int = 20,
    ) -> list[Purchase]:
        """Purchases matching every given filter, newest first."""
        rows = await self._fetch(
            "SELECT * FROM purchases WHERE ($1::text IS NULL OR phone = $1)"
            " AND ($2::text IS NULL OR meter = $2)"
            " AND ($3::text[] IS NULL OR state = ANY($3::text[]))"
            " ORDER BY created_at DESC, purchase_id LIMIT $4",
            phone,
            meter,
            [state.value for state in states] if states else None,
            limit,
        )
        return [_purchase(row) for row in rows]

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

        async def op(conn: Connection) -> Purchase:
            row = await self._lock_purchase(conn, purchase_id)
            if row["state"] != to.value:
                row = await self._move(conn, row, to, kind, actor, data)
            return _purchase(row)

        return await self._with_retry(op)

    async def attach_payment(
        self, purchase_id: str, *, provider: str, reference: str, actor: str
    ) -> Purchase:
        """The provider accepted the collection: payment row, reference, AWAITING_PAYMENT."""

        async def op(conn: Connection) -> Purchase:
            row = await self._lock_purchase(conn, purchase_id)
            now = self._clock()
            await conn.execute(
                "INSERT INTO payments (purchase_id, provider, reference, amount_minor, currency,"
                " state, payer, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8,"
                " $8) ON CONFLICT (provider, reference) DO NOTHING",
                purchase_id,
                provider,
                reference,
                row["amount_minor"],
                row["currency"],
                PaymentRecordState.PENDING.value,
                row["phone"],
                now,
            )
            owner = await conn.fetchval(
                "SELECT purchase_id FROM payments WHERE provider = $1 AND reference = $2"
                " FOR UPDATE",
                provider,
                reference,
            )
            if owner is None:
                await conn.execute(
                    "UPDATE payments SET purchase_id = $1, updated_at = $2"
                    " WHERE provider = $3 AND reference = $4",
                    purchase_id,
                    now,
                    provider,
                    reference,
                )
            elif owner != purchase_id:
                raise DuplicateError(
                    f"{provider} reference {reference} belongs to purchase {owner},"
                    f" not {purchase_id}",
                    constraint="payments.provider_reference",
                    key=f"{provider}:{reference}",
                )
            if row["provider_reference"] is None:
                row = await conn.fetchrow(
                    "UPDATE purchases SET provider_reference = $1, provider = $2, updated_at = $3"
                    " WHERE purchase_id = $4 RETURNING *",
                    reference,
                    provider,
                    now,
                    purchase_id,
                )
            if row["state"] == PurchaseState.CREATED.value:
                row = await self._move(
                    conn,
                    row,
                    PurchaseState.AWAITING_PAYMENT,
                    "payment_requested",
                    actor,
                    {"provider": provider, "reference": reference},
                )
            return _purchase(row)

        return await self._with_retry(op)

    async def record_notice(self, notice: NoticeRecord, *, actor: str) -> NoticeOutcome:
        """Keep a callback's claim and say which purchase it concerns."""

        async def op(conn: Connection) -> NoticeOutcome:
            now = self._clock()
            inserted = await conn.fetchval(
                "INSERT INTO payments (provider, reference, amount_minor, currency, state, payer,"
                " receipt, payload, payload_hash, created_at, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10)"
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
            )
            duplicate = False
            conflict = False
            purchase_id: str | None = None
            if inserted is None:
                row = await conn.fetchrow(
                    "SELECT purchase_id, payload_hash FROM payments"
                    " WHERE provider = $1 AND reference = $2 FOR UPDATE",
                    notice.provider,
                    notice.reference,
                )
                purchase_id = row["purchase_id"]
                if row["payload_hash"] is None:
                    # The callback's receipt is kept: a status answer may carry none (Daraja STK).
                    await conn.execute(
                        "UPDATE payments SET payload = $1, payload_hash = $2, updated_at = $3,"
                        " receipt = COALESCE(receipt, $6) WHERE provider = $4 AND reference = $5",
                        notice.raw,
                        notice.payload_hash,
                        now,
                        notice.provider,
                        notice.reference,
                        notice.receipt,
                    )
                else:
                    duplicate = True
                    conflict = row["payload_hash"] != notice.payload_hash
            await self._append(
                conn,
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
            )
            return NoticeOutcome(
                purchase_id=PurchaseId(purchase_id) if purchase_id else None,
                is_duplicate=duplicate,
                payload_conflict=conflict,
            )

        return await self._with_retry(op)

    async def get_payment(self, provider: str, reference: str) -> PaymentRecord | None:
        """The payment row for (provider, reference), if any."""
        row = await self._fetchrow(
            "SELECT * FROM payments WHERE provider = $1 AND reference = $2", provider, reference
        )
        if row is None:
            return None
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
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    async def _settle_payment_row(
        self,
        conn: Connection,
        purchase_id: str,
        payment: ConfirmedPayment,
        state: PaymentRecordState,
    ) -> None:
        # One statement inserts the row, or settles it if it has no purchase or ours, under
        # the row's lock; nothing returned means another purchase owns the reference.
        try:
            settled = await self._upsert_payment(conn, purchase_id, payment, state)
        except asyncpg.exceptions.UniqueViolationError as exc:
            if exc.constraint_name == RECEIPT_ONCE and payment.receipt is not None:
                raise ReceiptReused(payment.provider, payment.receipt) from exc
            raise
        if settled is None:
            owner = await conn.fetchval(
                "SELECT purchase_id FROM payments WHERE provider = $1 AND reference = $2",
                payment.provider,
                payment.reference,
            )
            raise DuplicateError(
                f"{payment.provider} reference {payment.reference} belongs to purchase"
                f" {owner}, not {purchase_id}",
                constraint="payments.provider_reference",
                key=f"{payment.provider}:{payment.reference}",
            )

    async def _upsert_payment(
        self,
        conn: Connection,
        purchase_id: str,
        payment: ConfirmedPayment,
        state: PaymentRecordState,
    ) -> object:
        """Insert or settle the payment row; None when another purchase owns the reference.

        The row's receipt becomes the one the provider's records proved (None: none), never a
        callback's claim kept from ``record_notice``: a claim takes no receipt unproven.
        """
        return await conn.fetchval(
            "INSERT INTO payments (purchase_id, provider, reference, amount_minor, currency,"
            " state, payer, receipt, created_at, updated_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)"
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
            self._clock(),
        )

    async def _pay(self, conn: Connection, row: Row, payment: ConfirmedPayment, actor: str) -> Row:
        """Record the (locked) purchase ``row`` paid by ``payment``; the updated row.

        Already PAID, VENDED, DELIVERED or VEND_FAILED: unchanged.
        """
        purchase_id = row["purchase_id"]
        current = PurchaseState(row["state"])
        if current in _PAID_OR_LATER:
            return row
        if not is_legal(current, PurchaseState.PAID):
            raise IllegalTransition(purchase_id, current, PurchaseState.PAID)
        await self._settle_payment_row(conn, purchase_id, payment, PaymentRecordState.SUCCEEDED)
        if row["provider_reference"] is None:
            row = await conn.fetchrow(
                "UPDATE purchases SET provider_reference = $1 WHERE purchase_id = $2 RETURNING *",
                payment.reference,
                purchase_id,
            )
        return await self._move(
            conn,
            row,
            PurchaseState.PAID,
            "payment_confirmed",
            actor,
            {
                "provider": payment.provider,
                "reference": payment.reference,
                "receipt": payment.receipt,
                "amount_minor": payment.amount.amount_minor,
                "currency": payment.amount.currency,
                "late": current in {PurchaseState.EXPIRED, PurchaseState.PAYMENT_FAILED},
            },
        )

    async def mark_paid(
        self, purchase_id: str, payment: ConfirmedPayment, *, actor: str
    ) -> Purchase:
        """A proven payment: payment row SUCCEEDED and the purchase PAID, one transaction."""

        async def op(conn: Connection) -> Purchase:
            row = await self._lock_purchase(conn, purchase_id)
            return _purchase(await self._pay(conn, row, payment, actor))

        return await self._with_retry(op)

    async def mark_payment_mismatch(
        self, purchase_id: str, payment: ConfirmedPayment, *, expected: Money, actor: str
    ) -> Purchase:
        """A proven payment of the wrong amount/currency/payer: REFUND_PENDING; never vends."""

        async def op(conn: Connection) -> Purchase:
            row = await self._lock_purchase(conn, purchase_id)
            await self._settle_payment_row(
                conn, purchase_id, payment, PaymentRecordState.MISMATCHED
            )
            data = {
                "provider": payment.provider,
                "reference": payment.reference,
                "paid_minor": payment.amount.amount_minor,
                "paid_currency": payment.amount.currency,
                "expected_minor": expected.amount_minor,
                "expected_currency": expected.currency,
                "payer": payment.payer,
            }
            await self._append(conn, purchase_id, "amount_mismatch", actor, data)
            current = PurchaseState(row["state"])
            if current is not PurchaseState.REFUND_PENDING and is_legal(
                current, PurchaseState.REFUND_PENDING
            ):
                row = await self._move(
                    conn, row, PurchaseState.REFUND_PENDING, "refund_needed", actor, data
                )
            return _purchase(row)

        return await self._with_retry(op)

    async def prove_receipt(self, provider: str, reference: str, receipt: str) -> None:
        """Record the receipt the provider's records prove for a payment row."""

        async def op(conn: Connection) -> None:
            try:
                updated = await conn.execute(
                    "UPDATE payments SET receipt = $1, updated_at = $2"
                    " WHERE provider = $3 AND reference = $4",
                    receipt,
                    self._clock(),
                    provider,
                    reference,
                )
            except asyncpg.exceptions.UniqueViolationError as exc:
                if exc.constraint_name == RECEIPT_ONCE:
                    raise ReceiptReused(provider, receipt) from exc
                raise
            if updated != "UPDATE 1":
                raise NotFound("payment", f"{provider}:{reference}")

        await self._with_retry(op, transaction=False)

    async def record_status_query(
        self, *, provider: str, conversation_id: str, originator_id: str, transaction_id: str
    ) -> None:
        """Keep a status query the provider acknowledged. Idempotent."""

        async def op(conn: Connection) -> None:
            now = self._clock()
            await conn.execute(
                "DELETE FROM status_queries WHERE asked_at < $1",
                now - timedelta(seconds=STATUS_QUERY_KEEP_S),
            )
            await conn.execute(
                "INSERT INTO status_queries (conversation_id, originator_id, provider,"
                " transaction_id, asked_at) VALUES ($1, $2, $3, $4, $5)"
                " ON CONFLICT (conversation_id) DO NOTHING",
                conversation_id,
                originator_id,
                provider,
                transaction_id,
                now,
            )

        await self._with_retry(op)

    async def answer_status_query(
        self,
        *,
        provider: str,
        conversation_id: str,
        originator_id: str,
        transaction_id: str,
        result: bytes,
    ) -> str:
        """Store a result for the unanswered query it names, once (the row locked)."""

        async def op(conn: Connection) -> str:
            row = await conn.fetchrow(
                "SELECT originator_id, provider, transaction_id, answered_at FROM status_queries"
                " WHERE conversation_id = $1 FOR UPDATE",
                conversation_id,
            )
            if (
                row is None
                or row["provider"] != provider
                or row["originator_id"] != originator_id
                or row["answered_at"] is not None
            ):
                return STATUS_UNMATCHED
            if row["transaction_id"] != transaction_id:
                return STATUS_CONTRADICTED
            await conn.execute(
                "UPDATE status_queries SET result = $1, answered_at = $2"
                " WHERE conversation_id = $3",
                result,
                self._clock(),
                conversation_id,
            )
            return STATUS_ACCEPTED

        return await self._with_retry(op)

    async def status_query_result(self, conversation_id: str) -> bytes | None:
        """The stored result of a query, None while it has none."""
        row = await self._fetchrow(
            "SELECT result FROM status_queries WHERE conversation_id = $1", conversation_id
        )
        return None if row is None or row["result"] is None else bytes(row["result"])

    async def schedule_check(self, purchase_id: str, *, at: datetime, attempts: int) -> None:
        """When the sweeper should next ask the provider about this purchase."""

        async def op(conn: Connection) -> None:
            await conn.execute(
                "UPDATE purchases SET next_check_at = $1, check_attempts = $2"
                " WHERE purchase_id = $3",
                at,
                attempts,
                purchase_id,
            )

        await self._with_retry(op, transaction=False)

    async def due_for_check(self, now: datetime, *, limit: int = 100) -> list[Purchase]:
        """CREATED or AWAITING_PAYMENT purchases whose next status check is due."""
        rows = await self._fetch(
            "SELECT * FROM purchases WHERE state IN ($1, $2) AND next_check_at IS NOT NULL"
            " AND next_check_at <= $3 ORDER BY next_check_at LIMIT $4",
            PurchaseState.CREATED.value,
            PurchaseState.AWAITING_PAYMENT.value,
            now,
            limit,
        )
        return [_purchase(row) for row in rows]

    async def paid_not_vended(self, *, limit: int = 100) -> list[Purchase]:
        """PAID purchases without a vend, oldest first."""
        rows = await self._fetch(
            "SELECT p.* FROM purchases p LEFT JOIN vends v ON v.purchase_id = p.purchase_id"
            " WHERE p.state = $1 AND v.vend_id IS NULL ORDER BY p.updated_at LIMIT $2",
            PurchaseState.PAID.value,
            limit,
        )
        return [_purchase(row) for row in rows]

    # -- vends ----------------------------------------------------------------------------------

    async def record_vend(
        self, draft: VendDraft, *, actor: str, payment: ConfirmedPayment | None = None
    ) -> VendOutcome:
        """Store a vend with its TID, state, message and event in one transaction.

        With ``payment``, the purchase is first recorded paid as ``mark_paid`` does, in the same
        transaction. Locks the purchase, then the meter's row (``FOR UPDATE``): the TID
        check-and-advance is serialised across every instance.
        """

        async def op(conn: Connection) -> VendOutcome:
            row = await self._lock_purchase(conn, draft.purchase_id)
            existing = await conn.fetchrow(
                "SELECT * FROM vends WHERE purchase_id = $1", draft.purchase_id
            )
            if existing is not None:
                return VendOutcome(vend=_vend(existing), replayed=True, purchase=_purchase(row))
            if payment is not None:
                row = await self._pay(conn, row, payment, actor)
            current = PurchaseState(row["state"])
            if not is_legal(current, PurchaseState.VENDED):
                raise IllegalTransition(draft.purchase_id, current, PurchaseState.VENDED)
            meter = await conn.fetchrow(
                "SELECT last_tid, sgc, krn, base_date FROM meters WHERE drn = $1 FOR UPDATE",
                draft.meter,
            )
            if meter is None:
                raise NotFound("meter", draft.meter)
            last_tid = meter["last_tid"]
            change = None
            if draft.key_change_id is not None:
                change = await self._pending_key_change(conn, draft, meter)
            rollover = change is not None and change.rollover
            if last_tid != draft.expected_last_tid or (
                last_tid is not None and draft.tid <= last_tid and not rollover
            ):
                raise TidConflict(draft.meter, draft.expected_last_tid, last_tid)
            now = self._clock()
            if change is not None:
                await self._apply_key_change(conn, draft, change, now)
            # One statement: the meter's TID advances, the vend (under the meter's base date, the
            # new one after the key change above) and its token message are stored (every
            # constraint still applies to each part).
            vend = await conn.fetchrow(
                "WITH advanced AS (UPDATE meters SET last_tid = $13 WHERE drn = $2),"
                " queued AS (INSERT INTO outbox (purchase_id, kind, recipient, body, state,"
                " next_try_at, created_at, updated_at) VALUES ($1, $8, $9, $10, $11, $7, $7, $7))"
                " INSERT INTO vends (purchase_id, meter, tid, token, units, receipt, created_at,"
                " key_change_tokens, base_date) VALUES ($1, $2, $3, $4, $5, $6, $7, $12,"
                " (SELECT base_date FROM meters WHERE drn = $2)) RETURNING *",
                draft.purchase_id,
                draft.meter,
                draft.tid,
                draft.token,
                draft.units,
                draft.receipt,
                now,
                MessageKind.TOKEN.value,
                draft.recipient,
                draft.message,
                (OutboxState.PENDING if draft.recipient else OutboxState.HELD).value,
                " ".join(draft.key_change_tokens),
                draft.fbe.tid if draft.fbe else draft.tid,
            )
            await self._vend_extras(conn, draft, row["currency"], actor, now)
            row = await self._move(
                conn,
                row,
                PurchaseState.VENDED,
                "token_vended",
                actor,
                {
                    "meter": draft.meter,
                    "tid": draft.tid,
                    "units": draft.units,
                    "token_last4": draft.token[-4:],
                },
            )
            return VendOutcome(vend=_vend(vend), replayed=False, purchase=_purchase(row))

        return await self._with_retry(op)

    async def _vend_extras(
        self, conn: Connection, draft: VendDraft, currency: str, actor: str, now: datetime
    ) -> None:
        """The vend's debt recovery and FBE token, when it carries them."""
        if draft.debt_recovery_minor:
            await self._recover_debt(conn, draft, currency, actor, now)
        if draft.fbe is not None:
            await self._issue_fbe(conn, draft, draft.fbe, actor, now)

    async def _recover_debt(
        self, conn: Connection, draft: VendDraft, currency: str, actor: str, now: datetime
    ) -> None:
        """Take the draft's recovery off the meter's debt (compare-and-set), with its row."""
        recovered, expected = draft.debt_recovery_minor, draft.expected_debt_balance_minor
        if expected is None or not 0 < recovered <= expected:
            raise ValueError(f"cannot recover {recovered} of a debt of {expected}")
        moved = await conn.fetchrow(
            "UPDATE meter_debts SET balance_minor = balance_minor - $1,"
            " recovered_total_minor = recovered_total_minor + $1, updated_at = $2"
            " WHERE meter = $3 AND balance_minor = $4 AND currency = $5 RETURNING balance_minor",
            recovered,
            now,
            draft.meter,
            expected,
            currency,
        )
        if moved is None:
            raise VendConflict(draft.meter, "the debt balance")
        await conn.execute(
            "INSERT INTO debt_recoveries (purchase_id, meter, amount_minor, currency,"
            " balance_after_minor, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
            draft.purchase_id,
            draft.meter,
            recovered,
            currency,
            expected - recovered,
            now,
        )
        await self._append(
            conn,
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
        )

    async def _issue_fbe(
        self, conn: Connection, draft: VendDraft, fbe: FbeDraft, actor: str, now: datetime
    ) -> None:
        """Store the month's FBE token and queue its message; the month's second is refused."""
        if fbe.tid <= draft.tid or draft.key_change_id is not None:
            raise ValueError("an FBE token follows the credit token's TID, never with a key change")
        issued = await conn.fetchrow(
            "INSERT INTO fbe_issues (meter, month, purchase_id, tid, token, units, created_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (meter, month) DO NOTHING"
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
        await conn.execute(
            "INSERT INTO outbox (purchase_id, kind, recipient, body, state, next_try_at,"
            " created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6, $6)",
            draft.purchase_id,
            MessageKind.FBE.value,
            draft.recipient,
            fbe.message,
            (OutboxState.PENDING if draft.recipient else OutboxState.HELD).value,
            now,
        )
        await self._append(
            conn,
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
        )

    # -- debt recovery and free basic electricity -----------------------------------------------

    async def get_debt(self, meter: str) -> MeterDebt | None:
        """The meter's debt account, if it ever had one (a cleared debt has balance 0)."""
        row = await self._fetchrow("SELECT * FROM meter_debts WHERE meter = $1", meter)
        return _meter_debt(row) if row is not None else None

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
        DebtTerms(
            balance_minor=balance.amount_minor,
            currency=balance.currency,
            rate_basis_points=rate_basis_points,
            min_per_purchase_minor=min_per_purchase_minor,
            cap_per_purchase_minor=cap_per_purchase_minor,
        )  # validates

        async def op(conn: Connection) -> MeterDebt:
            if await conn.fetchrow("SELECT 1 FROM meters WHERE drn = $1 FOR UPDATE", meter) is None:
                raise NotFound("meter", meter)
            old = await conn.fetchrow("SELECT * FROM meter_debts WHERE meter = $1", meter)
            row = await conn.fetchrow(
                "INSERT INTO meter_debts (meter, currency, balance_minor, rate_basis_points,"
                " min_per_purchase_minor, cap_per_purchase_minor, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (meter) DO UPDATE SET"
                " currency = excluded.currency, balance_minor = excluded.balance_minor,"
                " rate_basis_points = excluded.rate_basis_points,"
                " min_per_purchase_minor = excluded.min_per_purchase_minor,"
                " cap_per_purchase_minor = excluded.cap_per_purchase_minor,"
                " updated_at = excluded.updated_at RETURNING *",
                meter,
                balance.currency,
                balance.amount_minor,
                rate_basis_points,
                min_per_purchase_minor,
                cap_per_purchase_minor,
                self._clock(),
            )
            debt = _meter_debt(row)
            before = _meter_debt(old) if old is not None else None
            await self._append(conn, None, "debt_set", actor, debt_event_data(debt, before, reason))
            return debt

        return await self._with_retry(op)

    async def clear_debt(self, meter: str, *, actor: str, reason: str = "") -> MeterDebt:
        """Write the meter's debt off (balance 0, terms kept); appends ``debt_cleared``."""

        async def op(conn: Connection) -> MeterDebt:
            old = await conn.fetchrow(
                "SELECT * FROM meter_debts WHERE meter = $1 FOR UPDATE", meter
            )
            if old is None:
                raise NotFound("debt", meter)
            row = await conn.fetchrow(
                "UPDATE meter_debts SET balance_minor = 0, updated_at = $1 WHERE meter = $2"
                " RETURNING *",
                self._clock(),
                meter,
            )
            debt = _meter_debt(row)
            await self._append(
                conn, None, "debt_cleared", actor, debt_event_data(debt, _meter_debt(old), reason)
            )
            return debt

        return await self._with_retry(op)

    async def debt_recoveries(self, meter: str, *, limit: int = 50) -> list[DebtRecovery]:
        """What the meter's vends recovered, newest first."""
        rows = await self._fetch(
            "SELECT * FROM debt_recoveries WHERE meter = $1"
            " ORDER BY created_at DESC, purchase_id DESC LIMIT $2",
            meter,
            limit,
        )
        return [_debt_recovery(row) for row in rows]

    async def get_debt_recovery(self, purchase_id: str) -> DebtRecovery | None:
        """What the purchase's vend recovered, if anything."""
        row = await self._fetchrow(
            "SELECT * FROM debt_recoveries WHERE purchase_id = $1", purchase_id
        )
        return _debt_recovery(row) if row is not None else None

    async def set_fbe_allowance(self, tariff_id: str, units_per_month: int, *, actor: str) -> None:
        """The tariff's monthly free basic electricity in tenths of a kWh (0 stops it)."""
        if units_per_month < 0:
            raise ValueError(f"FBE units cannot be negative, got {units_per_month}")

        async def op(conn: Connection) -> None:
            if await conn.fetchrow("SELECT 1 FROM tariffs WHERE tariff_id = $1", tariff_id) is None:
                raise NotFound("tariff", tariff_id)
            old = await conn.fetchrow(
                "SELECT units_per_month FROM fbe_allowances WHERE tariff_id = $1 FOR UPDATE",
                tariff_id,
            )
            if units_per_month == 0:
                await conn.execute("DELETE FROM fbe_allowances WHERE tariff_id = $1", tariff_id)
            else:
                await conn.execute(
                    "INSERT INTO fbe_allowances (tariff_id, units_per_month, updated_at)"
                    " VALUES ($1, $2, $3) ON CONFLICT (tariff_id) DO UPDATE SET"
                    " units_per_month = excluded.units_per_month,"
                    " updated_at = excluded.updated_at",
                    tariff_id,
                    units_per_month,
                    self._clock(),
                )
            await self._append(
                conn,
                None,
                "fbe_allowance_set",
                actor,
                {
                    "tariff_id": tariff_id,
                    "units_per_month": units_per_month,
                    "previous_units_per_month": old["units_per_month"] if old is not None else 0,
                },
            )

        await self._with_retry(op)

    async def fbe_allowance(self, tariff_id: str) -> int:
        """The tariff's monthly FBE units (0: none)."""
        row = await self._fetchrow(
            "SELECT units_per_month FROM fbe_allowances WHERE tariff_id = $1", tariff_id
        )
        return int(row["units_per_month"]) if row is not None else 0

    async def fbe_due(self, meter: str, month: str) -> int:
        """The FBE units the meter may still get in ``month``: 0 if issued already, or none."""
        row = await self._fetchrow(
            "SELECT a.units_per_month FROM meters m"
            " JOIN fbe_allowances a ON a.tariff_id = m.tariff_id"
            " LEFT JOIN fbe_issues f ON f.meter = m.drn AND f.month = $1"
            " WHERE m.drn = $2 AND f.issue_id IS NULL",
            month,
            meter,
        )
        return int(row["units_per_month"]) if row is not None else 0

    async def fbe_issues(self, meter: str, *, limit: int = 24) -> list[FbeIssue]:
        """The meter's FBE tokens, newest first."""
        rows = await self._fetch(
            "SELECT * FROM fbe_issues WHERE meter = $1 ORDER BY month DESC LIMIT $2", meter, limit
        )
        return [_fbe_issue(row) for row in rows]

    @staticmethod
    async def _pending_key_change(conn: Connection, draft: VendDraft, meter: Row) -> KeyChange:
        """The draft's key change, locked; ``TidConflict`` (read again) if it is not pending."""
        row = await conn.fetchrow(
            "SELECT * FROM key_changes WHERE change_id = $1 AND meter = $2 AND state = $3"
            " FOR UPDATE",
            draft.key_change_id,
            draft.meter,
            KeyChangeState.PENDING.value,
        )
        change = _key_change(row) if row is not None else None
        if change is None or (meter["sgc"], meter["krn"], meter["base_date"]) != (
            change.from_sgc,
            change.from_krn,
            change.from_base_date,
        ):
            _raise_tid_conflict(draft, meter["last_tid"])
        return change

    async def _apply_key_change(
        self, conn: Connection, draft: VendDraft, change: KeyChange, now: datetime
    ) -> None:
        """The meter row takes the new key; the change is APPLIED for this purchase."""
        await conn.execute(
            "WITH changed AS (UPDATE key_changes SET state = $1, applied_at = $2,"
            " purchase_id = $3 WHERE change_id = $4)"
            " UPDATE meters SET sgc = $5, krn = $6, tariff_index = $7, base_date = $8"
            " WHERE drn = $9",
            KeyChangeState.APPLIED.value,
            now,
            draft.purchase_id,
            change.change_id,
            change.sgc,
            change.krn,
            change.tariff_index,
            change.base_date,
            draft.meter,
        )
        await self._append(
            conn,
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
        )

    async def vend_context(self, purchase_id: str) -> VendContext:
        """The purchase, its meter, vend, receipt and language in one read. Raises ``NotFound``."""
        row = await self._fetchrow(_VEND_CONTEXT, purchase_id)
        if row is None:
            raise NotFound("purchase", purchase_id)
        meter = {name: row["m_" + name] for name in _METER_COLUMNS}
        vend = (
            None if row["v_vend_id"] is None else {name: row["v_" + name] for name in _VEND_COLUMNS}
        )
        return VendContext(
            purchase=_purchase(row),
            meter=_meter(meter),
            vend=_vend(vend) if vend is not None else None,
            receipt=row["pay_receipt"],
            language=row["pref_language"],
            key_change=_key_change({name: row["kc_" + name] for name in _KEY_CHANGE_COLUMNS})
            if row["kc_change_id"] is not None
            else None,
        )

    async def get_vend(self, purchase_id: str) -> Vend | None:
        """The purchase's vend, if it has one."""
        row = await self._fetchrow("SELECT * FROM vends WHERE purchase_id = $1", purchase_id)
        return _vend(row) if row is not None else None

    async def last_vend(self, phone: str, meter: str | None = None) -> Vend | None:
        """The newest vend bought from ``phone`` (for ``meter`` if given)."""
        row = await self._fetchrow(
            "SELECT v.* FROM vends v JOIN purchases p ON p.purchase_id = v.purchase_id"
            " WHERE p.phone = $1 AND ($2::text IS NULL OR v.meter = $2)"
            " ORDER BY v.created_at DESC, v.vend_id DESC LIMIT 1",
            phone,
            meter,
        )
        return _vend(row) if row is not None else None

    # -- key changes ----------------------------------------------------------------------------

    async def meters_on_key(
        self, sgc: str, krn: int, *, meters: Sequence[str] | None = None
    ) -> list[MeterRecord]:
        """The meters whose key is (``sgc``, ``krn``), among ``meters`` if given, by DRN."""
        rows = await self._fetch(
            "SELECT * FROM meters WHERE sgc = $1 AND krn = $2"
            " AND ($3::text[] IS NULL OR drn = ANY($3::text[])) ORDER BY drn",
            sgc,
            krn,
            list(meters) if meters is not None else None,
        )
        return [_meter(row) for row in rows]

    async def plan_key_rotation(
        self, rotation: KeyRotation, *, meters: Sequence[str] | None = None, actor: str
    ) -> list[KeyChange]:
        """Plan a pending key change for each meter on the old key; supersede earlier plans."""

        async def op(conn: Connection) -> list[KeyChange]:
            now = self._clock()
            selected = (
                "SELECT drn FROM meters WHERE sgc = $1 AND krn = $2"
                " AND ($3::text[] IS NULL OR drn = ANY($3::text[]))"
            )
            wanted = list(meters) if meters is not None else None
            await conn.execute(
                f"UPDATE key_changes SET state = $4 WHERE state = $5 AND meter IN ({selected})",  # noqa: S608 - constant SQL
                rotation.sgc,
                rotation.from_krn,
                wanted,
                KeyChangeState.SUPERSEDED.value,
                KeyChangeState.PENDING.value,
            )
            rows = await conn.fetch(
                "INSERT INTO key_changes (meter, from_sgc, from_krn, from_tariff_index,"
                " from_base_date, sgc, krn, tariff_index, base_date, state, planned_at)"
                " SELECT drn, sgc, krn, tariff_index, base_date, COALESCE($4, sgc), $5,"
                " COALESCE($6, tariff_index), $7, $8, $9 FROM meters"
                " WHERE sgc = $1 AND krn = $2 AND ($3::text[] IS NULL OR drn = ANY($3::text[]))"
                " ORDER BY drn RETURNING *",
                rotation.sgc,
                rotation.from_krn,
                wanted,
                rotation.to_sgc,
                rotation.to_krn,
                rotation.to_tariff_index,
                rotation.to_base_date,
                KeyChangeState.PENDING.value,
                now,
            )
            change_of = {row["meter"]: row["change_id"] for row in rows}
            stuck = await conn.fetch(
                "SELECT * FROM purchases WHERE state = $1 AND meter = ANY($2::text[])"
                " ORDER BY purchase_id FOR UPDATE",
                PurchaseState.VEND_FAILED.value,
                list(change_of),
            )
            for purchase in stuck:
                await self._move(
                    conn,
                    purchase,
                    PurchaseState.PAID,
                    "vend_retry_queued",
                    actor,
                    {"reason": "key change planned", "change_id": change_of[purchase["meter"]]},
                )
            await self._append(
                conn,
                None,
                "key_rotation_planned",
                actor,
                {
                    "sgc": rotation.sgc,
                    "from_krn": rotation.from_krn,
                    "to_sgc": rotation.to_sgc or rotation.sgc,
                    "to_krn": rotation.to_krn,
                    "to_base_date": rotation.to_base_date,
                    "meters": len(rows),
                },
            )
            return sorted((_key_change(row) for row in rows), key=lambda c: c.meter)

        return await self._with_retry(op)

    async def key_changes(self, meter: str) -> list[KeyChange]:
        """The meter's key changes, oldest first."""
        rows = await self._fetch(
            "SELECT * FROM key_changes WHERE meter = $1 ORDER BY change_id", meter
        )
        return [_key_change(row) for row in rows]

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

        async def op(conn: Connection) -> OutboxMessage:
            now = self._clock()
            row = await conn.fetchrow(
                "INSERT INTO outbox (purchase_id, kind, recipient, body, state, next_try_at,"
                " created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6, $6) RETURNING *",
                purchase_id,
                kind.value,
                recipient,
                body,
                (OutboxState.PENDING if recipient else OutboxState.HELD).value,
                now,
            )
            await self._append(
                conn, purchase_id, f"{kind.value}_queued", actor, {"recipient": recipient}
            )
            return _outbox(row)

        return await self._with_retry(op)

    async def claim_outbox(
        self, now: datetime, *, lease_until: datetime, limit: int = 50
    ) -> list[OutboxMessage]:
        """Claim due messages until ``lease_until`` (expired leases come back).

        ``FOR UPDATE SKIP LOCKED``: workers on several instances claim disjoint messages.
        """

        async def op(conn: Connection) -> list[OutboxMessage]:
            rows = await conn.fetch(
                "WITH due AS (SELECT message_id FROM outbox WHERE state IN ($1, $2)"
                " AND next_try_at <= $3 ORDER BY next_try_at, message_id LIMIT $4"
                " FOR UPDATE SKIP LOCKED)"
                " UPDATE outbox o SET state = $2, next_try_at = $5, attempts = o.attempts + 1,"
                " updated_at = $3 FROM due WHERE o.message_id = due.message_id RETURNING o.*",
                OutboxState.PENDING.value,
                OutboxState.SENDING.value,
                now,
                limit,
                lease_until,
            )
            return sorted((_outbox(row) for row in rows), key=lambda m: m.message_id)

        return await self._with_retry(op)

    async def outbox_sent(
        self,
        message_id: int,
        *,
        provider_message_id: str,
        cost: str | None,
        state: DeliveryState,
    ) -> None:
        """The provider took the message."""

        async def op(conn: Connection) -> None:
            # Serialised with a report for the same id (``apply_delivery_report``): either the
            # report sees the id recorded, or it is kept and this transaction applies it.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", provider_message_id)
            new_state = (
                OutboxState.DELIVERED if state is DeliveryState.DELIVERED else OutboxState.SENT
            )
            await conn.execute(
                "UPDATE outbox SET state = $1, provider_message_id = $2, cost = $3,"
                " last_error = NULL, updated_at = $4 WHERE message_id = $5"
                " AND state <> ALL($6::text[])",
                new_state.value,
                provider_message_id,
                cost,
                self._clock(),
                message_id,
                _FINAL_OUTBOX,
            )
            purchase_id = await conn.fetchval(
                "SELECT purchase_id FROM outbox WHERE message_id = $1", message_id
            )
            await self._append(
                conn,
                purchase_id,
                "sms_sent",
                "outbox",
                {
                    "message_id": message_id,
                    "provider_message_id": provider_message_id,
                    "cost": cost,
                },
            )
            early = await conn.fetchrow(
                "DELETE FROM early_delivery_reports WHERE provider_message_id = $1"
                " RETURNING state, failure_reason",
                provider_message_id,
            )
            if early is not None:
                message = await conn.fetchrow(
                    "SELECT * FROM outbox WHERE message_id = $1 FOR UPDATE", message_id
                )
                await self._apply_report(
                    conn, message, DeliveryState(early["state"]), early["failure_reason"]
                )

        await self._with_retry(op)

    async def outbox_retry(self, message_id: int, *, next_try_at: datetime, error: str) -> None:
        """Sending failed for now; try again at ``next_try_at``."""

        async def op(conn: Connection) -> None:
            await conn.execute(
                "UPDATE outbox SET state = $1, next_try_at = $2, last_error = $3, updated_at = $4"
                " WHERE message_id = $5 AND state <> ALL($6::text[])",
                OutboxState.PENDING.value,
                next_try_at,
                error,
                self._clock(),
                message_id,
                _FINAL_OUTBOX,
            )

        await self._with_retry(op, transaction=False)

    async def outbox_failed(self, message_id: int, *, error: str) -> None:
        """Sending failed for good; an operator must look."""

        async def op(conn: Connection) -> None:
            purchase_id = await conn.fetchval(
                "UPDATE outbox SET state = $1, last_error = $2, updated_at = $3"
                " WHERE message_id = $4 RETURNING purchase_id",
                OutboxState.FAILED.value,
                error,
                self._clock(),
                message_id,
            )
            await self._append(
                conn,
                purchase_id,
                "sms_failed",
                "outbox",
                {"message_id": message_id, "error": error},
            )

        await self._with_retry(op)

    async def _apply_report(
        self, conn: Connection, row: Row, state: DeliveryState, failure_reason: str | None
    ) -> OutboxMessage:
        """A delivery report on the (locked) message ``row``; a delivered token: DELIVERED."""
        message = _outbox(row)
        if message.state.value in _FINAL_OUTBOX:
            return message
        if state is DeliveryState.DELIVERED:
            new_state = OutboxState.DELIVERED
        elif state.is_final:
            new_state = OutboxState.FAILED
        else:
            new_state = OutboxState.SENT
        updated = await conn.fetchrow(
            "UPDATE outbox SET state = $1, last_error = $2, updated_at = $3"
            " WHERE message_id = $4 RETURNING *",
            new_state.value,
            failure_reason,
            self._clock(),
            message.message_id,
        )
        await self._append(
            conn,
            message.purchase_id,
            f"sms_{state.value}",
            "delivery_report",
            {"message_id": message.message_id, "reason": failure_reason},
        )
        if (
            new_state is OutboxState.DELIVERED
            and message.purchase_id is not None
            and message.kind is MessageKind.TOKEN
        ):
            purchase = await self._lock_purchase(conn, message.purchase_id)
            if purchase["state"] == PurchaseState.VENDED.value:
                await self._move(
                    conn,
                    purchase,
                    PurchaseState.DELIVERED,
                    "token_delivered",
                    "delivery_report",
                    {"message_id": message.message_id},
                )
        return _outbox(updated)

    async def _keep_early_report(self, conn: Connection, report: DeliveryReport) -> None:
        """Keep a report whose message id is not recorded yet (bounded, expiring)."""
        now = self._clock()
        await conn.execute(
            "DELETE FROM early_delivery_reports WHERE received_at < $1",
            now - timedelta(seconds=EARLY_REPORT_TTL_S),
        )
        kept = await conn.fetchval("SELECT count(*) FROM early_delivery_reports")
        if kept >= EARLY_REPORT_LIMIT:
            log.warning("delivery_report_dropped", provider_message_id=report.provider_message_id)
            return
        # A final state is never replaced by a later non-final one ("Sent" after "Success").
        await conn.execute(
            "INSERT INTO early_delivery_reports (provider_message_id, state, failure_reason,"
            " received_at) VALUES ($1, $2, $3, $4) ON CONFLICT (provider_message_id) DO UPDATE"
            " SET state = excluded.state, failure_reason = excluded.failure_reason"
            " WHERE $5 OR early_delivery_reports.state <> ALL($6::text[])",
            report.provider_message_id,
            report.state.value,
            report.failure_reason,
            now,
            report.state.is_final,
            _FINAL_DELIVERY,
        )

    async def apply_delivery_report(self, report: DeliveryReport) -> OutboxMessage | None:
        """Record a delivery report; a delivered token message makes its purchase DELIVERED.

        An unknown message id is kept for ``outbox_sent`` (see ``Ledger``) and answers None.
        """

        async def op(conn: Connection) -> OutboxMessage | None:
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", report.provider_message_id
            )
            row = await conn.fetchrow(
                "SELECT * FROM outbox WHERE provider_message_id = $1 FOR UPDATE",
                report.provider_message_id,
            )
            if row is None:
                await self._keep_early_report(conn, report)
                return None
            return await self._apply_report(conn, row, report.state, report.failure_reason)

        return await self._with_retry(op)

    async def outbox_for(self, purchase_id: str) -> list[OutboxMessage]:
        """The purchase's messages, oldest first."""
        rows = await self._fetch(
            "SELECT * FROM outbox WHERE purchase_id = $1 ORDER BY message_id", purchase_id
        )
        return [_outbox(row) for row in rows]

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

        async def op(conn: Connection) -> None:
            await self._append(conn, purchase_id, kind, actor, data)

        await self._with_retry(op)

    async def timeline(self, purchase_id: str) -> list[Event]:
        """The purchase's events, oldest first."""
        rows = await self._fetch(
            "SELECT * FROM events WHERE purchase_id = $1 ORDER BY event_id", purchase_id
        )
        return [_event(row) for row in rows]

    async def events(self, *, kind: str | None = None, limit: int = 100) -> list[Event]:
        """Recent events, newest first, optionally of one kind."""
        rows = await self._fetch(
            "SELECT * FROM events WHERE ($1::text IS NULL OR kind = $1)"
            " ORDER BY event_id DESC LIMIT $2",
            kind,
            limit,
        )
        return [_event(row) for row in rows]

    # -- channels -------------------------------------------------------------------------------

    async def save_meter(self, phone: str, meter: str, *, nickname: str = "") -> SavedMeter:
        """Keep a meter for a phone (renames it if kept already).

        The phone's saved meters are counted under an advisory lock on the phone, so two
        instances cannot both add the sixth.
        """

        async def op(conn: Connection) -> SavedMeter:
            if await conn.fetchval("SELECT 1 FROM meters WHERE drn = $1", meter) is None:
                raise NotFound("meter", meter)
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('saved_meters:' || $1))", phone
            )
            row = await conn.fetchrow(
                "UPDATE saved_meters SET nickname = $1 WHERE phone = $2 AND meter = $3 RETURNING *",
                nickname,
                phone,
                meter,
            )
            if row is None:
                count = await conn.fetchval(
                    "SELECT count(*) FROM saved_meters WHERE phone = $1", phone
                )
                if count >= MAX_SAVED_METERS:
                    raise SavedMetersFull(f"{phone} already keeps {MAX_SAVED_METERS} meters")
                row = await conn.fetchrow(
                    "INSERT INTO saved_meters (phone, meter, nickname, created_at)"
                    " VALUES ($1, $2, $3, $4) RETURNING *",
                    phone,
                    meter,
                    nickname,
                    self._clock(),
                )
            return _saved(row)

        return await self._with_retry(op)

    async def saved_meters(self, phone: str) -> list[SavedMeter]:
        """The phone's saved meters, oldest first."""
        rows = await self._fetch(
            "SELECT * FROM saved_meters WHERE phone = $1 ORDER BY created_at, meter", phone
        )
        return [_saved(row) for row in rows]

    async def remove_saved_meter(self, phone: str, meter: str) -> bool:
        """Forget a saved meter; False if it was not saved."""

        async def op(conn: Connection) -> bool:
            removed = await conn.fetchval(
                "DELETE FROM saved_meters WHERE phone = $1 AND meter = $2 RETURNING 1",
                phone,
                meter,
            )
            return removed is not None

        return await self._with_retry(op, transaction=False)

    async def get_language(self, phone: str) -> str | None:
        """The phone's chosen language code, if any."""
        row = await self._fetchrow(
            "SELECT language FROM customer_preferences WHERE phone = $1", phone
        )
        return cast("str", row["language"]) if row is not None else None

    async def probe_write(self) -> None:
        """Commit, in a transaction, a write that changes nothing (a read-only server refuses)."""

        async def op(conn: Connection) -> None:
            await conn.execute(
                "UPDATE schema_migrations SET applied_at = applied_at"
                " WHERE version = (SELECT max(version) FROM schema_migrations)"
            )

        await self._with_retry(op, transaction=True)

    async def set_language(self, phone: str, language: str) -> None:
        """Remember the phone's language code."""

        async def op(conn: Connection) -> None:
            await conn.execute(
                "INSERT INTO customer_preferences (phone, language, updated_at)"
                " VALUES ($1, $2, $3) ON CONFLICT (phone) DO UPDATE SET"
                " language = excluded.language, updated_at = excluded.updated_at",
                phone,
                language,
                self._clock(),
            )

        await self._with_retry(op, transaction=False)

    # -- reports --------------------------------------------------------------------------------

    async def daily_report(self, day: date) -> list[ReportRow]:
        """Counts and sums of the purchases created on ``day`` (UTC), by provider and state."""
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        rows = await self._fetch(
            "SELECT provider, state, currency, count(*) AS n, sum(amount_minor)::bigint AS total"
            " FROM purchases WHERE created_at >= $1 AND created_at < $2"
            " GROUP BY provider, state, currency ORDER BY provider, state, currency",
            start,
            start + timedelta(days=1),
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
            for row in rows
        ]

    # -- metrics --------------------------------------------------------------------------------

    async def purchase_counts(self) -> dict[str, int]:
        """How many purchases are in each state (every state named, zeros included)."""
        counts = dict.fromkeys((state.value for state in PurchaseState), 0)
        for row in await self._fetch("SELECT state, count(*) AS n FROM purchases GROUP BY state"):
            counts[row["state"]] = row["n"]
        return counts

    async def outbox_stats(self, now: datetime) -> OutboxStats:
        """The outbox backlog (pending or sending), its oldest message's age, and held ones."""
        row = await self._fetchrow(
            "SELECT count(*) FILTER (WHERE state = ANY($1::text[])) AS backlog,"
            " min(created_at) FILTER (WHERE state = ANY($1::text[])) AS oldest,"
            " count(*) FILTER (WHERE state = $2) AS held"
            " FROM outbox WHERE state = ANY($1::text[]) OR state = $2",
            _UNSENT,
            OutboxState.HELD.value,
        )
        assert row is not None  # noqa: S101 - an aggregate always answers one row
        oldest = row["oldest"]
        age = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
        return OutboxStats(backlog=row["backlog"], oldest_age_s=age, held=row["held"])


def _raise_tid_conflict(draft: VendDraft, actual: int | None) -> NoReturn:
    raise TidConflict(draft.meter, draft.expected_last_tid, actual)


# --------------------------------------------------------------------------------------- opening


def is_postgres_url(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL database (``postgresql://`` or ``postgres://``)."""
    return urlsplit(url).scheme in {"postgres", "postgresql"}


def _check_schema(schema: str) -> str:
    if not _SCHEMA_NAME.match(schema):
        raise LedgerError(f"not a plain schema name (lower case, digits, _): {schema!r}")
    return schema


async def create_schema(url: str, schema: str) -> None:
    """Create the (empty) schema ``schema`` in the database at ``url`` if it is missing.

    For tests and benchmarks that isolate a ledger in a schema of their own.

    Raises:
        LedgerUnavailable: the server does not answer.
    """
    await _admin(url, f"CREATE SCHEMA IF NOT EXISTS {_check_schema(schema)}")


async def drop_schema(url: str, schema: str) -> None:
    """Drop the schema ``schema`` and everything in it (the tests' clean-up)."""
    await _admin(url, f"DROP SCHEMA IF EXISTS {_check_schema(schema)} CASCADE")


async def _admin(url: str, sql: str) -> None:
    try:
        conn = await asyncpg.connect(url, timeout=10)
    except Exception as exc:
        raise translate_error(exc) from exc
    try:
        await conn.execute(sql)
    except Exception as exc:
        raise translate_error(exc) from exc
    finally:
        await conn.close()


async def _keep_session(conn: Connection) -> None:
    """The pool's reset hook: nothing beyond asyncpg's own rollback of an open transaction.

    The default reset (``RESET ALL``, ``CLOSE ALL``, ``UNLISTEN *``, unlock advisory locks) is
    one more round trip on every release, and the ledger leaves no session state behind.
    """
    del conn


@contextlib.asynccontextmanager
async def open_postgres_ledger(  # noqa: PLR0913 - keyword-only settings of one pool
    url: str,
    *,
    clock: Clock = _utc_now,
    schema: str | None = None,
    min_size: int = 1,
    max_size: int = 10,
    retry: RetryPolicy | None = None,
    migrate: bool = True,
    connect_timeout_s: float = 10.0,
    command_timeout_s: float = 30.0,
    application_name: str = "sts-gateway",
) -> AsyncIterator[PostgresLedger]:
    """Open the ledger at ``url`` (``postgresql://127.0.0.1:5432/test``), migrated; closed on exit.

    Args:
        url: a libpq-style URL; user and password may be in it (or come from the environment).
        clock: the time source for every timestamp (UTC, aware).
        schema: put the ledger in this schema (it must exist) instead of the user's default
            ``search_path``.
        min_size: connections the pool keeps open.
        max_size: the pool's connections at most, per instance (the server's
            ``max_connections`` bounds the sum over every instance).
        retry: how transient failures are retried.
        migrate: apply pending migrations first (instances starting together take turns).
        connect_timeout_s: how long one connection attempt may take, seconds.
        command_timeout_s: how long one statement may take (lock waits included) before it is
            cancelled and retried, seconds.
        application_name: how the connections appear in ``pg_stat_activity``.

    Raises:
        LedgerUnavailable: the server does not answer (after the retries).
        MigrationError: a migration failed.
    """
    settings = {"application_name": application_name}
    if schema:
        settings["search_path"] = _check_schema(schema)
    policy = retry or RetryPolicy()
    attempt = 0
    while True:
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                server_settings=settings,
                timeout=connect_timeout_s,
                command_timeout=command_timeout_s,
                reset=_keep_session,
            )
            break
        except Exception as exc:
            attempt += 1
            if not is_transient(exc) or attempt >= policy.attempts:
                raise translate_error(exc) from exc
            await policy.sleep(policy.delay_s(attempt - 1))
    ledger = PostgresLedger(pool, clock=clock, retry=policy)
    try:
        if migrate:
            applied = await ledger.migrate()
            if applied:
                log.info("ledger_migrated", backend="postgres", schema=schema, applied=applied)
        yield ledger
    finally:
        await ledger.close()
