"""The SQLite ledger: one writer that group-commits, readers on their own connections.

The rules are the core's (``gateway.ledger.core``), the same as PostgreSQL's; this dialect holds
the connections, the writer thread and the statements' SQLite spelling (no row locks: the one
writer serialises every write; ``IS`` for ``IS NOT DISTINCT FROM``). A write's steps run
synchronously in the writer thread, inside the batch it commits; a hot read's on the loop.

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
import functools
import queue
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TypeVar, cast

import aiosqlite
import structlog

from gateway.ledger.base import (
    RECEIPT_ONCE,
    DuplicateError,
    LedgerError,
    LedgerUnavailable,
    MigrationError,
)
from gateway.ledger.core import (
    BATCH,
    CALL,
    LOCK,
    ROWS,
    RUN,
    Clock,
    LedgerCore,
    Operation,
    Steps,
    Stmt,
)
from gateway.ledger.migrations import packaged_migrations

T = TypeVar("T")
WriteOp = Callable[[sqlite3.Connection], T]

log = structlog.get_logger()

#: Operations per transaction at most; a batch is whatever queued up meanwhile.
DEFAULT_MAX_BATCH: Final = 512
BUSY_TIMEOUT_MS: Final = 5000
#: Reader connections: reads of concurrent callers overlap in SQLite (the GIL is released).
DEFAULT_READERS: Final = 2
#: Unique indexes by the columns SQLite names when one refuses a row (PostgreSQL names the index).
_UNIQUE_INDEXES: Final = {"payments.provider, payments.receipt": RECEIPT_ONCE}
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
            columns = text.removeprefix("UNIQUE constraint failed:").strip()
            constraint = _UNIQUE_INDEXES.get(columns, columns)
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
    return packaged_migrations("sqlite")


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


# ------------------------------------------------------------------------------------ the dialect

#: Row locks: the one writer already serialises every write, and SQLite has no ``FOR UPDATE``.
_ROW_LOCK: Final = re.compile(r"\s+FOR UPDATE(?: OF \w+)?(?: SKIP LOCKED)?")


@functools.lru_cache(maxsize=4096)  # the core's statements are constants
def _sqlite_text(sql: str) -> str:
    """The core's statement in SQLite's words."""
    return _ROW_LOCK.sub("", sql).replace(" IS NOT DISTINCT FROM ", " IS ")


def _drive(conn: sqlite3.Connection, steps: Steps[T]) -> T:
    """Run an operation's steps on ``conn``, synchronously (the writer thread, the loop).

    A constraint's refusal is thrown into the steps as our error (``DuplicateError`` …), so a
    rule may name it (a receipt reused); SQLite has rolled back that statement alone.
    """
    try:
        stmt = next(steps)
        while True:
            kind, sql, params = stmt
            result: object = None
            if kind == CALL:  # nothing may be awaited in the writer thread (mints_under_lock)
                stmt = steps.throw(LedgerError("SQLite's writer cannot await inside a write"))
                continue
            if kind != LOCK:
                try:
                    if kind == BATCH:  # one by one; the last answers
                        *first, (kind, sql, params) = cast("tuple[Stmt, ...]", params)
                        for _, each, values in first:
                            conn.execute(_sqlite_text(each), values)
                    cursor = conn.execute(_sqlite_text(sql), params)
                except sqlite3.IntegrityError as exc:
                    refusal = translate_error(exc)
                    refusal.__cause__ = exc
                    stmt = steps.throw(refusal)
                    continue
                if kind == RUN:
                    result = cursor.rowcount
                else:
                    found = cursor.fetchall()
                    result = found if kind == ROWS else found[0] if found else None
            stmt = steps.send(result)
    except StopIteration as stop:
        return cast("T", stop.value)


async def _drive_reader(reader: aiosqlite.Connection, steps: Steps[T]) -> T:
    """Run a read's steps on a pooled reader connection (its own thread)."""
    try:
        kind, sql, params = next(steps)
        while True:
            # A read takes no lock: a ``lock`` step's empty statement answers no row.
            found = list(await reader.execute_fetchall(_sqlite_text(sql), params))
            kind, sql, params = steps.send(found if kind == ROWS else found[0] if found else None)
    except StopIteration as stop:
        return cast("T", stop.value)


class SqliteLedger(LedgerCore):
    """The ``Ledger`` on one SQLite file. Build it with ``open_sqlite_ledger`` (or ``open_ledger``).

    The rules are the core's (``gateway.ledger.core``); this class holds the connections, the
    writer thread and the statements' SQLite spelling.

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
        super().__init__(clock)
        self.path = path
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

    # -- the core's dialect ---------------------------------------------------------------------

    def _stamp(self, moment: datetime) -> object:
        return _ts(moment)

    async def _write(self, op: Operation[T], /, *args: object, atomic: bool = True) -> T:
        """Queue the operation for the writer thread; its result once its batch is committed.

        A batch may run an operation twice (the optimistic try rolled back): each run drives
        fresh steps.
        """
        del atomic  # every write is in the writer's transaction
        return await self._writer.submit(lambda conn: _drive(conn, op(*args)))

    async def _read(self, op: Operation[T], /, *args: object, hot: bool = False) -> T:
        """A read: ``hot`` on the loop's own connection (the pool when it is busy), else the pool.

        Only reads of a handful of rows through an index are ``hot`` (the USSD and vend hot
        paths): anything that scans belongs on the pool, off the event loop.
        """
        inline = self._inline
        if hot and inline is not None:
            try:
                return _drive(inline, op(*args))
            except sqlite3.OperationalError as exc:
                primary = exc.sqlite_errorcode & 0xFF  # extended codes: BUSY_RECOVERY …
                if primary not in {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}:
                    raise translate_error(exc) from exc
            except sqlite3.Error as exc:
                raise translate_error(exc) from exc
        if not self._readers:
            raise LedgerError("ledger is closed")
        self._next_reader = (self._next_reader + 1) % len(self._readers)
        reader = self._readers[self._next_reader]
        try:
            return await _drive_reader(reader, op(*args))
        except sqlite3.Error as exc:
            raise translate_error(exc) from exc


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
