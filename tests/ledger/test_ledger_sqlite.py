"""SQLite specifics: migrations, group commit, append-only events, locked and full databases."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.ledger import (
    ConfirmedPayment,
    IdempotencyConflict,
    LedgerError,
    LedgerUnavailable,
    MeterNumber,
    NotFound,
    PurchaseDraft,
    PurchaseState,
    new_purchase_id,
    open_ledger,
    open_sqlite_ledger,
    sqlite_path,
)
from gateway.ledger.sqlite import SqliteLedger, migration_scripts
from gateway.money import Money
from gateway.phone import Msisdn
from tests.ledger.ledger_support import TARIFF, FakeClock, meter_record


def draft(key: str, amount: int = 5000) -> PurchaseDraft:
    """A purchase draft on meter 01234567890."""
    return PurchaseDraft(
        purchase_id=new_purchase_id(),
        channel="sms",
        phone=Msisdn("+254712345678"),
        meter=MeterNumber("01234567890"),
        amount=Money(amount, "KES"),
        units=100,
        tariff_id=TARIFF.tariff_id,
        idempotency_key=key,
        provider="fakepay",
    )


async def seeded(ledger: SqliteLedger) -> None:
    """Register the tariff and one meter."""
    await ledger.put_tariff(TARIFF)
    await ledger.put_meter(meter_record("01234567890"))


async def test_migrations_apply_once(tmp_path: Path) -> None:
    """Reopening a database applies no migration twice and records each version once."""
    path = tmp_path / "l.db"
    async with open_sqlite_ledger(path):
        pass
    async with open_sqlite_ledger(path):
        pass
    with sqlite3.connect(path) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations")]
    assert versions == [version for version, _, _ in migration_scripts()]
    assert versions[0] == 1


async def test_database_runs_in_wal_with_full_sync_and_foreign_keys(tmp_path: Path) -> None:
    """The writer connection uses WAL, synchronous=FULL and enforced foreign keys."""
    async with open_sqlite_ledger(tmp_path / "l.db") as ledger:

        def pragmas(conn: sqlite3.Connection) -> tuple[str, int, int]:
            return (
                conn.execute("PRAGMA journal_mode").fetchone()[0],
                conn.execute("PRAGMA synchronous").fetchone()[0],
                conn.execute("PRAGMA foreign_keys").fetchone()[0],
            )

        assert await ledger._writer.run_in_thread(pragmas) == ("wal", 2, 1)


async def test_events_refuse_update_and_delete(tmp_path: Path) -> None:
    """The events table is append-only: UPDATE and DELETE are refused by triggers."""
    path = tmp_path / "l.db"
    async with open_sqlite_ledger(path) as ledger:
        await ledger.append_event(None, "something", actor="test")
    with sqlite3.connect(path) as conn:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE events SET kind = 'other'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM events")
        assert conn.execute("SELECT kind FROM events").fetchall() == [("something",)]


async def test_events_of_one_kind_are_read_by_index(tmp_path: Path) -> None:
    """Reading events by kind (admin session revocations, operator lists) never scans the table."""
    path = tmp_path / "l.db"
    async with open_sqlite_ledger(path):
        pass
    with sqlite3.connect(path) as conn:
        plan = " ".join(
            str(row[-1])
            for row in conn.execute(
                "EXPLAIN QUERY PLAN SELECT * FROM events WHERE kind = ? ORDER BY event_id DESC"
                " LIMIT 10",
                ("admin_session_revoked",),
            )
        )
    assert "USING INDEX events_kind" in plan, plan


async def test_concurrent_writes_share_commits(tmp_path: Path) -> None:
    """Two hundred concurrent writes are committed in fewer transactions than writes."""
    async with open_sqlite_ledger(tmp_path / "l.db") as ledger:
        await seeded(ledger)
        before = ledger.write_stats
        await asyncio.gather(*(ledger.open_purchase(draft(f"k{i}"), actor="t") for i in range(200)))
        batches, operations = (a - b for a, b in zip(ledger.write_stats, before, strict=True))
        assert operations == 200
        assert batches < 200


async def test_one_failing_write_does_not_poison_its_batch(tmp_path: Path) -> None:
    """A refused write in a batch fails alone; the others in the same commit stand."""
    async with open_sqlite_ledger(tmp_path / "l.db") as ledger:
        await seeded(ledger)
        await ledger.open_purchase(draft("taken", 5000), actor="t")
        results = await asyncio.gather(
            *(ledger.open_purchase(draft(f"ok{i}"), actor="t") for i in range(10)),
            ledger.open_purchase(draft("taken", 6000), actor="t"),
            *(ledger.open_purchase(draft(f"ok{i + 10}"), actor="t") for i in range(10)),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1
        assert isinstance(errors[0], IdempotencyConflict)
        assert len(await ledger.find_purchases(limit=100)) == 21


async def test_full_database_fails_clearly_and_leaves_nothing_half_written(
    tmp_path: Path,
) -> None:
    """A full database raises LedgerUnavailable saying so; the purchase stays as it was."""
    async with open_sqlite_ledger(tmp_path / "l.db", clock=FakeClock()) as ledger:
        await seeded(ledger)
        purchase = await ledger.open_purchase(draft("full"), actor="t")

        def cap(conn: sqlite3.Connection) -> None:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")

        await ledger._writer.run_in_thread(cap)
        confirmed = ConfirmedPayment(
            provider="fakepay",
            reference="R" * 4000,  # a large row needs new pages
            amount=Money(5000, "KES"),
            payer=None,
            receipt="X" * 4000,
        )
        with pytest.raises(LedgerUnavailable, match="full") as caught:
            await ledger.mark_paid(purchase.purchase_id, confirmed, actor="t")
        assert caught.value.retryable
        after = await ledger.get_purchase(purchase.purchase_id)
        assert after.state is PurchaseState.CREATED
        assert [e.kind for e in await ledger.timeline(purchase.purchase_id)] == ["purchase_created"]

        await ledger._writer.run_in_thread(
            lambda c: c.execute("PRAGMA max_page_count = 1073741823")
        )
        paid = await ledger.mark_paid(purchase.purchase_id, confirmed, actor="t")
        assert paid.state is PurchaseState.PAID


async def test_locked_database_fails_clearly(tmp_path: Path) -> None:
    """A database locked by another process raises LedgerUnavailable, and works once released."""
    path = tmp_path / "l.db"
    async with open_sqlite_ledger(path, busy_timeout_ms=50) as ledger:
        await seeded(ledger)
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")
            with pytest.raises(LedgerUnavailable, match="locked"):
                await ledger.open_purchase(draft("locked"), actor="t")
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert await ledger.find_purchases() == []
        opened = await ledger.open_purchase(draft("locked"), actor="t")
        assert opened.state is PurchaseState.CREATED


async def test_open_ledger_understands_sqlite_urls(tmp_path: Path) -> None:
    """open_ledger opens sqlite:///path and refuses in-memory and unknown URLs."""
    async with open_ledger(f"sqlite:///{tmp_path}/sub/l.db") as ledger:
        assert await ledger.find_purchases() == []
    assert (tmp_path / "sub" / "l.db").exists()
    assert sqlite_path("sqlite:///var/gateway.db") == Path("var/gateway.db")
    with pytest.raises(LedgerError):
        sqlite_path("sqlite:///:memory:")
    with pytest.raises(LedgerError):
        sqlite_path("mysql://x")


async def test_a_batch_with_a_failing_operation_is_rerun_with_savepoints(tmp_path: Path) -> None:
    """One raising operation rolls the optimistic run (no SAVEPOINTs) back whole.

    The guarded rerun then commits the others once each and fails only that one.
    """
    async with open_sqlite_ledger(tmp_path / "l.db") as ledger:
        await ledger.append_event(None, "setup", actor="t")
        calls: list[str] = []

        def insert(kind: str) -> Callable[[sqlite3.Connection], str]:
            def op(conn: sqlite3.Connection) -> str:
                calls.append(kind)
                conn.execute(
                    "INSERT INTO events (purchase_id, kind, actor, data, at)"
                    " VALUES (NULL, ?, 't', '{}', '2026-01-01T00:00:00Z')",
                    (kind,),
                )
                if kind == "bad":
                    raise NotFound("purchase", "bad")
                return kind

            return op

        def batch(conn: sqlite3.Connection) -> list[tuple[bool, object]]:
            return ledger._writer._run_batch([insert("a"), insert("bad"), insert("b")])

        outcomes = await ledger._writer.run_in_thread(batch)
        assert [ok for ok, _ in outcomes] == [True, False, True]
        assert isinstance(outcomes[1][1], NotFound)
        # the optimistic try stopped at "bad"; the guarded run went through all three
        assert calls == ["a", "bad", "a", "bad", "b"]
    with sqlite3.connect(tmp_path / "l.db") as conn:
        kinds = [row[0] for row in conn.execute("SELECT kind FROM events ORDER BY event_id")]
    assert kinds == ["setup", "a", "b"]
