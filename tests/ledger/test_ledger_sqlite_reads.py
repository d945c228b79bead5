"""SQLite point reads on the event loop's own connection, and their fallback when it is busy."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.ledger import MeterNumber, open_sqlite_ledger
from tests.ledger.ledger_support import TARIFF, meter_record


async def test_a_point_read_sees_the_acknowledged_write(tmp_path: Path) -> None:
    """A meter read right after its write was acknowledged sees it, TID included."""
    async with open_sqlite_ledger(tmp_path / "l.db") as ledger:
        await ledger.put_tariff(TARIFF)
        await ledger.put_meter(meter_record("01234567890"))
        assert (await ledger.get_meter("01234567890")).drn == MeterNumber("01234567890")
        await ledger.put_meter(meter_record("01234567890", customer_name="Achieng Otieno"))
        assert (await ledger.get_meter("01234567890")).customer_name == "Achieng Otieno"


async def test_a_busy_inline_connection_sends_the_read_to_the_pool(tmp_path: Path) -> None:
    """When the loop's own connection meets a lock, the same read is answered by the pool."""
    async with open_sqlite_ledger(tmp_path / "l.db") as ledger:
        await ledger.put_tariff(TARIFF)
        await ledger.put_meter(meter_record("01234567890"))
        # The inline connection is pointed at a file another connection holds exclusively
        # (WAL readers are never locked out by a writer, so the lock is made this way).
        locked = tmp_path / "locked.db"
        holder = sqlite3.connect(locked, isolation_level=None)
        holder.execute("CREATE TABLE meters (drn TEXT)")
        holder.execute("BEGIN EXCLUSIVE")
        blocked = sqlite3.connect(locked, isolation_level=None)
        blocked.execute("PRAGMA busy_timeout = 0")
        original, ledger._inline = ledger._inline, blocked  # the seam under test
        assert original is not None
        original.close()
        try:
            meter = await ledger.get_meter("01234567890")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
    assert meter.drn == MeterNumber("01234567890")
