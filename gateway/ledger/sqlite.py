"""The SQLite ledger: one writer that group-commits, readers on their own connections.

Writes
    One ``sqlite3`` connection, owned by one thread (a single-worker executor) and fed by one
    asyncio task that drains a queue of write operations. Each drained batch runs in one
    transaction (``BEGIN IMMEDIATE`` … ``COMMIT``); each operation inside it runs in its own
    ``SAVEPOINT``, so one failing operation is rolled back alone and does not poison the batch.
    Futures are resolved only after the ``COMMIT`` returned: nothing is acknowledged before it is
    durable. A batch is whatever queued up while the previous one was committing: no timer, so a
    lone write is not delayed and a burst shares one fsync.

    aiosqlite runs each statement as its own hop to the connection's thread and has no public way
    to run a batch of operations in that thread, so the writer owns its thread directly (the same
    one-thread-per-connection model).

Reads
    A small pool of aiosqlite connections (two by default, ``query_only``), used in turn; in WAL
    mode they read the last committed state without blocking the writer. Every read a caller
    makes after its write was acknowledged sees that write.

    The hot point reads (a purchase with its vend context, a purchase, a meter, a tariff, a
    phone's language and saved meters: a few indexed rows; every read a USSD hop makes) run on
    the event loop's own ``query_only`` connection instead: tens of microseconds of C, cheaper
    than the hop to a reader thread and back (a queue put, a thread wake-up, a
    ``call_soon_threadsafe``, the GIL handed over twice). That connection never waits for a
    lock (``busy_timeout = 0``): should the database be busy (WAL recovery, an exclusive lock
    from another process), the read goes to the pool, which waits, so the loop never blocks.

Throughput
    On the 2-core development machine (shared with other work) the durable write alone
    sustains about 5,000 vends/s; the end-to-end saga (reads, token engine, write) about 1,000 to
    2,200/s, bounded by the interpreter's CPU rather than by fsync (see ``bench/vend.py``).

Durability
    WAL with ``synchronous=FULL``: every COMMIT fsyncs the WAL, so an acknowledged vend survives a
    power cut, not only a process crash (``NORMAL`` in WAL mode may lose the last commits on power
    loss). Group commit pays that fsync once per batch instead of once per write.

Errors
    ``sqlite3`` errors are translated here and nowhere else: ``IntegrityError`` →
    ``DuplicateError`` (or ``LedgerError``); "database is locked", "database or disk is full" and
    I/O errors → ``LedgerUnavailable`` (retryable; nothing of the operation was written).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.resources
import json
import queue
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar, cast

import aiosqlite
import structlog

from gateway.ledger.base import (
    EARLY_REPORT_LIMIT,
    EARLY_REPORT_TTL_S,
    MAX_SAVED_METERS,
    ORPHAN_CHECK_AFTER_S,
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
WriteOp = Callable[[sqlite3.Connection], T]

log = structlog.get_logger()

#: Operations per transaction at most; a batch is whatever queued up meanwhile.
DEFAULT_MAX_BATCH: Final = 512
BUSY_TIMEOUT_MS: Final = 5000
#: Reader connections: reads of concurrent callers overlap in SQLite (the GIL is released).
DEFAULT_READERS: Final = 2
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_UNAVAILABLE_CODES: Final = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_NOMEM,
    }
)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _ts(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(text: str) -> datetime:
    return datetime.fromisoformat(text)


def translate_error(exc: BaseException) -> BaseException:  # noqa: PLR0911 - one answer per kind
    """Our error for a ``sqlite3`` error; anything else is returned unchanged."""
    if not isinstance(exc, sqlite3.Error):
        return exc
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    text = str(exc)
    if isinstance(exc, sqlite3.IntegrityError):
        if text.startswith("UNIQUE constraint failed:"):
            constraint = text.removeprefix("UNIQUE constraint failed:").strip()
            return DuplicateError(f"duplicate {constraint}", constraint=constraint, key="")
        return LedgerError(f"constraint refused the write: {text}")
    if primary in _UNAVAILABLE_CODES or "locked" in text or "disk is full" in text:
        if primary == sqlite3.SQLITE_FULL or "full" in text:
            return LedgerUnavailable(
                f"ledger database is full ({text}): nothing was written; free space or raise the"
                " page limit, then the sweeper finishes the work"
            )
        if primary in {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED} or "locked" in text:
            return LedgerUnavailable(
                f"ledger database is locked by another process ({text}): nothing was written;"
                " retry later"
            )
        return LedgerUnavailable(f"ledger database cannot be written ({text}): nothing was written")
    return LedgerError(f"ledger database error: {text}")


# ------------------------------------------------------------------------------------ the writer


@dataclass(slots=True)
class _Job:
    op: Callable[[sqlite3.Connection], object]
    future: asyncio.Future[object]
    standalone: bool = False  # run outside any batch (migrations, pragmas)


class _Stop:
    """The marker that tells the writer thread to finish (distinct from "no job pending")."""


_STOP: Final = _Stop()


class _Writer:
    """One connection owned by one thread that drains a queue of operations into group commits.

    Callers put jobs straight into a thread-safe queue: the writer thread starts on the first
    operation at once (its SQLite work runs on the other core, without the interpreter lock) and
    keeps taking the operations that arrive while it works; it commits when the queue is empty
    (or ``max_batch`` is reached), so a lone write is not delayed and a burst shares one fsync.
    The batch's futures are resolved on the event loop, in one callback, after the COMMIT.
    """

    def __init__(self, path: Path, *, max_batch: int, busy_timeout_ms: int) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._max_batch = max_batch
        self._jobs: queue.SimpleQueue[_Job | _Stop] = queue.SimpleQueue()
        self._conn: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = False
        self.batches = 0
        self.operations = 0

    async def start(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        ready: asyncio.Future[BaseException | None] = loop.create_future()
        self._thread = threading.Thread(
            target=self._main, args=(ready,), name="ledger-writer", daemon=True
        )
        self._thread.start()
        error = await ready
        if error is not None:
            await asyncio.to_thread(self._thread.join)
            raise translate_error(error) from error
        self._open = True

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path, isolation_level=None, timeout=self._busy_timeout_ms / 1000
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    async def run_in_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the writer's connection outside any batch (migrations, pragmas)."""
        return cast("T", await self._put(fn, standalone=True))

    async def submit(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Queue ``op``; returns its result once the batch holding it is committed."""
        return cast("T", await self._put(op, standalone=False))

    def _put(
        self, op: Callable[[sqlite3.Connection], object], *, standalone: bool
    ) -> asyncio.Future[object]:
        if not self._open:
            raise LedgerError("ledger writer is closed")
        loop = self._loop
        assert loop is not None  # noqa: S101 - set by start()
        future: asyncio.Future[object] = loop.create_future()
        self._jobs.put(_Job(op, future, standalone))
        return future

    # -- the writer thread ------------------------------------------------------------------------

    def _main(self, ready: asyncio.Future[BaseException | None]) -> None:
        loop = self._loop
        assert loop is not None  # noqa: S101 - set by start()
        try:
            self._conn = conn = self._connect()
        except sqlite3.Error as exc:
            loop.call_soon_threadsafe(_settle_ready, ready, exc)
            return
        loop.call_soon_threadsafe(_settle_ready, ready, None)
        try:
            self._drain(conn)
        finally:
            self._conn = None
            conn.close()

    def _drain(self, conn: sqlite3.Connection) -> None:
        """Take jobs until the stop marker; an operation that arrives mid-batch joins it."""
        jobs = self._jobs
        pending: _Job | _Stop | None = None
        while True:
            job = pending if pending is not None else jobs.get()
            pending = None
            if isinstance(job, _Stop):
                return
            if job.standalone:
                self._resolve([job], [self._standalone(conn, job)])
                continue
            batch = [job]
            while len(batch) < self._max_batch:
                try:
                    more = jobs.get_nowait()
                except queue.Empty:
                    break
                if isinstance(more, _Stop) or more.standalone:
                    pending = more
                    break
                batch.append(more)
            try:
                outcomes = self._run_batch([job.op for job in batch])
            except Exception as exc:  # noqa: BLE001 - a bug here fails the batch, not the thread
                failure = LedgerError(f"ledger writer failed: {exc!r}")
                outcomes = [(False, failure)] * len(batch)
            self.batches += 1
            self.operations += len(batch)
            self._resolve(batch, outcomes)

    @staticmethod
    def _standalone(conn: sqlite3.Connection, job: _Job) -> tuple[bool, object]:
        try:
            return True, job.op(conn)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to its caller
            return False, exc

    def _resolve(self, batch: Sequence[_Job], outcomes: Sequence[tuple[bool, object]]) -> None:
        loop = self._loop
        assert loop is not None  # noqa: S101 - set by start()
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody awaits these
            loop.call_soon_threadsafe(_settle, batch, outcomes)

    def _run_batch(
        self, ops: Sequence[Callable[[sqlite3.Connection], object]]
    ) -> list[tuple[bool, object]]:
        """Run a batch in one transaction, optimistically first.

        Most batches fail nowhere, so the first try runs the operations back to back with no
        SAVEPOINT (two statements per operation saved). If one raises, that try is rolled back
        whole and the batch runs again with a SAVEPOINT around each operation, so the failing one
        fails alone and the others commit. Operations are functions of the connection only, so
        running one twice (the first run rolled away) is the same as running it once.
        """
        conn = self._conn
        assert conn is not None  # noqa: S101 - started before any submit
        if len(ops) > 1:
            optimistic = self._run_optimistic(conn, ops)
            if optimistic is not None:
                return optimistic
        return self._run_guarded(conn, ops)

    @staticmethod
    def _run_optimistic(
        conn: sqlite3.Connection, ops: Sequence[Callable[[sqlite3.Connection], object]]
    ) -> list[tuple[bool, object]] | None:
        """The batch with no SAVEPOINTs, committed; None (rolled back) if any operation raised."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error:
            return None  # the guarded run reports it
        try:
            results: list[tuple[bool, object]] = [(True, op(conn)) for op in ops]
        except Exception:  # noqa: BLE001 - the guarded run finds which one and why
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            return None
        try:
            conn.execute("COMMIT")
        except sqlite3.Error:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            return None
        return results

    def _run_guarded(
        self, conn: sqlite3.Connection, ops: Sequence[Callable[[sqlite3.Connection], object]]
    ) -> list[tuple[bool, object]]:
        """The batch with a SAVEPOINT per operation: a failing one fails alone."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            return [(False, translate_error(exc))] * len(ops)
        results: list[tuple[bool, object]] = []
        for index, op in enumerate(ops):
            try:
                conn.execute("SAVEPOINT op")
                value = op(conn)
            except Exception as exc:  # noqa: BLE001 - every failure goes back to its caller
                error = translate_error(exc)
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK TO op")
                        conn.execute("RELEASE op")
                    except sqlite3.Error as rollback_exc:
                        return self._abandon(conn, len(ops), translate_error(rollback_exc))
                    results.append((False, error))
                    continue
                # SQLite rolled the whole transaction back (disk full, I/O): nothing stands.
                lost: BaseException = LedgerUnavailable(
                    f"batch rolled back by the database ({error}): nothing was written"
                )
                failed: list[tuple[bool, object]] = [(False, lost)] * len(ops)
                failed[index] = (False, error)
                return failed
            else:
                conn.execute("RELEASE op")
                results.append((True, value))
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            return self._abandon(conn, len(ops), translate_error(exc))
        return results

    @staticmethod
    def _abandon(
        conn: sqlite3.Connection, count: int, error: BaseException
    ) -> list[tuple[bool, object]]:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        return [(False, error)] * count

    async def close(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._open = False
        self._jobs.put(_STOP)
        await asyncio.to_thread(thread.join)
        self._thread = None


def _settle_ready(ready: asyncio.Future[BaseException | None], error: BaseException | None) -> None:
    if not ready.done():
        ready.set_result(error)


def _settle(batch: Sequence[_Job], outcomes: Sequence[tuple[bool, object]]) -> None:
    """On the loop: hand each job its outcome (a cancelled caller is skipped)."""
    for job, (ok, value) in zip(batch, outcomes, strict=True):
        if job.future.done():
            continue
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(cast("BaseException", value))


# ----------------------------------------------------------------------------------- migrations


def migration_scripts() -> list[tuple[int, str, str]]:
    """The packaged SQLite migrations as (version, file name, SQL), in order."""
    folder = importlib.resources.files("gateway.ledger.migrations.sqlite")
    found: list[tuple[int, str, str]] = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    return found


def _apply_migrations(conn: sqlite3.Connection) -> list[str]:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations"
        " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    applied: list[str] = []
    for version, name, sql in migration_scripts():
        if version in done:
            continue
        script = (
            "BEGIN IMMEDIATE;\n"
            f"{sql}\n"
            f"INSERT INTO schema_migrations (version, name, applied_at)"
            f" VALUES ({version}, '{name}', '{_ts(_utc_now())}');\n"
            "COMMIT;"
        )
        try:
            conn.executescript(script)
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error = translate_error(exc)
            if isinstance(error, LedgerUnavailable):
                raise error from exc
            raise MigrationError(f"migration {name} failed: {exc}") from exc
        applied.append(name)
    return applied


# ------------------------------------------------------------------------------------ row mappers


def _purchase(row: sqlite3.Row) -> Purchase:
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
        next_check_at=_dt(row["next_check_at"]) if row["next_check_at"] else None,
        created_at=_dt(row["created_at"]),
        updated_at=_dt(row["updated_at"]),
        debt_recovery_minor=row["debt_recovery_minor"],
    )


def _meter_debt(row: sqlite3.Row) -> MeterDebt:
    return MeterDebt(
        meter=MeterNumber(row["meter"]),
        balance=Money(row["balance_minor"], row["currency"]),
        rate_basis_points=row["rate_basis_points"],
        min_per_purchase_minor=row["min_per_purchase_minor"],
        cap_per_purchase_minor=row["cap_per_purchase_minor"],
        recovered_total_minor=row["recovered_total_minor"],
        updated_at=_dt(row["updated_at"]),
    )


def _debt_recovery(row: sqlite3.Row) -> DebtRecovery:
    return DebtRecovery(
        purchase_id=PurchaseId(row["purchase_id"]),
        meter=MeterNumber(row["meter"]),
        amount=Money(row["amount_minor"], row["currency"]),
        balance_after=Money(row["balance_after_minor"], row["currency"]),
        created_at=_dt(row["created_at"]),
    )


def _fbe_issue(row: sqlite3.Row) -> FbeIssue:
    return FbeIssue(
        meter=MeterNumber(row["meter"]),
        month=row["month"],
        purchase_id=PurchaseId(row["purchase_id"]),
        tid=row["tid"],
        token=row["token"],
        units=row["units"],
        created_at=_dt(row["created_at"]),
    )


def _meter(row: sqlite3.Row) -> MeterRecord:
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


def _tariff(row: sqlite3.Row) -> Tariff:
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


def _vend(row: sqlite3.Row) -> Vend:
    return Vend(
        purchase_id=PurchaseId(row["purchase_id"]),
        meter=MeterNumber(row["meter"]),
        tid=row["tid"],
        token=row["token"],
        units=row["units"],
        receipt=row["receipt"],
        created_at=_dt(row["created_at"]),
        key_change_tokens=tuple(row["key_change_tokens"].split()),
    )


def _key_change(row: sqlite3.Row, prefix: str = "") -> KeyChange:
    applied_at = row[prefix + "applied_at"]
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
        planned_at=_dt(row[prefix + "planned_at"]),
        applied_at=_dt(applied_at) if applied_at else None,
        purchase_id=PurchaseId(purchase_id) if purchase_id else None,
    )


def _outbox(row: sqlite3.Row) -> OutboxMessage:
    return OutboxMessage(
        message_id=row["message_id"],
        purchase_id=PurchaseId(row["purchase_id"]) if row["purchase_id"] else None,
        kind=MessageKind(row["kind"]),
        recipient=Msisdn(row["recipient"]) if row["recipient"] else None,
        body=row["body"],
        state=OutboxState(row["state"]),
        attempts=row["attempts"],
        next_try_at=_dt(row["next_try_at"]),
        provider_message_id=row["provider_message_id"],
        cost=row["cost"],
        last_error=row["last_error"],
        created_at=_dt(row["created_at"]),
        updated_at=_dt(row["updated_at"]),
    )


def _event(row: sqlite3.Row) -> Event:
    return Event(
        event_id=row["event_id"],
        purchase_id=PurchaseId(row["purchase_id"]) if row["purchase_id"] else None,
        kind=row["kind"],
        actor=row["actor"],
        data=json.loads(row["data"]),
        at=_dt(row["at"]),
    )


def _sealed(row: sqlite3.Row) -> SealedVendingKey:
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


#: One encoder for every event row (``json.dumps`` with options builds a new one per call).
_ENCODE_JSON: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode


def _json(data: Mapping[str, Any] | None) -> str:
    return _ENCODE_JSON(dict(data or {}))


_METER_COLUMNS: Final = (
    "drn", "customer_name", "area", "iin", "sgc", "tariff_index", "krn", "key_type", "ea",
    "dkga", "base_date", "ken", "last_tid", "tariff_id", "status",
)  # fmt: skip
_KEY_CHANGE_COLUMNS: Final = (
    "change_id", "meter", "from_sgc", "from_krn", "from_tariff_index", "from_base_date", "sgc",
    "krn", "tariff_index", "base_date", "state", "planned_at", "applied_at", "purchase_id",
)  # fmt: skip
_VEND_CONTEXT_SQL: Final = (
    "SELECT p.*, "  # noqa: S608 - built from our constant column names
    + ", ".join(f"m.{column} AS m_{column}" for column in _METER_COLUMNS)
    + ", "
    + ", ".join(f"kc.{column} AS kc_{column}" for column in _KEY_CHANGE_COLUMNS)
    + ", v.meter AS v_meter, v.tid AS v_tid, v.token AS v_token, v.units AS v_units,"
    " v.receipt AS v_receipt, v.created_at AS v_created_at,"
    " v.key_change_tokens AS v_key_change_tokens,"
    " pay.receipt AS pay_receipt, pref.language AS language"
    " FROM purchases p JOIN meters m ON m.drn = p.meter"
    " LEFT JOIN vends v ON v.purchase_id = p.purchase_id"
    " LEFT JOIN payments pay ON pay.provider = p.provider AND pay.reference = p.provider_reference"
    " LEFT JOIN customer_preferences pref ON pref.phone = p.phone"
    " LEFT JOIN key_changes kc ON kc.meter = p.meter AND kc.state = 'pending'"
    " WHERE p.purchase_id = ?"
)
_FINAL_OUTBOX: Final = (OutboxState.DELIVERED.value, OutboxState.FAILED.value)
_UNSENT: Final = (OutboxState.PENDING.value, OutboxState.SENDING.value)
_FINAL_DELIVERY: Final = tuple(state.value for state in DeliveryState if state.is_final)
#: States a proven payment leaves unchanged (VEND_FAILED is reached from PAID only: it is paid).
_PAID_OR_LATER: Final = frozenset(
    {PurchaseState.PAID, PurchaseState.VENDED, PurchaseState.DELIVERED, PurchaseState.VEND_FAILED}
)


# ------------------------------------------------------------------------------------ the ledger


class SqliteLedger:
    """The ``Ledger`` on one SQLite file. Build it with ``open_sqlite_ledger`` (or ``open_ledger``).

    Args:
        path: the database file (created if missing).
        clock: the time source for every timestamp (UTC, aware).
        max_batch: the most write operations committed together (1 = one commit per write).
        busy_timeout_ms: how long a write waits for another process's lock before it fails
            with ``LedgerUnavailable``.
        readers: reader connections (each with its own thread), used in turn.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Clock = _utc_now,
        max_batch: int = DEFAULT_MAX_BATCH,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        readers: int = DEFAULT_READERS,
    ) -> None:
        self.path = path
        self._clock = clock
        self._busy_timeout_ms = busy_timeout_ms
        self._writer = _Writer(path, max_batch=max_batch, busy_timeout_ms=busy_timeout_ms)
        self._reader_count = max(1, readers)
        self._readers: list[aiosqlite.Connection] = []
        self._next_reader = 0
        self._inline: sqlite3.Connection | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, *, migrate: bool = True) -> None:
        """Open the connections and (by default) apply pending migrations."""
        await self._writer.start()
        try:
            if migrate:
                applied = await self._writer.run_in_thread(_apply_migrations)
                if applied:
                    log.info("ledger_migrated", path=str(self.path), applied=applied)
            for _ in range(self._reader_count):
                reader = await aiosqlite.connect(self.path, isolation_level=None)
                self._readers.append(reader)
                reader.row_factory = sqlite3.Row
                await reader.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
                await reader.execute("PRAGMA query_only = ON")
            inline = sqlite3.connect(self.path, isolation_level=None)
            self._inline = inline
            inline.row_factory = sqlite3.Row
            inline.execute("PRAGMA busy_timeout = 0")
            inline.execute("PRAGMA query_only = ON")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Finish queued writes, then close the connections."""
        await self._writer.close()
        readers, self._readers = self._readers, []
        for reader in readers:
            await reader.close()
        inline, self._inline = self._inline, None
        if inline is not None:
            inline.close()

    @property
    def write_stats(self) -> tuple[int, int]:
        """(batches committed, operations written) since start: the group-commit factor."""
        return self._writer.batches, self._writer.operations

    async def _write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        return await self._writer.submit(op)

    async def _read(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        if not self._readers:
            raise LedgerError("ledger is closed")
        self._next_reader = (self._next_reader + 1) % len(self._readers)
        reader = self._readers[self._next_reader]
        try:
            rows = await reader.execute_fetchall(sql, params)
        except sqlite3.Error as exc:
            raise translate_error(exc) from exc
        return cast("list[sqlite3.Row]", list(rows))

    async def _read_one(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Row | None:
        rows = await self._read(sql, params)
        return rows[0] if rows else None

    async def _read_point(self, sql: str, params: Sequence[object]) -> sqlite3.Row | None:
        """One indexed row, read on the loop's own connection; the pool when it is busy."""
        rows = await self._read_inline(sql, params)
        return rows[0] if rows else None

    async def _read_inline(self, sql: str, params: Sequence[object]) -> list[sqlite3.Row]:
        """A few indexed rows, read on the loop's own connection; the pool when it is busy.

        Only for reads that touch a handful of rows through an index (the USSD and vend hot
        paths): anything that scans belongs on the pool, off the event loop.
        """
        inline = self._inline
        if inline is not None:
            try:
                rows = inline.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                primary = exc.sqlite_errorcode & 0xFF  # extended codes: BUSY_RECOVERY …
                if primary not in {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}:
                    raise translate_error(exc) from exc
            except sqlite3.Error as exc:
                raise translate_error(exc) from exc
            else:
                return cast("list[sqlite3.Row]", rows)
        return await self._read(sql, params)

    # -- shared write helpers (run in the writer thread) -----------------------------------------

    def _event(
        self,
        conn: sqlite3.Connection,
        purchase_id: str | None,
        kind: str,
        actor: str,
        data: Mapping[str, Any] | None,
    ) -> None:
        conn.execute(
            "INSERT INTO events (purchase_id, kind, actor, data, at) VALUES (?, ?, ?, ?, ?)",
            (purchase_id, kind, actor, _json(data), _ts(self._clock())),
        )

    @staticmethod
    def _purchase_row(conn: sqlite3.Connection, purchase_id: str) -> sqlite3.Row:
        row = conn.execute(
            "SELECT * FROM purchases WHERE purchase_id = ?", (purchase_id,)
        ).fetchone()
        if row is None:
            raise NotFound("purchase", purchase_id)
        return cast("sqlite3.Row", row)

    def _move(
        self,
        conn: sqlite3.Connection,
        row: sqlite3.Row,
        to: PurchaseState,
        kind: str,
        actor: str,
        data: Mapping[str, Any] | None,
    ) -> None:
        current = PurchaseState(row["state"])
        if not is_legal(current, to):
            raise IllegalTransition(row["purchase_id"], current, to)
        conn.execute(
            "UPDATE purchases SET state = ?, updated_at = ? WHERE purchase_id = ? AND state = ?",
            (to.value, _ts(self._clock()), row["purchase_id"], current.value),
        )
        self._event(
            conn, row["purchase_id"], kind, actor, {**(data or {}), "from": current, "to": to}
        )

    # -- reference data -------------------------------------------------------------------------

    async def put_tariff(self, tariff: Tariff) -> None:
        """Insert or replace a tariff."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO tariffs (tariff_id, name, currency, price_per_kwh_minor,"
                " vat_basis_points, fixed_charge_minor, min_purchase_minor, max_purchase_minor)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tariff_id) DO UPDATE SET"
                " name = excluded.name, currency = excluded.currency,"
                " price_per_kwh_minor = excluded.price_per_kwh_minor,"
                " vat_basis_points = excluded.vat_basis_points,"
                " fixed_charge_minor = excluded.fixed_charge_minor,"
                " min_purchase_minor = excluded.min_purchase_minor,"
                " max_purchase_minor = excluded.max_purchase_minor",
                (
                    tariff.tariff_id,
                    tariff.name,
                    tariff.currency,
                    tariff.price_per_kwh_minor,
                    tariff.vat_basis_points,
                    tariff.fixed_charge_minor,
                    tariff.min_purchase_minor,
                    tariff.max_purchase_minor,
                ),
            )

        await self._write(op)

    async def get_tariff(self, tariff_id: str) -> Tariff:
        """The tariff. Raises ``NotFound``."""
        row = await self._read_point("SELECT * FROM tariffs WHERE tariff_id = ?", (tariff_id,))
        if row is None:
            raise NotFound("tariff", tariff_id)
        return _tariff(row)

    async def put_meter(self, meter: MeterRecord) -> None:
        """Insert or update a meter's registration; its ``last_tid`` is kept when it exists."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO meters (drn, customer_name, area, iin, sgc, tariff_index, krn,"
                " key_type, ea, dkga, base_date, ken, last_tid, tariff_id, status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (drn) DO UPDATE SET customer_name = excluded.customer_name,"
                " area = excluded.area, iin = excluded.iin, sgc = excluded.sgc,"
                " tariff_index = excluded.tariff_index, krn = excluded.krn,"
                " key_type = excluded.key_type, ea = excluded.ea, dkga = excluded.dkga,"
                " base_date = excluded.base_date, ken = excluded.ken,"
                " tariff_id = excluded.tariff_id, status = excluded.status",
                (
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
                ),
            )

        await self._write(op)

    async def get_meter(self, drn: str) -> MeterRecord:
        """The meter with everything the token engine needs. Raises ``NotFound``."""
        row = await self._read_point("SELECT * FROM meters WHERE drn = ?", (drn,))
        if row is None:
            raise NotFound("meter", drn)
        return _meter(row)

    async def lookup_meter(self, drn: str) -> MeterInfo | None:
        """What a channel may show about a meter (masked name), or None if unknown."""
        row = await self._read_point("SELECT * FROM meters WHERE drn = ?", (drn,))
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

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO vending_keys (sgc, krn, key_type, ea, dkga, base_date, nonce,"
                " ciphertext, tag, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (sgc, krn) DO UPDATE SET key_type = excluded.key_type,"
                " ea = excluded.ea, dkga = excluded.dkga, base_date = excluded.base_date,"
                " nonce = excluded.nonce, ciphertext = excluded.ciphertext, tag = excluded.tag,"
                " created_at = excluded.created_at",
                (
                    key.sgc,
                    key.krn,
                    key.key_type,
                    key.ea,
                    key.dkga,
                    key.base_date,
                    key.nonce,
                    key.ciphertext,
                    key.tag,
                    _ts(self._clock()),
                ),
            )
            self._event(
                conn, None, "vending_key_stored", "operator", {"sgc": key.sgc, "krn": key.krn}
            )

        await self._write(op)

    async def vending_keys(self) -> list[SealedVendingKey]:
        """Every sealed vending key."""
        rows = await self._read("SELECT * FROM vending_keys ORDER BY sgc, krn")
        return [_sealed(row) for row in rows]

    # -- purchases ------------------------------------------------------------------------------

    async def open_purchase(self, draft: PurchaseDraft, *, actor: str) -> Purchase:
        """Open a purchase in CREATED; the same idempotency key returns the same purchase."""

        def op(conn: sqlite3.Connection) -> Purchase:
            row = conn.execute(
                "SELECT * FROM purchases WHERE idempotency_key = ?", (draft.idempotency_key,)
            ).fetchone()
            if row is not None:
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
            if (
                conn.execute("SELECT 1 FROM meters WHERE drn = ?", (draft.meter,)).fetchone()
                is None
            ):
                raise NotFound("meter", draft.meter)
            created = self._clock()
            now = _ts(created)
            orphan_check = _ts(
                draft.first_check_at or created + timedelta(seconds=ORPHAN_CHECK_AFTER_S)
            )
            conn.execute(
                "INSERT INTO purchases (purchase_id, channel, phone, meter, amount_minor, currency,"
                " units, tariff_id, state, idempotency_key, provider, created_at, updated_at,"
                " next_check_at, debt_recovery_minor)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
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
                    orphan_check,
                    draft.debt_recovery_minor,
                ),
            )
            self._event(
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
            return _purchase(self._purchase_row(conn, draft.purchase_id))

        return await self._write(op)

    async def get_purchase(self, purchase_id: str) -> Purchase:
        """The purchase. Raises ``NotFound``."""
        row = await self._read_point(
            "SELECT * FROM purchases WHERE purchase_id = ?", (purchase_id,)
        )
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
        clauses: list[str] = []
        params: list[object] = []
        if phone is not None:
            clauses.append("phone = ?")
            params.append(phone)
        if meter is not None:
            clauses.append("meter = ?")
            params.append(meter)
        if states:
            clauses.append(f"state IN ({', '.join('?' for _ in states)})")
            params.extend(state.value for state in states)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self._read(
            f"SELECT * FROM purchases {where} ORDER BY created_at DESC, purchase_id LIMIT ?",  # noqa: S608 - clauses are ours
            [*params, limit],
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

        def op(conn: sqlite3.Connection) -> Purchase:
            row = self._purchase_row(conn, purchase_id)
            if row["state"] != to.value:
                self._move(conn, row, to, kind, actor, data)
                row = self._purchase_row(conn, purchase_id)
            return _purchase(row)

        return await self._write(op)

    async def attach_payment(
        self, purchase_id: str, *, provider: str, reference: str, actor: str
    ) -> Purchase:
        """The provider accepted the collection: payment row, reference, AWAITING_PAYMENT."""

        def op(conn: sqlite3.Connection) -> Purchase:
            row = self._purchase_row(conn, purchase_id)
            payment = conn.execute(
                "SELECT purchase_id FROM payments WHERE provider = ? AND reference = ?",
                (provider, reference),
            ).fetchone()
            now = _ts(self._clock())
            if payment is None:
                conn.execute(
                    "INSERT INTO payments (purchase_id, provider, reference, amount_minor,"
                    " currency, state, payer, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        purchase_id,
                        provider,
                        reference,
                        row["amount_minor"],
                        row["currency"],
                        PaymentRecordState.PENDING.value,
                        row["phone"],
                        now,
                        now,
                    ),
                )
            elif payment["purchase_id"] is None:
                conn.execute(
                    "UPDATE payments SET purchase_id = ?, updated_at = ?"
                    " WHERE provider = ? AND reference = ?",
                    (purchase_id, now, provider, reference),
                )
            elif payment["purchase_id"] != purchase_id:
                raise DuplicateError(
                    f"{provider} reference {reference} belongs to purchase"
                    f" {payment['purchase_id']}, not {purchase_id}",
                    constraint="payments.provider_reference",
                    key=f"{provider}:{reference}",
                )
            if row["provider_reference"] is None:
                conn.execute(
                    "UPDATE purchases SET provider_reference = ?, provider = ?, updated_at = ?"
                    " WHERE purchase_id = ?",
                    (reference, provider, now, purchase_id),
                )
            if row["state"] == PurchaseState.CREATED.value:
                self._move(
                    conn,
                    row,
                    PurchaseState.AWAITING_PAYMENT,
                    "payment_requested",
                    actor,
                    {"provider": provider, "reference": reference},
                )
            return _purchase(self._purchase_row(conn, purchase_id))

        return await self._write(op)

    async def record_notice(self, notice: NoticeRecord, *, actor: str) -> NoticeOutcome:
        """Keep a callback's claim and say which purchase it concerns."""

        def op(conn: sqlite3.Connection) -> NoticeOutcome:
            row = conn.execute(
                "SELECT purchase_id, payload_hash FROM payments"
                " WHERE provider = ? AND reference = ?",
                (notice.provider, notice.reference),
            ).fetchone()
            now = _ts(self._clock())
            duplicate = False
            conflict = False
            purchase_id: str | None = None
            if row is None:
                conn.execute(
                    "INSERT INTO payments (provider, reference, amount_minor, currency, state,"
                    " payer, receipt, payload, payload_hash, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
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
                    ),
                )
            else:
                purchase_id = row["purchase_id"]
                if row["payload_hash"] is None:
                    # The callback's receipt is kept: a status answer may carry none (Daraja STK).
                    conn.execute(
                        "UPDATE payments SET payload = ?, payload_hash = ?, updated_at = ?,"
                        " receipt = COALESCE(receipt, ?) WHERE provider = ? AND reference = ?",
                        (
                            notice.raw,
                            notice.payload_hash,
                            now,
                            notice.receipt,
                            notice.provider,
                            notice.reference,
                        ),
                    )
                else:
                    duplicate = True
                    conflict = row["payload_hash"] != notice.payload_hash
            self._event(
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

        return await self._write(op)

    async def get_payment(self, provider: str, reference: str) -> PaymentRecord | None:
        """The payment row for (provider, reference), if any."""
        row = await self._read_one(
            "SELECT * FROM payments WHERE provider = ? AND reference = ?", (provider, reference)
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
            created_at=_dt(row["created_at"]),
            updated_at=_dt(row["updated_at"]),
        )

    def _settle_payment_row(
        self,
        conn: sqlite3.Connection,
        purchase_id: str,
        payment: ConfirmedPayment,
        state: PaymentRecordState,
    ) -> None:
        # The row's receipt becomes the one the provider's records proved (None: none), never a
        # callback's claim kept from ``record_notice``: a claim takes no receipt unproven.
        now = _ts(self._clock())
        values = (
            payment.amount.amount_minor,
            payment.amount.currency,
            state.value,
            payment.payer,
            payment.receipt,
            now,
        )
        try:
            updated = conn.execute(
                "UPDATE payments SET amount_minor = ?, currency = ?, state = ?, payer = ?,"
                " receipt = ?, updated_at = ?, purchase_id = ?"
                " WHERE provider = ? AND reference = ?"
                " AND (purchase_id IS NULL OR purchase_id = ?)",
                (*values, purchase_id, payment.provider, payment.reference, purchase_id),
            )
        except sqlite3.IntegrityError as exc:
            raise self._receipt_reused(exc, payment) from exc
        if updated.rowcount == 1:
            return
        row = conn.execute(
            "SELECT purchase_id FROM payments WHERE provider = ? AND reference = ?",
            (payment.provider, payment.reference),
        ).fetchone()
        if row is not None:
            raise DuplicateError(
                f"{payment.provider} reference {payment.reference} belongs to purchase"
                f" {row['purchase_id']}, not {purchase_id}",
                constraint="payments.provider_reference",
                key=f"{payment.provider}:{payment.reference}",
            )
        try:
            conn.execute(
                "INSERT INTO payments (amount_minor, currency, state, payer, receipt, updated_at,"
                " purchase_id, provider, reference, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*values, purchase_id, payment.provider, payment.reference, now),
            )
        except sqlite3.IntegrityError as exc:
            raise self._receipt_reused(exc, payment) from exc

    @staticmethod
    def _receipt_reused(exc: sqlite3.IntegrityError, payment: ConfirmedPayment) -> BaseException:
        """``ReceiptReused`` when the receipt index refused the row, else the error as ours."""
        if "payments.receipt" in str(exc) and payment.receipt is not None:
            return ReceiptReused(payment.provider, payment.receipt)
        return translate_error(exc)

    def _record_payment(
        self, conn: sqlite3.Connection, row: sqlite3.Row, payment: ConfirmedPayment, actor: str
    ) -> None:
        """The payment row and the ``payment_confirmed`` event; the caller moves the state."""
        current = PurchaseState(row["state"])
        if not is_legal(current, PurchaseState.PAID):
            raise IllegalTransition(row["purchase_id"], current, PurchaseState.PAID)
        self._settle_payment_row(conn, row["purchase_id"], payment, PaymentRecordState.SUCCEEDED)
        if row["provider_reference"] is None:
            conn.execute(
                "UPDATE purchases SET provider_reference = ? WHERE purchase_id = ?",
                (payment.reference, row["purchase_id"]),
            )
        self._event(
            conn,
            row["purchase_id"],
            "payment_confirmed",
            actor,
            {
                "provider": payment.provider,
                "reference": payment.reference,
                "receipt": payment.receipt,
                "amount_minor": payment.amount.amount_minor,
                "currency": payment.amount.currency,
                "late": current in {PurchaseState.EXPIRED, PurchaseState.PAYMENT_FAILED},
                "from": current,
                "to": PurchaseState.PAID,
            },
        )

    async def mark_paid(
        self, purchase_id: str, payment: ConfirmedPayment, *, actor: str
    ) -> Purchase:
        """A proven payment: payment row SUCCEEDED and the purchase PAID, one transaction."""

        def op(conn: sqlite3.Connection) -> Purchase:
            row = self._purchase_row(conn, purchase_id)
            if PurchaseState(row["state"]) in _PAID_OR_LATER:
                return _purchase(row)
            self._record_payment(conn, row, payment, actor)
            conn.execute(
                "UPDATE purchases SET state = ?, updated_at = ? WHERE purchase_id = ?",
                (PurchaseState.PAID.value, _ts(self._clock()), purchase_id),
            )
            return _purchase(self._purchase_row(conn, purchase_id))

        return await self._write(op)

    async def mark_payment_mismatch(
        self, purchase_id: str, payment: ConfirmedPayment, *, expected: Money, actor: str
    ) -> Purchase:
        """A proven payment of the wrong amount/currency/payer: REFUND_PENDING; never vends."""

        def op(conn: sqlite3.Connection) -> Purchase:
            row = self._purchase_row(conn, purchase_id)
            self._settle_payment_row(conn, purchase_id, payment, PaymentRecordState.MISMATCHED)
            data = {
                "provider": payment.provider,
                "reference": payment.reference,
                "paid_minor": payment.amount.amount_minor,
                "paid_currency": payment.amount.currency,
                "expected_minor": expected.amount_minor,
                "expected_currency": expected.currency,
                "payer": payment.payer,
            }
            self._event(conn, purchase_id, "amount_mismatch", actor, data)
            current = PurchaseState(row["state"])
            if current is not PurchaseState.REFUND_PENDING and is_legal(
                current, PurchaseState.REFUND_PENDING
            ):
                self._move(conn, row, PurchaseState.REFUND_PENDING, "refund_needed", actor, data)
            return _purchase(self._purchase_row(conn, purchase_id))

        return await self._write(op)

    async def prove_receipt(self, provider: str, reference: str, receipt: str) -> None:
        """Record the receipt the provider's records prove for a payment row."""

        def op(conn: sqlite3.Connection) -> None:
            try:
                updated = conn.execute(
                    "UPDATE payments SET receipt = ?, updated_at = ?"
                    " WHERE provider = ? AND reference = ?",
                    (receipt, _ts(self._clock()), provider, reference),
                )
            except sqlite3.IntegrityError as exc:
                if "payments.receipt" in str(exc):
                    raise ReceiptReused(provider, receipt) from exc
                raise
            if updated.rowcount != 1:
                raise NotFound("payment", f"{provider}:{reference}")

        await self._write(op)

    async def record_status_query(
        self, *, provider: str, conversation_id: str, originator_id: str, transaction_id: str
    ) -> None:
        """Keep a status query the provider acknowledged. Idempotent."""

        def op(conn: sqlite3.Connection) -> None:
            now = self._clock()
            conn.execute(
                "DELETE FROM status_queries WHERE asked_at < ?",
                (_ts(now - timedelta(seconds=STATUS_QUERY_KEEP_S)),),
            )
            conn.execute(
                "INSERT INTO status_queries (conversation_id, originator_id, provider,"
                " transaction_id, asked_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (conversation_id) DO NOTHING",
                (conversation_id, originator_id, provider, transaction_id, _ts(now)),
            )

        await self._write(op)

    async def answer_status_query(
        self,
        *,
        provider: str,
        conversation_id: str,
        originator_id: str,
        transaction_id: str,
        result: bytes,
    ) -> str:
        """Store a result for the unanswered query it names, once."""

        def op(conn: sqlite3.Connection) -> str:
            row = conn.execute(
                "SELECT originator_id, provider, transaction_id, answered_at FROM status_queries"
                " WHERE conversation_id = ?",
                (conversation_id,),
            ).fetchone()
            if (
                row is None
                or row["provider"] != provider
                or row["originator_id"] != originator_id
                or row["answered_at"] is not None
            ):
                return STATUS_UNMATCHED
            if row["transaction_id"] != transaction_id:
                return STATUS_CONTRADICTED
            conn.execute(
                "UPDATE status_queries SET result = ?, answered_at = ? WHERE conversation_id = ?",
                (result, _ts(self._clock()), conversation_id),
            )
            return STATUS_ACCEPTED

        return await self._write(op)

    async def status_query_result(self, conversation_id: str) -> bytes | None:
        """The stored result of a query, None while it has none."""
        row = await self._read_one(
            "SELECT result FROM status_queries WHERE conversation_id = ?", (conversation_id,)
        )
        return None if row is None or row["result"] is None else bytes(row["result"])

    async def schedule_check(self, purchase_id: str, *, at: datetime, attempts: int) -> None:
        """When the sweeper should next ask the provider about this purchase."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE purchases SET next_check_at = ?, check_attempts = ? WHERE purchase_id = ?",
                (_ts(at), attempts, purchase_id),
            )

        await self._write(op)

    async def due_for_check(self, now: datetime, *, limit: int = 100) -> list[Purchase]:
        """CREATED or AWAITING_PAYMENT purchases whose next status check is due."""
        rows = await self._read(
            "SELECT * FROM purchases WHERE state IN (?, ?) AND next_check_at IS NOT NULL"
            " AND next_check_at <= ? ORDER BY next_check_at LIMIT ?",
            (PurchaseState.CREATED.value, PurchaseState.AWAITING_PAYMENT.value, _ts(now), limit),
        )
        return [_purchase(row) for row in rows]

    async def paid_not_vended(self, *, limit: int = 100) -> list[Purchase]:
        """PAID purchases without a vend, oldest first."""
        rows = await self._read(
            "SELECT p.* FROM purchases p LEFT JOIN vends v ON v.purchase_id = p.purchase_id"
            " WHERE p.state = ? AND v.vend_id IS NULL ORDER BY p.updated_at LIMIT ?",
            (PurchaseState.PAID.value, limit),
        )
        return [_purchase(row) for row in rows]

    # -- vends ----------------------------------------------------------------------------------

    async def vend_context(self, purchase_id: str) -> VendContext:
        """The purchase, its meter, vend, receipt and language in one read."""
        row = await self._read_point(_VEND_CONTEXT_SQL, (purchase_id,))
        if row is None:
            raise NotFound("purchase", purchase_id)
        meter = MeterRecord(
            drn=MeterNumber(row["m_drn"]),
            customer_name=row["m_customer_name"],
            area=row["m_area"],
            iin=row["m_iin"],
            sgc=row["m_sgc"],
            tariff_index=row["m_tariff_index"],
            krn=row["m_krn"],
            key_type=row["m_key_type"],
            ea=row["m_ea"],
            dkga=row["m_dkga"],
            base_date=row["m_base_date"],
            ken=row["m_ken"],
            last_tid=row["m_last_tid"],
            tariff_id=row["m_tariff_id"],
            status=MeterStatus(row["m_status"]),
        )
        vend = None
        if row["v_tid"] is not None:
            vend = Vend(
                purchase_id=PurchaseId(row["purchase_id"]),
                meter=MeterNumber(row["v_meter"]),
                tid=row["v_tid"],
                token=row["v_token"],
                units=row["v_units"],
                receipt=row["v_receipt"],
                created_at=_dt(row["v_created_at"]),
                key_change_tokens=tuple(row["v_key_change_tokens"].split()),
            )
        return VendContext(
            purchase=_purchase(row),
            meter=meter,
            vend=vend,
            receipt=row["pay_receipt"],
            language=row["language"],
            key_change=_key_change(row, "kc_") if row["kc_change_id"] is not None else None,
        )

    async def record_vend(
        self, draft: VendDraft, *, actor: str, payment: ConfirmedPayment | None = None
    ) -> VendOutcome:
        """Store a vend (with its payment, if given) in one transaction.

        The common path is ten statements: the purchase with its vend check, the payment row and
        its event, the meter's TID compare-and-set, the vend, one state update to VENDED (the
        PAID step, when the payment comes along, is recorded by its event), its event and the
        message.
        """

        def op(conn: sqlite3.Connection) -> VendOutcome:
            row = conn.execute(
                "SELECT p.*, v.vend_id FROM purchases p"
                " LEFT JOIN vends v ON v.purchase_id = p.purchase_id WHERE p.purchase_id = ?",
                (draft.purchase_id,),
            ).fetchone()
            if row is None:
                raise NotFound("purchase", draft.purchase_id)
            if row["vend_id"] is not None:
                existing = conn.execute(
                    "SELECT * FROM vends WHERE vend_id = ?", (row["vend_id"],)
                ).fetchone()
                return VendOutcome(vend=_vend(existing), replayed=True, purchase=_purchase(row))
            current = PurchaseState(row["state"])
            if payment is not None and current not in _PAID_OR_LATER:
                self._record_payment(conn, row, payment, actor)
                current = PurchaseState.PAID
            if not is_legal(current, PurchaseState.VENDED):
                raise IllegalTransition(draft.purchase_id, current, PurchaseState.VENDED)
            expected = draft.expected_last_tid
            now = _ts(self._clock())
            if draft.key_change_id is not None:
                self._apply_key_change(conn, draft, now)
            else:
                if expected is not None and draft.tid <= expected:
                    raise TidConflict(draft.meter, expected, expected)
                moved = conn.execute(
                    "UPDATE meters SET last_tid = ? WHERE drn = ? AND last_tid IS ?",
                    (draft.fbe.tid if draft.fbe else draft.tid, draft.meter, expected),
                )
                if moved.rowcount != 1:
                    self._tid_conflict(conn, draft)
            conn.execute(
                # The TID counts from the meter's base date (the new one after a key change,
                # applied above): one TID per (meter, base date, TID), schema 0004.
                "INSERT INTO vends (purchase_id, meter, tid, token, units, receipt, created_at,"
                " key_change_tokens, base_date) VALUES (?, ?, ?, ?, ?, ?, ?, ?,"
                " (SELECT base_date FROM meters WHERE drn = ?))",
                (
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
            )
            conn.execute(
                "UPDATE purchases SET state = ?, updated_at = ? WHERE purchase_id = ?",
                (PurchaseState.VENDED.value, now, draft.purchase_id),
            )
            self._event(
                conn,
                draft.purchase_id,
                "token_vended",
                actor,
                {
                    "meter": draft.meter,
                    "tid": draft.tid,
                    "units": draft.units,
                    "token_last4": draft.token[-4:],
                    "from": current,
                    "to": PurchaseState.VENDED,
                },
            )
            conn.execute(
                "INSERT INTO outbox (purchase_id, kind, recipient, body, state, next_try_at,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    draft.purchase_id,
                    MessageKind.TOKEN.value,
                    draft.recipient,
                    draft.message,
                    (OutboxState.PENDING if draft.recipient else OutboxState.HELD).value,
                    now,
                    now,
                    now,
                ),
            )
            self._vend_extras(conn, draft, row["currency"], actor, now)
            created = _dt(now)
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
                _purchase(row),
                state=PurchaseState.VENDED,
                updated_at=created,
                provider_reference=row["provider_reference"]
                or (payment.reference if payment else None),
            )
            return VendOutcome(vend=vend, replayed=False, purchase=purchase)

        return await self._write(op)

    def _vend_extras(
        self, conn: sqlite3.Connection, draft: VendDraft, currency: str, actor: str, now: str
    ) -> None:
        """The vend's debt recovery and FBE token, when it carries them."""
        if draft.debt_recovery_minor:
            self._recover_debt(conn, draft, currency, actor, now)
        if draft.fbe is not None:
            self._issue_fbe(conn, draft, draft.fbe, actor, now)

    def _recover_debt(
        self, conn: sqlite3.Connection, draft: VendDraft, currency: str, actor: str, now: str
    ) -> None:
        """Take the draft's recovery off the meter's debt (compare-and-set), with its row."""
        recovered, expected = draft.debt_recovery_minor, draft.expected_debt_balance_minor
        if expected is None or not 0 < recovered <= expected:
            raise ValueError(f"cannot recover {recovered} of a debt of {expected}")
        moved = conn.execute(
            "UPDATE meter_debts SET balance_minor = balance_minor - ?,"
            " recovered_total_minor = recovered_total_minor + ?, updated_at = ?"
            " WHERE meter = ? AND balance_minor = ? AND currency = ?",
            (recovered, recovered, now, draft.meter, expected, currency),
        )
        if moved.rowcount != 1:
            raise VendConflict(draft.meter, "the debt balance")
        conn.execute(
            "INSERT INTO debt_recoveries (purchase_id, meter, amount_minor, currency,"
            " balance_after_minor, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (draft.purchase_id, draft.meter, recovered, currency, expected - recovered, now),
        )
        self._event(
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

    def _issue_fbe(
        self, conn: sqlite3.Connection, draft: VendDraft, fbe: FbeDraft, actor: str, now: str
    ) -> None:
        """Store the month's FBE token and queue its message; the month's second is refused."""
        if fbe.tid <= draft.tid or draft.key_change_id is not None:
            raise ValueError("an FBE token follows the credit token's TID, never with a key change")
        try:
            conn.execute(
                "INSERT INTO fbe_issues (meter, month, purchase_id, tid, token, units, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (draft.meter, fbe.month, draft.purchase_id, fbe.tid, fbe.token, fbe.units, now),
            )
        except sqlite3.IntegrityError as exc:
            raise VendConflict(draft.meter, f"free basic electricity for {fbe.month}") from exc
        conn.execute(
            "INSERT INTO outbox (purchase_id, kind, recipient, body, state, next_try_at,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                draft.purchase_id,
                MessageKind.FBE.value,
                draft.recipient,
                fbe.message,
                (OutboxState.PENDING if draft.recipient else OutboxState.HELD).value,
                now,
                now,
                now,
            ),
        )
        self._event(
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
        row = await self._read_point("SELECT * FROM meter_debts WHERE meter = ?", (meter,))
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

        def op(conn: sqlite3.Connection) -> MeterDebt:
            if conn.execute("SELECT 1 FROM meters WHERE drn = ?", (meter,)).fetchone() is None:
                raise NotFound("meter", meter)
            old = conn.execute("SELECT * FROM meter_debts WHERE meter = ?", (meter,)).fetchone()
            before = _meter_debt(old) if old is not None else None
            now = _ts(self._clock())
            conn.execute(
                "INSERT INTO meter_debts (meter, currency, balance_minor, rate_basis_points,"
                " min_per_purchase_minor, cap_per_purchase_minor, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (meter) DO UPDATE SET"
                " currency = excluded.currency, balance_minor = excluded.balance_minor,"
                " rate_basis_points = excluded.rate_basis_points,"
                " min_per_purchase_minor = excluded.min_per_purchase_minor,"
                " cap_per_purchase_minor = excluded.cap_per_purchase_minor,"
                " updated_at = excluded.updated_at",
                (
                    meter,
                    balance.currency,
                    balance.amount_minor,
                    rate_basis_points,
                    min_per_purchase_minor,
                    cap_per_purchase_minor,
                    now,
                ),
            )
            row = conn.execute("SELECT * FROM meter_debts WHERE meter = ?", (meter,)).fetchone()
            debt = _meter_debt(row)
            self._event(conn, None, "debt_set", actor, debt_event_data(debt, before, reason))
            return debt

        return await self._write(op)

    async def clear_debt(self, meter: str, *, actor: str, reason: str = "") -> MeterDebt:
        """Write the meter's debt off (balance 0, terms kept); appends ``debt_cleared``."""

        def op(conn: sqlite3.Connection) -> MeterDebt:
            old = conn.execute("SELECT * FROM meter_debts WHERE meter = ?", (meter,)).fetchone()
            if old is None:
                raise NotFound("debt", meter)
            before = _meter_debt(old)
            conn.execute(
                "UPDATE meter_debts SET balance_minor = 0, updated_at = ? WHERE meter = ?",
                (_ts(self._clock()), meter),
            )
            row = conn.execute("SELECT * FROM meter_debts WHERE meter = ?", (meter,)).fetchone()
            debt = _meter_debt(row)
            self._event(conn, None, "debt_cleared", actor, debt_event_data(debt, before, reason))
            return debt

        return await self._write(op)

    async def debt_recoveries(self, meter: str, *, limit: int = 50) -> list[DebtRecovery]:
        """What the meter's vends recovered, newest first."""
        rows = await self._read(
            "SELECT * FROM debt_recoveries WHERE meter = ?"
            " ORDER BY created_at DESC, purchase_id DESC LIMIT ?",
            (meter, limit),
        )
        return [_debt_recovery(row) for row in rows]

    async def get_debt_recovery(self, purchase_id: str) -> DebtRecovery | None:
        """What the purchase's vend recovered, if anything."""
        row = await self._read_point(
            "SELECT * FROM debt_recoveries WHERE purchase_id = ?", (purchase_id,)
        )
        return _debt_recovery(row) if row is not None else None

    async def set_fbe_allowance(self, tariff_id: str, units_per_month: int, *, actor: str) -> None:
        """The tariff's monthly free basic electricity in tenths of a kWh (0 stops it)."""
        if units_per_month < 0:
            raise ValueError(f"FBE units cannot be negative, got {units_per_month}")

        def op(conn: sqlite3.Connection) -> None:
            if (
                conn.execute("SELECT 1 FROM tariffs WHERE tariff_id = ?", (tariff_id,)).fetchone()
                is None
            ):
                raise NotFound("tariff", tariff_id)
            old = conn.execute(
                "SELECT units_per_month FROM fbe_allowances WHERE tariff_id = ?", (tariff_id,)
            ).fetchone()
            if units_per_month == 0:
                conn.execute("DELETE FROM fbe_allowances WHERE tariff_id = ?", (tariff_id,))
            else:
                conn.execute(
                    "INSERT INTO fbe_allowances (tariff_id, units_per_month, updated_at)"
                    " VALUES (?, ?, ?) ON CONFLICT (tariff_id) DO UPDATE SET"
                    " units_per_month = excluded.units_per_month,"
                    " updated_at = excluded.updated_at",
                    (tariff_id, units_per_month, _ts(self._clock())),
                )
            self._event(
                conn,
                None,
                "fbe_allowance_set",
                actor,
                {
                    "tariff_id": tariff_id,
                    "units_per_month": units_per_month,
                    "previous_units_per_month": old[0] if old is not None else 0,
                },
            )

        await self._write(op)

    async def fbe_allowance(self, tariff_id: str) -> int:
        """The tariff's monthly FBE units (0: none)."""
        row = await self._read_point(
            "SELECT units_per_month FROM fbe_allowances WHERE tariff_id = ?", (tariff_id,)
        )
        return int(row[0]) if row is not None else 0

    async def fbe_due(self, meter: str, month: str) -> int:
        """The FBE units the meter may still get in ``month``: 0 if issued already, or none."""
        row = await self._read_point(
            "SELECT a.units_per_month FROM meters m"
            " JOIN fbe_allowances a ON a.tariff_id = m.tariff_id"
            " LEFT JOIN fbe_issues f ON f.meter = m.drn AND f.month = ?"
            " WHERE m.drn = ? AND f.issue_id IS NULL",
            (month, meter),
        )
        return int(row[0]) if row is not None else 0

    async def fbe_issues(self, meter: str, *, limit: int = 24) -> list[FbeIssue]:
        """The meter's FBE tokens, newest first."""
        rows = await self._read(
            "SELECT * FROM fbe_issues WHERE meter = ? ORDER BY month DESC LIMIT ?", (meter, limit)
        )
        return [_fbe_issue(row) for row in rows]

    @staticmethod
    def _tid_conflict(conn: sqlite3.Connection, draft: VendDraft) -> NoReturn:
        meter = conn.execute("SELECT last_tid FROM meters WHERE drn = ?", (draft.meter,)).fetchone()
        if meter is None:
            raise NotFound("meter", draft.meter)
        raise TidConflict(draft.meter, draft.expected_last_tid, meter["last_tid"])

    def _apply_key_change(self, conn: sqlite3.Connection, draft: VendDraft, now: str) -> None:
        """The meter takes the pending change's key; ``last_tid`` restarts on a rollover."""
        row = conn.execute(
            "SELECT * FROM key_changes WHERE change_id = ? AND meter = ? AND state = ?",
            (draft.key_change_id, draft.meter, KeyChangeState.PENDING.value),
        ).fetchone()
        if row is None:  # applied or superseded meanwhile: read again
            self._tid_conflict(conn, draft)
        change = _key_change(row)
        expected = draft.expected_last_tid
        if not change.rollover and expected is not None and draft.tid <= expected:
            raise TidConflict(draft.meter, expected, expected)
        moved = conn.execute(
            "UPDATE meters SET last_tid = ?, sgc = ?, krn = ?, tariff_index = ?, base_date = ?"
            " WHERE drn = ? AND last_tid IS ? AND sgc = ? AND krn = ? AND base_date = ?",
            (
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
            ),
        )
        if moved.rowcount != 1:
            self._tid_conflict(conn, draft)
        conn.execute(
            "UPDATE key_changes SET state = ?, applied_at = ?, purchase_id = ? WHERE change_id = ?",
            (KeyChangeState.APPLIED.value, now, draft.purchase_id, change.change_id),
        )
        self._event(
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

    async def get_vend(self, purchase_id: str) -> Vend | None:
        """The purchase's vend, if it has one."""
        row = await self._read_one("SELECT * FROM vends WHERE purchase_id = ?", (purchase_id,))
        return _vend(row) if row is not None else None

    async def last_vend(self, phone: str, meter: str | None = None) -> Vend | None:
        """The newest vend bought from ``phone`` (for ``meter`` if given)."""
        sql = (
            "SELECT v.* FROM vends v JOIN purchases p ON p.purchase_id = v.purchase_id"
            " WHERE p.phone = ?"
        )
        params: list[object] = [phone]
        if meter is not None:
            sql += " AND v.meter = ?"
            params.append(meter)
        row = await self._read_one(
            sql + " ORDER BY v.created_at DESC, v.vend_id DESC LIMIT 1", params
        )
        return _vend(row) if row is not None else None

    # -- key changes ----------------------------------------------------------------------------

    async def meters_on_key(
        self, sgc: str, krn: int, *, meters: Sequence[str] | None = None
    ) -> list[MeterRecord]:
        """The meters whose key is (``sgc``, ``krn``), among ``meters`` if given, by DRN."""
        rows = await self._read(
            "SELECT * FROM meters WHERE sgc = ? AND krn = ? ORDER BY drn", (sgc, krn)
        )
        wanted = set(meters) if meters is not None else None
        return [_meter(row) for row in rows if wanted is None or row["drn"] in wanted]

    async def plan_key_rotation(
        self, rotation: KeyRotation, *, meters: Sequence[str] | None = None, actor: str
    ) -> list[KeyChange]:
        """Plan a pending key change for each meter on the old key; supersede earlier plans."""
        wanted = set(meters) if meters is not None else None

        def op(conn: sqlite3.Connection) -> list[KeyChange]:
            now = _ts(self._clock())
            rows = conn.execute(
                "SELECT drn, sgc, krn, tariff_index, base_date FROM meters"
                " WHERE sgc = ? AND krn = ? ORDER BY drn",
                (rotation.sgc, rotation.from_krn),
            ).fetchall()
            planned: list[KeyChange] = []
            for row in rows:
                if wanted is not None and row["drn"] not in wanted:
                    continue
                conn.execute(
                    "UPDATE key_changes SET state = ? WHERE meter = ? AND state = ?",
                    (KeyChangeState.SUPERSEDED.value, row["drn"], KeyChangeState.PENDING.value),
                )
                cursor = conn.execute(
                    "INSERT INTO key_changes (meter, from_sgc, from_krn, from_tariff_index,"
                    " from_base_date, sgc, krn, tariff_index, base_date, state, planned_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
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
                    ),
                )
                planned.append(
                    _key_change(
                        conn.execute(
                            "SELECT * FROM key_changes WHERE change_id = ?", (cursor.lastrowid,)
                        ).fetchone()
                    )
                )
                for stuck in conn.execute(
                    "SELECT * FROM purchases WHERE meter = ? AND state = ?",
                    (row["drn"], PurchaseState.VEND_FAILED.value),
                ).fetchall():
                    self._move(
                        conn,
                        stuck,
                        PurchaseState.PAID,
                        "vend_retry_queued",
                        actor,
                        {"reason": "key change planned", "change_id": cursor.lastrowid},
                    )
            self._event(
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
                    "meters": len(planned),
                },
            )
            return planned

        return await self._write(op)

    async def key_changes(self, meter: str) -> list[KeyChange]:
        """The meter's key changes, oldest first."""
        rows = await self._read(
            "SELECT * FROM key_changes WHERE meter = ? ORDER BY change_id", (meter,)
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

        def op(conn: sqlite3.Connection) -> OutboxMessage:
            now = _ts(self._clock())
            cursor = conn.execute(
                "INSERT INTO outbox (purchase_id, kind, recipient, body, state, next_try_at,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    purchase_id,
                    kind.value,
                    recipient,
                    body,
                    (OutboxState.PENDING if recipient else OutboxState.HELD).value,
                    now,
                    now,
                    now,
                ),
            )
            self._event(conn, purchase_id, f"{kind.value}_queued", actor, {"recipient": recipient})
            row = conn.execute(
                "SELECT * FROM outbox WHERE message_id = ?", (cursor.lastrowid,)
            ).fetchone()
            return _outbox(row)

        return await self._write(op)

    async def claim_outbox(
        self, now: datetime, *, lease_until: datetime, limit: int = 50
    ) -> list[OutboxMessage]:
        """Claim due messages until ``lease_until`` (expired leases come back)."""

        def op(conn: sqlite3.Connection) -> list[OutboxMessage]:
            rows = conn.execute(
                "SELECT message_id FROM outbox WHERE state IN (?, ?) AND next_try_at <= ?"
                " ORDER BY next_try_at, message_id LIMIT ?",
                (OutboxState.PENDING.value, OutboxState.SENDING.value, _ts(now), limit),
            ).fetchall()
            claimed: list[OutboxMessage] = []
            for row in rows:
                conn.execute(
                    "UPDATE outbox SET state = ?, next_try_at = ?, attempts = attempts + 1,"
                    " updated_at = ? WHERE message_id = ?",
                    (OutboxState.SENDING.value, _ts(lease_until), _ts(now), row["message_id"]),
                )
                claimed.append(
                    _outbox(
                        conn.execute(
                            "SELECT * FROM outbox WHERE message_id = ?", (row["message_id"],)
                        ).fetchone()
                    )
                )
            return claimed

        return await self._write(op)

    async def outbox_sent(
        self,
        message_id: int,
        *,
        provider_message_id: str,
        cost: str | None,
        state: DeliveryState,
    ) -> None:
        """The provider took the message."""

        def op(conn: sqlite3.Connection) -> None:
            new_state = (
                OutboxState.DELIVERED if state is DeliveryState.DELIVERED else OutboxState.SENT
            )
            conn.execute(
                "UPDATE outbox SET state = ?, provider_message_id = ?, cost = ?, last_error = NULL,"
                " updated_at = ? WHERE message_id = ? AND state NOT IN (?, ?)",
                (
                    new_state.value,
                    provider_message_id,
                    cost,
                    _ts(self._clock()),
                    message_id,
                    *_FINAL_OUTBOX,
                ),
            )
            row = conn.execute(
                "SELECT purchase_id FROM outbox WHERE message_id = ?", (message_id,)
            ).fetchone()
            self._event(
                conn,
                row["purchase_id"] if row else None,
                "sms_sent",
                "outbox",
                {
                    "message_id": message_id,
                    "provider_message_id": provider_message_id,
                    "cost": cost,
                },
            )
            early = conn.execute(
                "DELETE FROM early_delivery_reports WHERE provider_message_id = ?"
                " RETURNING state, failure_reason",
                (provider_message_id,),
            ).fetchone()
            if early is not None:
                message = conn.execute(
                    "SELECT * FROM outbox WHERE message_id = ?", (message_id,)
                ).fetchone()
                self._apply_report(
                    conn, message, DeliveryState(early["state"]), early["failure_reason"]
                )

        await self._write(op)

    async def outbox_retry(self, message_id: int, *, next_try_at: datetime, error: str) -> None:
        """Sending failed for now; try again at ``next_try_at``."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE outbox SET state = ?, next_try_at = ?, last_error = ?, updated_at = ?"
                " WHERE message_id = ? AND state NOT IN (?, ?)",
                (
                    OutboxState.PENDING.value,
                    _ts(next_try_at),
                    error,
                    _ts(self._clock()),
                    message_id,
                    *_FINAL_OUTBOX,
                ),
            )

        await self._write(op)

    async def outbox_failed(self, message_id: int, *, error: str) -> None:
        """Sending failed for good; an operator must look."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE outbox SET state = ?, last_error = ?, updated_at = ? WHERE message_id = ?",
                (OutboxState.FAILED.value, error, _ts(self._clock()), message_id),
            )
            row = conn.execute(
                "SELECT purchase_id FROM outbox WHERE message_id = ?", (message_id,)
            ).fetchone()
            self._event(
                conn,
                row["purchase_id"] if row else None,
                "sms_failed",
                "outbox",
                {"message_id": message_id, "error": error},
            )

        await self._write(op)

    def _apply_report(
        self,
        conn: sqlite3.Connection,
        row: sqlite3.Row,
        state: DeliveryState,
        failure_reason: str | None,
    ) -> OutboxMessage:
        """A delivery report on the message ``row``; a delivered token makes it DELIVERED."""
        message = _outbox(row)
        if message.state.value in _FINAL_OUTBOX:
            return message
        if state is DeliveryState.DELIVERED:
            new_state = OutboxState.DELIVERED
        elif state.is_final:
            new_state = OutboxState.FAILED
        else:
            new_state = OutboxState.SENT
        conn.execute(
            "UPDATE outbox SET state = ?, last_error = ?, updated_at = ? WHERE message_id = ?",
            (new_state.value, failure_reason, _ts(self._clock()), message.message_id),
        )
        self._event(
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
            purchase = self._purchase_row(conn, message.purchase_id)
            if purchase["state"] == PurchaseState.VENDED.value:
                self._move(
                    conn,
                    purchase,
                    PurchaseState.DELIVERED,
                    "token_delivered",
                    "delivery_report",
                    {"message_id": message.message_id},
                )
        return _outbox(
            conn.execute(
                "SELECT * FROM outbox WHERE message_id = ?", (message.message_id,)
            ).fetchone()
        )

    def _keep_early_report(self, conn: sqlite3.Connection, report: DeliveryReport) -> None:
        """Keep a report whose message id is not recorded yet (bounded, expiring)."""
        now = self._clock()
        conn.execute(
            "DELETE FROM early_delivery_reports WHERE received_at < ?",
            (_ts(now - timedelta(seconds=EARLY_REPORT_TTL_S)),),
        )
        kept = conn.execute("SELECT count(*) FROM early_delivery_reports").fetchone()[0]
        if kept >= EARLY_REPORT_LIMIT:
            log.warning("delivery_report_dropped", provider_message_id=report.provider_message_id)
            return
        # A final state is never replaced by a later non-final one ("Sent" after "Success").
        conn.execute(
            "INSERT INTO early_delivery_reports (provider_message_id, state, failure_reason,"
            " received_at) VALUES (?, ?, ?, ?) ON CONFLICT (provider_message_id) DO UPDATE"
            " SET state = excluded.state, failure_reason = excluded.failure_reason"
            " WHERE ? OR early_delivery_reports.state NOT IN (?, ?, ?)",
            (
                report.provider_message_id,
                report.state.value,
                report.failure_reason,
                _ts(now),
                report.state.is_final,
                *_FINAL_DELIVERY,
            ),
        )

    async def apply_delivery_report(self, report: DeliveryReport) -> OutboxMessage | None:
        """Record a delivery report; a delivered token message makes its purchase DELIVERED.

        An unknown message id is kept for ``outbox_sent`` (see ``Ledger``) and answers None.
        """

        def op(conn: sqlite3.Connection) -> OutboxMessage | None:
            row = conn.execute(
                "SELECT * FROM outbox WHERE provider_message_id = ?", (report.provider_message_id,)
            ).fetchone()
            if row is None:
                self._keep_early_report(conn, report)
                return None
            return self._apply_report(conn, row, report.state, report.failure_reason)

        return await self._write(op)

    async def outbox_for(self, purchase_id: str) -> list[OutboxMessage]:
        """The purchase's messages, oldest first."""
        rows = await self._read(
            "SELECT * FROM outbox WHERE purchase_id = ? ORDER BY message_id", (purchase_id,)
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

        def op(conn: sqlite3.Connection) -> None:
            self._event(conn, purchase_id, kind, actor, data)

        await self._write(op)

    async def timeline(self, purchase_id: str) -> list[Event]:
        """The purchase's events, oldest first."""
        rows = await self._read(
            "SELECT * FROM events WHERE purchase_id = ? ORDER BY event_id", (purchase_id,)
        )
        return [_event(row) for row in rows]

    async def events(self, *, kind: str | None = None, limit: int = 100) -> list[Event]:
        """Recent events, newest first, optionally of one kind."""
        if kind is None:
            rows = await self._read("SELECT * FROM events ORDER BY event_id DESC LIMIT ?", (limit,))
        else:
            rows = await self._read(
                "SELECT * FROM events WHERE kind = ? ORDER BY event_id DESC LIMIT ?", (kind, limit)
            )
        return [_event(row) for row in rows]

    # -- channels -------------------------------------------------------------------------------

    async def save_meter(self, phone: str, meter: str, *, nickname: str = "") -> SavedMeter:
        """Keep a meter for a phone (renames it if kept already)."""

        def op(conn: sqlite3.Connection) -> SavedMeter:
            if conn.execute("SELECT 1 FROM meters WHERE drn = ?", (meter,)).fetchone() is None:
                raise NotFound("meter", meter)
            kept = conn.execute(
                "SELECT 1 FROM saved_meters WHERE phone = ? AND meter = ?", (phone, meter)
            ).fetchone()
            now = _ts(self._clock())
            if kept is not None:
                conn.execute(
                    "UPDATE saved_meters SET nickname = ? WHERE phone = ? AND meter = ?",
                    (nickname, phone, meter),
                )
            else:
                (count,) = conn.execute(
                    "SELECT count(*) FROM saved_meters WHERE phone = ?", (phone,)
                ).fetchone()
                if count >= MAX_SAVED_METERS:
                    raise SavedMetersFull(f"{phone} already keeps {MAX_SAVED_METERS} meters")
                conn.execute(
                    "INSERT INTO saved_meters (phone, meter, nickname, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (phone, meter, nickname, now),
                )
            row = conn.execute(
                "SELECT * FROM saved_meters WHERE phone = ? AND meter = ?", (phone, meter)
            ).fetchone()
            return SavedMeter(
                phone=Msisdn(row["phone"]),
                meter=MeterNumber(row["meter"]),
                nickname=row["nickname"],
                created_at=_dt(row["created_at"]),
            )

        return await self._write(op)

    async def saved_meters(self, phone: str) -> list[SavedMeter]:
        """The phone's saved meters, oldest first."""
        rows = await self._read_inline(
            "SELECT * FROM saved_meters WHERE phone = ? ORDER BY created_at, meter", (phone,)
        )
        return [
            SavedMeter(
                phone=Msisdn(row["phone"]),
                meter=MeterNumber(row["meter"]),
                nickname=row["nickname"],
                created_at=_dt(row["created_at"]),
            )
            for row in rows
        ]

    async def remove_saved_meter(self, phone: str, meter: str) -> bool:
        """Forget a saved meter; False if it was not saved."""

        def op(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "DELETE FROM saved_meters WHERE phone = ? AND meter = ?", (phone, meter)
            )
            return cursor.rowcount > 0

        return await self._write(op)

    async def get_language(self, phone: str) -> str | None:
        """The phone's chosen language code, if any."""
        row = await self._read_point(
            "SELECT language FROM customer_preferences WHERE phone = ?", (phone,)
        )
        return cast("str", row["language"]) if row is not None else None

    async def probe_write(self) -> None:
        """Commit a write that changes nothing, through the writer thread (a WAL frame, fsync)."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE schema_migrations SET applied_at = applied_at"
                " WHERE version = (SELECT max(version) FROM schema_migrations)"
            )

        await self._write(op)

    async def set_language(self, phone: str, language: str) -> None:
        """Remember the phone's language code."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO customer_preferences (phone, language, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (phone) DO UPDATE SET language = excluded.language,"
                " updated_at = excluded.updated_at",
                (phone, language, _ts(self._clock())),
            )

        await self._write(op)

    # -- reports --------------------------------------------------------------------------------

    async def daily_report(self, day: date) -> list[ReportRow]:
        """Counts and sums of the purchases created on ``day`` (UTC), by provider and state."""
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        rows = await self._read(
            "SELECT provider, state, currency, count(*) AS n, sum(amount_minor) AS total"
            " FROM purchases WHERE created_at >= ? AND created_at < ?"
            " GROUP BY provider, state, currency ORDER BY provider, state, currency",
            (_ts(start), _ts(start + timedelta(days=1))),
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
        for row in await self._read("SELECT state, count(*) AS n FROM purchases GROUP BY state"):
            counts[row["state"]] = row["n"]
        return counts

    async def outbox_stats(self, now: datetime) -> OutboxStats:
        """The outbox backlog (pending or sending), its oldest message's age, and held ones."""
        row = await self._read_one(
            "SELECT count(*) FILTER (WHERE state IN (?, ?)) AS backlog,"
            " min(created_at) FILTER (WHERE state IN (?, ?)) AS oldest,"
            " count(*) FILTER (WHERE state = ?) AS held"
            " FROM outbox WHERE state IN (?, ?, ?)",
            (*_UNSENT, *_UNSENT, OutboxState.HELD.value, *_UNSENT, OutboxState.HELD.value),
        )
        assert row is not None  # noqa: S101 - an aggregate always answers one row
        oldest = row["oldest"]
        age = max(0.0, (now - _dt(oldest)).total_seconds()) if oldest else 0.0
        return OutboxStats(backlog=row["backlog"], oldest_age_s=age, held=row["held"])


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///relative/path`` or ``sqlite:////absolute/path`` URL.

    Raises:
        LedgerError: not a SQLite file URL (``:memory:`` is refused: the writer and the readers
            need to share one file).
    """
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        raise LedgerError(f"not a SQLite URL (expected sqlite:///path): {url!r}")
    rest = url.removeprefix(prefix)
    if not rest or rest == ":memory:":
        raise LedgerError(f"the ledger needs a database file, got {url!r}")
    return Path(rest)


@contextlib.asynccontextmanager
async def open_sqlite_ledger(
    path: Path,
    *,
    clock: Clock = _utc_now,
    max_batch: int = DEFAULT_MAX_BATCH,
    busy_timeout_ms: int = BUSY_TIMEOUT_MS,
    migrate: bool = True,
) -> AsyncIterator[SqliteLedger]:
    """Open (creating and migrating) the ledger at ``path``; closes it on exit.

    Raises:
        LedgerUnavailable: the file cannot be opened or written.
        MigrationError: a migration failed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    ledger = SqliteLedger(path, clock=clock, max_batch=max_batch, busy_timeout_ms=busy_timeout_ms)
    await ledger.start(migrate=migrate)
    try:
        yield ledger
    finally:
        await ledger.close()
