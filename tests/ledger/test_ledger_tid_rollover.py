"""TIDs after a base-date rollover (issue 16, point 2): one TID per (meter, base date, TID).

A key change from a 1993 to a 2014 key (RO = 1) makes the meter count TIDs from 2014 and clear its
TID store, so a TID equal to one vended under 1993 is a new token. The contract runs on every
backend (``ledger`` fixture); the upgrade to schema 0004 is tested on ledgers that hold vends on
both sides of a rollover.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from gateway.ledger import Ledger, LedgerUnavailable, open_postgres_ledger, open_sqlite_ledger
from gateway.ledger import postgres as postgres_backend
from gateway.ledger import sqlite as sqlite_backend
from tests.ledger.ledger_support import (
    BACKENDS,
    POSTGRES_START,
    POSTGRES_URL,
    TARIFF,
    FakeClock,
    meter_record,
)
from tests.ledger.test_ledger_key_changes import (
    KCT,
    METER,
    OTHER,
    ROTATION,
    paid_purchase,
    vend_draft,
)

#: A TID late in the 1993 range; the 2014 range reaches it in 2025-11 (11 years later).
TID = 6_000_000


async def test_a_tid_vended_under_the_old_base_date_is_vended_again_after_the_rollover(
    ledger: Ledger,
) -> None:
    """1993 TID 6,000,000, rollover to 2014, then 2014 TID 6,000,000 (and on): all recorded."""
    await ledger.put_meter(meter_record(METER, krn=1, base_date=1993))
    await ledger.put_meter(meter_record(OTHER, krn=1, base_date=1993))
    before = await paid_purchase(ledger, "a")
    await ledger.record_vend(vend_draft(before, tid=TID, expected=None), actor="saga")
    (change, _) = await ledger.plan_key_rotation(ROTATION, meters=[METER, OTHER], actor="op")
    assert change.rollover
    crossing = await paid_purchase(ledger, "b")
    await ledger.record_vend(
        vend_draft(crossing, tid=TID - 5, expected=TID, change_id=change.change_id, kcts=KCT),
        actor="saga",
    )
    again = await paid_purchase(ledger, "c")
    outcome = await ledger.record_vend(vend_draft(again, tid=TID, expected=TID - 5), actor="saga")
    assert not outcome.replayed
    assert outcome.vend.tid == TID
    meter = await ledger.get_meter(METER)
    assert (meter.base_date, meter.last_tid) == (2014, TID)
    vends = [await ledger.get_vend(p.purchase_id) for p in (before, crossing, again)]
    assert [v.tid for v in vends if v is not None] == [TID, TID - 5, TID]


# --- the upgrade to schema 0004 on a populated ledger ------------------------------------------

Scripts = Callable[[], list[tuple[int, str, str]]]
Row = tuple[Any, ...]


class Database:
    """One SQLite file or PostgreSQL schema, opened as a ledger at will, and raw SQL on it."""

    def __init__(self, backend: str, path: Path, schema: str, clock: FakeClock) -> None:
        self.backend = backend
        self.path = path
        self.schema = schema
        self.clock = clock

    @contextlib.asynccontextmanager
    async def ledger(self, *, before_0004: bool = False) -> AsyncIterator[Ledger]:
        """The ledger; with ``before_0004``, every migration but 0004 (the vends' base date).

        Today's code writes the purchases and key changes, so the later migrations it needs
        (0005 onwards, none of which touches ``vends``) are applied; 0004 then runs on the next
        open, on a ledger holding vends, as an upgrade does.
        """
        module: Any = postgres_backend if self.backend == "postgres" else sqlite_backend
        scripts: Scripts = module.migration_scripts
        with pytest.MonkeyPatch.context() as patch:
            if before_0004:
                patch.setattr(
                    module, "migration_scripts", lambda: [s for s in scripts() if s[0] != 4]
                )
            opening = (
                open_postgres_ledger(POSTGRES_URL, clock=self.clock, schema=self.schema, max_size=2)
                if self.backend == "postgres"
                else open_sqlite_ledger(self.path, clock=self.clock)
            )
            async with opening as opened:
                yield opened

    async def run(self, sql: str) -> list[Row]:
        """Run statements (separated by ``;``); the rows of the last one."""
        statements = [part.strip() for part in sql.split(";") if part.strip()]
        if self.backend == "sqlite":
            with contextlib.closing(sqlite3.connect(self.path)) as conn, conn:
                rows: list[Row] = []
                for statement in statements:
                    rows = [tuple(r) for r in conn.execute(statement).fetchall()]
                return rows
        conn = await asyncpg.connect(POSTGRES_URL, server_settings={"search_path": self.schema})
        try:
            async with conn.transaction():
                records: list[Row] = []
                for statement in statements:
                    records = [tuple(r) for r in await conn.fetch(statement)]
                return records
        finally:
            await conn.close()


@pytest.fixture(params=BACKENDS)
async def database(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[Database]:
    """An empty database of each backend (PostgreSQL: a fresh schema, dropped afterwards)."""
    schema = f"t_{uuid.uuid4().hex}"
    if request.param == "sqlite":
        yield Database("sqlite", tmp_path / "ledger.db", schema, clock)
        return
    try:
        await postgres_backend.create_schema(POSTGRES_URL, schema)
    except LedgerUnavailable as exc:
        message = (
            f"PostgreSQL at {POSTGRES_URL} does not answer ({exc}); start it: {POSTGRES_START}"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield Database("postgres", tmp_path / "unused.db", schema, clock)
    finally:
        await postgres_backend.drop_schema(POSTGRES_URL, schema)


def _vend_rows(rows: Sequence[tuple[str, str, int]]) -> str:
    return ", ".join(
        f"('{pid}', '{drn}', {tid}, '{tid:020d}', 172, 'R', '2025-01-01T00:00:00.000000+00:00')"
        for pid, drn, tid in rows
    )


async def test_upgrading_a_ledger_with_vends_across_a_rollover(database: Database) -> None:
    """Schema 0004 gives each old vend its base date; then a 2014 TID equal to a 1993 one is vended.

    A second equal TID under one base date is still refused. Before 0004 meter A vended 1993
    TID 6,000,000, then a rollover vend (2014 TID 5,999,000) and a 2014 vend; meter B vended
    1993 TID 6,000,000 and never rolled over.
    """
    async with database.ledger(before_0004=True) as ledger:
        await ledger.put_tariff(TARIFF)
        await ledger.put_meter(meter_record(METER, krn=1, base_date=1993))
        await ledger.put_meter(meter_record(OTHER, krn=1, base_date=1993))
        first, crossing, after = [await paid_purchase(ledger, key) for key in "abc"]
        on_other = await paid_purchase(ledger, "d", meter=OTHER)
        (change,) = await ledger.plan_key_rotation(ROTATION, meters=[METER], actor="op")
    rows = [
        (first.purchase_id, METER, TID),
        (crossing.purchase_id, METER, TID - 1000),
        (after.purchase_id, METER, TID - 999),
        (on_other.purchase_id, OTHER, TID),
    ]
    await database.run(
        "INSERT INTO vends (purchase_id, meter, tid, token, units, receipt, created_at)"  # noqa: S608
        f" VALUES {_vend_rows(rows)};"
        f" UPDATE key_changes SET state = 'applied', purchase_id = '{crossing.purchase_id}'"
        f" WHERE change_id = {change.change_id};"
        f" UPDATE meters SET krn = 2, base_date = 2014, last_tid = {TID - 999}"
        f" WHERE drn = '{METER}';"
        f" UPDATE meters SET last_tid = {TID} WHERE drn = '{OTHER}';"
        " UPDATE purchases SET state = 'vended'"
    )

    async with database.ledger() as ledger:
        base_dates = await database.run("SELECT meter, tid, base_date FROM vends ORDER BY vend_id")
        assert base_dates == [
            (METER, TID, 1993),
            (METER, TID - 1000, 2014),
            (METER, TID - 999, 2014),
            (OTHER, TID, 1993),
        ]
        vend = await ledger.get_vend(first.purchase_id)
        assert vend is not None
        assert vend.tid == TID
        assert vend.token == f"{TID:020d}"
        again = await paid_purchase(ledger, "e")
        outcome = await ledger.record_vend(
            vend_draft(again, tid=TID, expected=TID - 999), actor="saga"
        )
        assert not outcome.replayed
        assert (await ledger.get_meter(METER)).last_tid == TID
        twice = await paid_purchase(ledger, "f")
    duplicate = (
        "INSERT INTO vends (purchase_id, meter, tid, token, units, receipt, created_at,"  # noqa: S608
        f" base_date) VALUES ('{twice.purchase_id}', '{METER}', {TID}, '{0:020d}', 1, 'R',"
        " '2025-01-01T00:00:00.000000+00:00', 2014)"
    )
    with pytest.raises((sqlite3.IntegrityError, asyncpg.UniqueViolationError)):
        await database.run(duplicate)


async def test_0004_keeps_every_index_and_trigger_on_vends(tmp_path: Path) -> None:
    """The SQLite rebuild of vends keeps the indexes, triggers and foreign keys it had before.

    (Its constraints' own indexes are rebuilt from the new table's definition.)
    """
    database = Database("sqlite", tmp_path / "ledger.db", "", FakeClock())
    query = (
        "SELECT type, name, sql FROM sqlite_master WHERE tbl_name = 'vends'"
        " AND type IN ('index', 'trigger') AND sql IS NOT NULL ORDER BY name"
    )
    async with database.ledger(before_0004=True):
        pass
    before = await database.run(query)
    async with database.ledger():
        pass
    assert await database.run(query) == before
    foreign_keys = await database.run("SELECT * FROM pragma_foreign_key_list('vends')")
    assert sorted((row[2], row[3], row[4]) for row in foreign_keys) == [
        ("meters", "meter", "drn"),
        ("purchases", "purchase_id", "purchase_id"),
    ]
