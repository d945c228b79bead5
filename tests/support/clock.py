"""The suite's one fake clock: time that moves only when a test says so.

The gateway reads two kinds of clock: wall time as an aware UTC ``datetime`` (the ledger, the saga,
the admin pages) and seconds as a ``float`` (flows, session stores, token caches, simulators).
:class:`FakeClock` is both, by its type parameter; :class:`UtcClock` and :class:`SecondsClock` are
its two faces with the starting points the tests use.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

#: Where a UTC clock starts unless a test says otherwise.
START_UTC = datetime(2026, 3, 14, 9, 26, 53, tzinfo=UTC)

T = TypeVar("T", float, datetime)


class FakeClock(Generic[T]):
    """A clock the test moves by hand: call it for the time, ``advance`` it, or set ``now``."""

    def __init__(self, start: T) -> None:
        self.now: T = start

    def __call__(self) -> T:
        """The current fake time."""
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        if isinstance(self.now, datetime):
            self.now = self.now + timedelta(seconds=seconds)
        else:
            self.now = self.now + seconds


class UtcClock(FakeClock[datetime]):
    """Wall time, aware UTC (the ledger's and the saga's clock)."""

    def __init__(self, start: datetime | None = None) -> None:
        super().__init__(start or START_UTC)


class SecondsClock(FakeClock[float]):
    """Seconds, monotonic (the clock of flows, session stores, token caches and simulators)."""

    def __init__(self, start: float = 1000.0) -> None:
        super().__init__(start)
