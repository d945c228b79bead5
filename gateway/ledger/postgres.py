"""The PostgreSQL ledger: SQLite's schema, constraints and contract, shared by several instances.

The rules are the core's (``gateway.ledger.core``), the same as SQLite's; this dialect runs their
statements on an ``asyncpg`` pool (``?`` becomes ``$n``), in transactions, with retries. Where the
SQLite backend has one writer, here every gateway instance writes, so the guarding moves into
PostgreSQL itself, through the row locks the core's statements name:

Transactions
    Every ``Ledger`` method is one transaction (``READ COMMITTED``) on a connection from an
    ``asyncpg`` pool (a method that is a single statement runs without ``BEGIN``/``COMMIT``: the
    statement is atomic by itself). Rows a method decides on are locked first (``SELECT … FOR
    UPDATE``), always in the same order (purchase, then its payment row, then its meter; a
    delivery report locks its message, then the purchase), so two instances acting on one
    purchase wait for each other instead of both acting, and never deadlock on each other.

TIDs
    The saga's vends come with a ``mint`` (``mints_under_lock``): ``record_vend`` locks the
    purchase, then the meter's row (``SELECT … FOR UPDATE``), awaits the token engine with the
    TID that follows the locked row's ``last_tid``, and writes the meter's new ``last_tid``, the
    vend, its events and its message in one fused statement before its one ``COMMIT``. Writers
    of one meter on any number of instances take turns on the row lock: no compare-and-set
    fails, no vend is made twice, and a vend that fails or dies rolls its TID back with
    everything else (no gap; a gap would be harmless, the meter takes increasing TIDs). A key
    change (rare) still makes its tokens first and advances the TID with a compare-and-set
    (``TidConflict`` to the loser, who makes new tokens). ``UNIQUE (meter, base_date, tid)``
    stays as the last net (a TID rollover starts TIDs again from a later base date).

Idempotent inserts
    Inserts two instances may race on (one idempotency key, one provider reference) use
    ``INSERT … ON CONFLICT DO NOTHING`` and then read the winner's row, exactly as the single
    SQLite writer would have answered.

Locks on names
    The core's ``lock(name)`` steps (a delivery report and the send it may precede, a phone's
    saved meters) are transaction-scoped advisory locks.

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
import functools
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeVar, cast
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import structlog

from gateway.ledger.base import DuplicateError, LedgerError, LedgerUnavailable, MigrationError
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
Connection = Any  # asyncpg.Connection (asyncpg is untyped)
Row = Any  # asyncpg.Record
Pool = Any  # asyncpg.Pool

log = structlog.get_logger()

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
    return packaged_migrations("postgres")


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


# ------------------------------------------------------------------------------------ the dialect

_PLACEHOLDER: Final = re.compile(r"\?")
#: The core's ``lock(name)``: an advisory lock held until the transaction ends.
_LOCK_NAME: Final = "SELECT pg_advisory_xact_lock(hashtext($1))"


@functools.lru_cache(maxsize=4096)  # the core's statements are constants
def _postgres_text(sql: str) -> str:
    """The core's statement with ``$n`` placeholders."""
    numbers = iter(range(1, 1 + sql.count("?")))
    return _PLACEHOLDER.sub(lambda _: f"${next(numbers)}", sql)


@functools.lru_cache(maxsize=256)  # the core's batches are constant statement lists
def _fused(sqls: tuple[str, ...]) -> str:
    """Statements as one: each but the last in its own ``WITH`` clause (``?`` placeholders)."""
    *first, last = sqls
    clauses = ", ".join(f"s{n} AS ({sql})" for n, sql in enumerate(first))
    return f"WITH {clauses} {last}" if first else last


async def _drive(conn: Connection, steps: Steps[T]) -> T:
    """Run an operation's steps on ``conn``, one awaited statement each.

    A constraint's refusal is thrown into the steps as our error (``DuplicateError`` …), so a
    rule may name it (a receipt reused); the transaction is lost with it.
    """
    try:
        stmt = next(steps)
        while True:
            kind, sql, params = stmt
            result: object
            try:
                if kind == BATCH:  # one statement: data-modifying WITH clauses, one round trip
                    stmts = cast("tuple[Stmt, ...]", params)
                    kind = stmts[-1][0]
                    sql = _fused(tuple(each for _, each, _ in stmts))
                    params = tuple(value for _, _, values in stmts for value in values)
                if kind == CALL:  # the core awaits its own work here, the locks held
                    fn = cast("Callable[..., Awaitable[object]]", params[0])
                    stmt = steps.send(await fn(*params[1:]))
                    continue
                if kind == LOCK:
                    result = await conn.execute(_LOCK_NAME, *params)
                elif kind == RUN:
                    status = await conn.execute(_postgres_text(sql), *params)
                    result = int(status.rpartition(" ")[2])  # "UPDATE 1", "INSERT 0 1", "DELETE 0"
                elif kind == ROWS:
                    result = await conn.fetch(_postgres_text(sql), *params)
                else:
                    result = await conn.fetchrow(_postgres_text(sql), *params)
            except asyncpg.exceptions.IntegrityConstraintViolationError as exc:
                refusal = translate_error(exc)
                refusal.__cause__ = exc
                stmt = steps.throw(refusal)
                continue
            stmt = steps.send(result)
    except StopIteration as stop:
        return cast("T", stop.value)


# ------------------------------------------------------------------------------------ the ledger


class PostgresLedger(LedgerCore):
    """The ``Ledger`` on PostgreSQL, shared by any number of gateway instances.

    Build it with ``open_postgres_ledger`` (or ``open_ledger``); it owns its pool.

    Args:
        pool: an ``asyncpg`` pool whose connections' ``search_path`` names the ledger's schema.
        clock: the time source for every timestamp (UTC, aware).
        retry: how transient failures are retried.
    """

    mints_under_lock = True
    modifies_in_with = True

    def __init__(
        self, pool: Pool, *, clock: Clock = _utc_now, retry: RetryPolicy | None = None
    ) -> None:
        super().__init__(clock)
        self._pool = pool
        self._retry = retry or RetryPolicy()
        self.retries = 0
        #: Writes committed (a lone statement counts: it commits by itself): what a benchmark
        #: divides by its vends.
        self.commits = 0

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
                            done = await fn(conn)
                        else:
                            async with conn.transaction():
                                done = await fn(conn)
                    except _BROKEN_CONNECTION:
                        conn.terminate()  # the pool opens a fresh one for the next attempt
                        raise
                    return done
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

    # -- the core's dialect ---------------------------------------------------------------------

    def _stamp(self, moment: datetime) -> object:
        return moment

    async def _write(self, op: Operation[T], /, *args: object, atomic: bool = True) -> T:
        """The operation in one transaction (``atomic=False``: one statement, atomic alone)."""

        async def run(conn: Connection) -> T:
            return await _drive(conn, op(*args))

        done = await self._with_retry(run, transaction=atomic)
        self.commits += 1
        return done

    async def _read(self, op: Operation[T], /, *args: object, hot: bool = False) -> T:
        """A read outside any transaction (a point read and a scan alike: ``hot`` is SQLite's)."""
        del hot

        async def run(conn: Connection) -> T:
            return await _drive(conn, op(*args))

        return await self._with_retry(run, transaction=False)


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
