"""Session stores: where USSD conversations keep their state between hops.

Two implementations of :class:`flows.ports.SessionStore`:

- :class:`MemorySessionStore`: a dict with expiry, for one process (tests, the demo, one worker).
- :class:`SqliteSessionStore`: a table in a SQLite file (WAL), shared by the worker processes of
  one machine. It calls :mod:`sqlite3` inline: each call is one indexed single-row statement on a
  page-cache-resident table (10-20 microseconds), cheaper than a thread hop. When another
  process holds the write lock it does not block the event loop in SQLite's own busy handler
  (which sleeps whole milliseconds): it retries after yielding, up to ``busy_timeout_ms``.

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

_SWEEP_EVERY: Final = 1024  # writes between sweeps of expired keys
_BUSY: Final = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


class MemorySessionStore:
    """Session state in a dict; expired keys read as absent and are swept now and then."""

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
        self._items[key] = (value, self._clock() + ttl_s)
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
            for key in [k for k, (_, exp) in self._items.items() if exp <= now]:
                del self._items[key]


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS ussd_sessions (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID
"""


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
        setup.execute(_SCHEMA)
        setup.close()
        # timeout=0: a locked database raises at once and _run retries without blocking.
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
        connection.execute("PRAGMA synchronous=NORMAL")  # session state may lose the last hop
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
        cursor = await self._run(
            "SELECT value FROM ussd_sessions WHERE key = ? AND expires_at > ?",
            (key, self._clock()),
        )
        row = cursor.fetchone()
        return None if row is None else str(row[0])

    async def put(self, key: str, value: str, ttl_s: float) -> None:
        """Store ``value`` under ``key`` for ``ttl_s`` seconds."""
        await self._run(
            "INSERT INTO ussd_sessions (key, value, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "expires_at = excluded.expires_at",
            (key, value, self._clock() + ttl_s),
        )
        await self._count_write()

    async def add(self, key: str, value: str, ttl_s: float) -> bool:
        """Store ``value`` only if ``key`` is absent or expired; True when stored."""
        now = self._clock()
        cursor = await self._run(
            "INSERT INTO ussd_sessions (key, value, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "expires_at = excluded.expires_at WHERE ussd_sessions.expires_at <= ?",
            (key, value, now + ttl_s, now),
        )
        await self._count_write()
        return cursor.rowcount == 1

    async def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        await self._run("DELETE FROM ussd_sessions WHERE key = ?", (key,))

    async def _count_write(self) -> None:
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            await self._run("DELETE FROM ussd_sessions WHERE expires_at <= ?", (self._clock(),))
