"""Session stores: where USSD conversations keep their state between hops.

Two implementations of :class:`flows.ports.SessionStore`:

- :class:`MemorySessionStore`: a dict with expiry, for one process (tests, the demo, one worker).
- :class:`SqliteSessionStore`: a table in a SQLite file (WAL, ``synchronous=NORMAL``: sessions
  are soft state), shared by the worker processes of one machine. It calls :mod:`sqlite3`
  inline: each call is one indexed single-row statement on a page-cache-resident table (5 µs a
  read), cheaper than a thread hop; the writes of one event-loop turn share one transaction
  (one commit for all the hops in flight, not one each), and checkpoints run on a thread. When
  another process holds the write lock it does not block the event loop in SQLite's own busy
  handler (which sleeps whole milliseconds): it retries after yielding, up to
  ``busy_timeout_ms``.

Both sweep expired keys a few at a time (at most ``_SWEEP_LIMIT`` every ``_SWEEP_EVERY``
writes, found through an expiry index or in write order), never with a scan of everything,
so no hop waits behind a sweep of a large table.

A Redis store (several machines) needs only the same four methods (``GET``, ``SET EX``,
``SET NX EX``, ``DEL``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from gateway.values.clock import SecondsClock

_SWEEP_EVERY: Final = 16  # writes between sweeps of expired keys
_SWEEP_LIMIT: Final = 32  # at most this many expired keys removed per sweep (twice the writes)
_BUSY: Final = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
_MMAP_BYTES: Final = 256 * 1024 * 1024
_CHECKPOINT_EVERY: Final = 256  # commits between checkpoints (on a thread)


class MemorySessionStore:
    """Session state in a dict; expired keys read as absent and are swept now and then.

    The dict is kept in write order (a put moves its key to the end), which with the engine's
    one TTL is expiry order: a sweep looks at the oldest keys only and stops at the first live
    one. A key written with a longer TTL than later ones may wait longer to be swept, never
    to read as absent.
    """

    def __init__(self, clock: SecondsClock = time.time) -> None:
        self._clock = clock
        self._items: dict[str, tuple[str, float]] = {}
        self._writes = 0

    async def get(self, key: str) -> str | None:
        """The value under ``key``, or None when absent or expired."""
        item = self._items.get(key)
        if item is None:
            return None
        value, expires_at = item
        if expires_at <= self._clock():
            del self._items[key]
            return None
        return value

    async def put(self, key: str, value: str, ttl_s: float) -> None:
        """Store ``value`` under ``key`` for ``ttl_s`` seconds."""
        items = self._items
        items.pop(key, None)  # to the end: write order
        items[key] = (value, self._clock() + ttl_s)
        self._count_write()

    async def add(self, key: str, value: str, ttl_s: float) -> bool:
        """Store ``value`` only if ``key`` is absent or expired; True when stored."""
        if await self.get(key) is not None:
            return False
        await self.put(key, value, ttl_s)
        return True

    async def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)

    def _count_write(self) -> None:
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            now = self._clock()
            expired: list[str] = []
            for key, (_, expires_at) in self._items.items():
                if expires_at > now or len(expired) >= _SWEEP_LIMIT:
                    break
                expired.append(key)
            for key in expired:
                del self._items[key]


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS ussd_sessions (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ussd_sessions_expiry ON ussd_sessions (expires_at);
"""
_GET: Final = "SELECT value FROM ussd_sessions WHERE key = ? AND expires_at > ?"
_PUT: Final = (
    "INSERT INTO ussd_sessions (key, value, expires_at) VALUES (?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at"
)
_ADD: Final = _PUT + " WHERE ussd_sessions.expires_at <= ?"
_DELETE: Final = "DELETE FROM ussd_sessions WHERE key = ?"
_SWEEP: Final = (
    "DELETE FROM ussd_sessions WHERE key IN (SELECT key FROM ussd_sessions"
    " WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)"
)


class SqliteSessionStore:
    """Session state in a SQLite table; safe to share between processes on one machine.

    Open with :meth:`open` and close with :meth:`close`. Expired rows read as absent and are
    deleted every ``_SWEEP_EVERY`` writes.

    Reads run inline. Writes are grouped: every write made during one turn of the event loop
    joins one transaction, committed at the start of the next turn (``call_soon``), and each
    write's caller resumes once that commit returned: what a hop wrote is in the file before
    its reply goes out, so the next hop finds it whichever worker process serves it. Under
    load one commit (one WAL append, one round of lock calls) serves tens of hops instead of
    one write each.

    The connection never checkpoints on its own (``wal_autocheckpoint=0``): a checkpoint copies
    pages back into the database file and would stall the event loop for milliseconds. Every
    ``_CHECKPOINT_EVERY`` commits a ``PASSIVE`` checkpoint runs on a thread of its own, on its
    own connection, never waiting for readers or writers.
    """

    def __init__(
        self,
        connection: sqlite3.Connection,
        clock: SecondsClock = time.time,
        busy_timeout_ms: int = 2000,
        path: Path | str | None = None,
    ) -> None:
        self._db = connection
        self._clock = clock
        self._busy_s = busy_timeout_ms / 1000
        self._writes = 0
        self._path = path
        # (statement, parameters, the caller's future; None for a sweep nobody waits for)
        self._pending: list[tuple[str, tuple[object, ...], asyncio.Future[int] | None]] = []
        self._flush_scheduled = False
        self._busy_since: float | None = None
        self._commits = 0
        self._checkpointer: ThreadPoolExecutor | None = None
        self._checkpoint: concurrent.futures.Future[None] | None = None
        self.batches = 0
        """Transactions committed (for the ratio of writes to commits)."""

    @classmethod
    def open(
        cls, path: Path | str, *, clock: SecondsClock = time.time, busy_timeout_ms: int = 2000
    ) -> SqliteSessionStore:
        """Open (creating if needed) the store in the SQLite file at ``path``.

        Safe when several worker processes open the same new file at once: the busy timeout is
        set before anything else, the schema is created under ``BEGIN IMMEDIATE`` (a lock taken
        up front is waited for; one upgraded from a read is refused at once) and a "locked"
        answer is retried until ``busy_timeout_ms`` has passed.
        """
        deadline = time.monotonic() + busy_timeout_ms / 1000
        while True:
            try:
                _create(path, busy_timeout_ms)
                connection = _connect(path, busy_timeout_ms)
                break
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF not in _BUSY or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)
        return cls(connection, clock, busy_timeout_ms, path)

    async def _run(self, sql: str, params: tuple[object, ...]) -> sqlite3.Cursor:
        """Execute one statement, retrying (and yielding) while another process writes."""
        deadline: float | None = None
        while True:
            try:
                return self._db.execute(sql, params)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF not in _BUSY:
                    raise
                now = time.monotonic()
                deadline = deadline or now + self._busy_s
                if now >= deadline:
                    raise
                await asyncio.sleep(0.0002)

    def close(self) -> None:
        """Commit what is pending, close the connection; the store is unusable afterwards."""
        if self._pending:
            self._flush(final=True)
        if self._checkpointer is not None:
            self._checkpointer.shutdown(wait=True)
            self._checkpointer = None
        self._db.close()

    async def get(self, key: str) -> str | None:
        """The value under ``key``, or None when absent or expired."""
        cursor = await self._run(_GET, (key, self._clock()))
        row = cursor.fetchone()
        return None if row is None else str(row[0])

    async def put(self, key: str, value: str, ttl_s: float) -> None:
        """Store ``value`` under ``key`` for ``ttl_s`` seconds."""
        await self._write(_PUT, (key, value, self._clock() + ttl_s))

    async def add(self, key: str, value: str, ttl_s: float) -> bool:
        """Store ``value`` only if ``key`` is absent or expired; True when stored."""
        now = self._clock()
        return await self._write(_ADD, (key, value, now + ttl_s, now)) == 1

    async def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        await self._write(_DELETE, (key,))

    def _write(self, sql: str, params: tuple[object, ...]) -> asyncio.Future[int]:
        """Queue one statement for this turn's transaction; the future gets its rowcount."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._pending.append((sql, params, future))
        if sql is not _DELETE:
            self._writes += 1
            if self._writes % _SWEEP_EVERY == 0:
                self._pending.append((_SWEEP, (self._clock(), _SWEEP_LIMIT), None))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self, *, final: bool = False) -> None:
        """Commit every queued statement in one transaction (a callback on the loop)."""
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            counts = self._commit(batch)
        except sqlite3.Error as exc:  # the write lock is another process's, or the file failed
            self._pending[:0] = batch  # first in line when the lock is free
            self._locked_out(exc, final=final)
            return
        self._busy_since = None
        self.batches += 1
        for (_, _, future), count in zip(batch, counts, strict=True):
            if future is None or future.done():  # a sweep, or a caller gone (cancelled)
                continue
            if isinstance(count, BaseException):
                future.set_exception(count)
            else:
                future.set_result(count)
        self._commits += 1
        if self._commits % _CHECKPOINT_EVERY == 0:
            self._start_checkpoint()

    def _commit(
        self, batch: list[tuple[str, tuple[object, ...], asyncio.Future[int] | None]]
    ) -> list[int | BaseException]:
        """Each statement's rowcount (or its error), all committed together.

        Raises:
            sqlite3.Error: the transaction could not begin (the write lock is another process's,
                or the file failed); nothing was written.
        """
        db = self._db
        if len(batch) == 1:  # alone in its turn (a quiet moment): autocommit, no BEGIN/COMMIT
            sql, params, _ = batch[0]
            try:
                return [db.execute(sql, params).rowcount]
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF in _BUSY:
                    raise
                return [exc]
            except sqlite3.Error as exc:
                return [exc]
        db.execute("BEGIN IMMEDIATE")
        counts: list[int | BaseException] = []
        try:
            for sql, params, _ in batch:
                try:
                    counts.append(db.execute(sql, params).rowcount)
                except sqlite3.Error as exc:  # this statement failed alone
                    counts.append(exc)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            counts = [exc] * len(batch)
        return counts

    def _locked_out(self, exc: sqlite3.Error, *, final: bool) -> None:
        """Another process holds the write lock: retry soon, or fail the batch past the timeout.

        Any other error fails the batch at once: each waiting caller gets it.
        """
        now = time.monotonic()
        busy = getattr(exc, "sqlite_errorcode", 0) & 0xFF in _BUSY
        if busy and not final:
            self._busy_since = self._busy_since or now
            if now - self._busy_since < self._busy_s:
                if not self._flush_scheduled:
                    self._flush_scheduled = True
                    asyncio.get_running_loop().call_later(0.0002, self._flush)
                return
        self._busy_since = None
        batch, self._pending = self._pending, []
        for _, _, future in batch:
            if future is not None and not future.done():
                future.set_exception(exc)

    def _start_checkpoint(self) -> None:
        if self._path is None or (self._checkpoint is not None and not self._checkpoint.done()):
            return
        if self._checkpointer is None:
            self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="sessions-checkpoint")
        self._checkpoint = self._checkpointer.submit(_checkpoint, self._path)


def _create(path: Path | str, busy_timeout_ms: int) -> None:
    """WAL mode and the schema, under the busy timeout from the first statement on."""
    setup = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout_ms / 1000)
    try:
        setup.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        setup.execute("PRAGMA journal_mode=WAL")
        setup.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                setup.execute(statement)
        setup.execute("COMMIT")
    finally:
        setup.close()


def _connect(path: Path | str, busy_timeout_ms: int) -> sqlite3.Connection:
    """The store's connection: set up under the busy timeout, then never waiting in SQLite."""
    connection = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000
    )
    try:
        connection.execute("PRAGMA synchronous=NORMAL")  # session state may lose the last hop
        connection.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run on a thread
        # Pages read through a memory map: no read() per page when another worker's writes
        # have invalidated this connection's page cache.
        connection.execute(f"PRAGMA mmap_size={_MMAP_BYTES}")
        # From now on a locked database raises at once and the store retries after yielding,
        # never blocking the event loop in SQLite's busy handler.
        connection.execute("PRAGMA busy_timeout=0")
    except BaseException:
        connection.close()
        raise
    return connection


def _checkpoint(path: Path | str) -> None:
    """Copy the WAL back into the database file without waiting for anyone (on a thread)."""
    connection = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    except sqlite3.OperationalError:
        pass  # busy: the next one will do it
    finally:
        connection.close()
