"""The two kinds of clock the gateway reads, by name, and the one wall-clock function.

- :data:`UtcClock`: wall time as an aware UTC ``datetime`` (the ledger, the saga, the sweeper, the
  outbox, the admin pages); :func:`utc_now` is the real one.
- :data:`SecondsClock`: seconds as a ``float`` (flows' session stores, token caches, simulators);
  ``time.time`` or ``time.monotonic`` are the real ones, as each caller says.

Tests pass fakes of either (``tests/support/clock.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeAlias

UtcClock: TypeAlias = Callable[[], datetime]
SecondsClock: TypeAlias = Callable[[], float]


def utc_now() -> datetime:
    """The current time, aware, in UTC."""
    return datetime.now(UTC)


__all__ = ["SecondsClock", "UtcClock", "utc_now"]
