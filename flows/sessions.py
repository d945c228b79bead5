"""Session stores: where USSD conversations keep their state between hops.

Two implementations of :class:`flows.ports.SessionStore`:

- :class:`MemorySessionStore`: a dict with expiry, for one process (tests, the demo, one worker).
- :class:`SqliteSessionStore`: a table in a SQLite file (WAL, ``synchronous=NORMAL``: sessions
  are soft state), shared by the worker processes of one machine. It calls :mod:`sqlite3`
  inline: each call is one indexed single-row statement on a page-cache-resident table (5 µs a
  read, 15-20 µs a write), cheaper than a thread hop. When another process holds the write lock
  it does not block the event loop in SQLite's own busy handler (which sleeps whole
  milliseconds): it retries after yielding, up to ``busy_timeout_ms``.

Both sweep expired keys a few at a time (at most ``_SWEEP_LIMIT`` every ``_SWEEP_EVERY``
writes, found through an expiry index or in write order), never with a scan of everything,
so no hop waits behind a sweep of a large table.

A Redis store (several machines) needs only the same four methods (``GET``, ``SET EX``,
``SET NX EX``, ``DEL``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

Clock = Callable[[], float]
"""Seconds on a monotonic-enough scale; tests pass a fake one."""

_SWEEP_EVERY: Final = 16  # writes between sweeps of expired keys
_SWEEP_LIMIT: Final = 32  # at most this many expired keys removed per sweep (twice the writes)
_BUSY: Final = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
_MMAP_BYTES: Final = 256 * 1024 * 1024


class MemorySessionStore:
    """Session state in a dict; expired keys read as absent and are swept now and then.

    The dict is kept in write order (a put moves its key to the end), which with the engine's
    one TTL is expiry order: a sweep looks at the oldest keys only and stops at the first live
    one. A key written with a longer TTL than later ones may wait longer to be swept, never
    to read as absent.
    """

    def __init__(self, clock: Clock = time.time) -> None:
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
    """

    def __init__(
        self, connection: sqlite3.Connection, clock: Clock = time.time, busy_timeout_ms: int = 2000
    ) -> None:
        self._db = connection
        self._clock = clock
        self._busy_s = busy_timeout_ms / 1000
        self._writes = 0

    @classmethod
    def open(
        cls, path: Path | str, *, clock: Clock = time.time, busy_timeout_ms: int = 2000
    ) -> SqliteSessionStore:
        """Open (creating if needed) the store in the SQLite file at ``path``."""
        setup = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout_ms / 1000)
        setup.execute("PRAGMA journal_mode=WAL")
        setup.executescript(_SCHEMA)
        setup.close()
        # timeout=0: a locked database raises at once and _run retries without blocking.
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
        connection.execute("PRAGMA synchronous=NORMAL")  # session state may lose the last hop
        # Pages read through a memory map: no read() per page when another worker's writes
        # have invalidated this connection's page cache.
        connection.execute(f"PRAGMA mmap_size={_MMAP_BYTES}")
        return cls(connection, clock, busy_timeout_ms)

    async def _run(self, sql: str, params: tuple[object, ...]) -> sqlite3.Cursor:
        """Execute one statement, retrying (and yielding) while another process writes."""
        deadline: float | None = None
        while True:
            try:
                return self._db.execute(sql, params)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode not in _BUSY:
                    raise
                now = time.monotonic()
                deadline = deadline or now + self._busy_s
                if now >= deadline:
                    raise
                await asyncio.sleep(0.0002)

    def close(self) -> None:
        """Close the connection; the store is unusable afterwards."""
        self._db.close()

    async def get(self, key: str) -> str | None:
        """The value under ``key``, or None when absent or expired."""
        cursor = await self._run(_GET, (key, self._clock()))
        row = cursor.fetchone()
        return None if row is None else str(row[0])

    async def put(self, key: str, value: str, ttl_s: float) -> None:
        """Store ``value`` under ``key`` for ``ttl_s`` seconds."""
        await self._run(_PUT, (key, value, self._clock() + ttl_s))
        await self._count_write()

    async def add(self, key: str, value: str, ttl_s: float) -> bool:
        """Store ``value`` only if ``key`` is absent or expired; True when stored."""
        now = self._clock()
        cursor = await self._run(_ADD, (key, value, now + ttl_s, now))
        await self._count_write()
        return cursor.rowcount == 1

    async def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        await self._run(_DELETE, (key,))

    async def _count_write(self) -> None:
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            await self._run(_SWEEP, (self._clock(), _SWEEP_LIMIT))
