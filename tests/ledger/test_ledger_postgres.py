"""What only the PostgreSQL ledger has to show: migrations, schema parity, retries, several writers.

The behaviour every backend shares is the contract suite (``test_ledger_contract.py``), which runs
on PostgreSQL through the ``ledger`` fixture. Here each test gets a fresh schema of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from gateway.ledger import (
    ConfirmedPayment,
    DuplicateError,
    Ledger,
    LedgerError,
    LedgerUnavailable,
    MeterNumber,
    PurchaseDraft,
    PurchaseId,
    PurchaseState,
    TidConflict,
    VendDraft,
    new_purchase_id,
    open_ledger,
    open_sqlite_ledger,
)
from gateway.ledger.postgres import (
    PostgresLedger,
    RetryPolicy,
    migration_scripts,
    open_postgres_ledger,
    translate_error,
)
from gateway.ledger.sqlite import migration_scripts as sqlite_migration_scripts
from gateway.money import Money
from gateway.phone import Msisdn
from tests.ledger.ledger_support import TARIFF, FakeClock, meter_record

pytestmark = pytest.mark.postgres

URL = "postgresql://127.0.0.1:5432/test"
START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
METER = MeterNumber("01234567890")
PHONE = Msisdn("+254712345678")


class Sleeps:
    """A ``sleep`` seam that records the waits instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        """Record ``seconds``."""
        self.waits.append(seconds)


def no_wait_policy(sleeps: Sleeps, *, attempts: int = 5) -> RetryPolicy:
    """A retry policy with the jitter pinned to its maximum and no real waiting."""
    return RetryPolicy(
        attempts=attempts, base_delay_s=0.01, max_delay_s=0.03, random=lambda: 1.0, sleep=sleeps
    )


async def seeded(ledger: PostgresLedger) -> PostgresLedger:
    """The ledger with the domestic tariff and meter 01234567890."""
    await ledger.put_tariff(TARIFF)
    await ledger.put_meter(meter_record(METER))
    return ledger


def draft(key: str) -> PurchaseDraft:
    """A purchase draft for METER."""
    return PurchaseDraft(
        purchase_id=new_purchase_id(),
        channel="ussd",
        phone=PHONE,
        meter=METER,
        amount=Money(5000, "KES"),
        units=172,
        tariff_id=TARIFF.tariff_id,
        idempotency_key=key,
        provider="fakepay",
    )


async def paid(ledger: PostgresLedger, key: str) -> str:
    """A paid purchase's id."""
    purchase = await ledger.open_purchase(draft(key), actor="t")
    await ledger.mark_paid(
        purchase.purchase_id,
        ConfirmedPayment(
            provider="fakepay",
            reference="R" + key,
            amount=Money(5000, "KES"),
            payer=PHONE,
            receipt=None,
        ),
        actor="t",
    )
    return purchase.purchase_id


def vend(purchase_id: str, *, tid: int, expected: int | None) -> VendDraft:
    """A vend draft for METER."""
    return VendDraft(
        purchase_id=purchase_id,  # type: ignore[arg-type]
        meter=METER,
        tid=tid,
        expected_last_tid=expected,
        token="1234567890123456789" + str(tid % 10),
        units=172,
        receipt=None,
        recipient=PHONE,
        message="token",
    )


async def test_open_ledger_dispatches_postgres_urls(schema: str) -> None:
    """``database_url`` = postgresql://…?search_path=S opens the PostgreSQL ledger in schema S."""
    async with open_ledger(f"{URL}?search_path={schema}") as ledger:
        assert isinstance(ledger, PostgresLedger)
        await ledger.put_tariff(TARIFF)
    conn = await asyncpg.connect(URL)
    try:
        found = await conn.fetchval(f"SELECT count(*) FROM {schema}.tariffs")  # noqa: S608
    finally:
        await conn.close()
    assert found == 1


async def test_migrations_are_numbered_like_sqlite() -> None:
    """Every SQLite migration has a PostgreSQL one with the same number and name, and back."""
    assert [(v, n) for v, n, _ in migration_scripts()] == [
        (v, n) for v, n, _ in sqlite_migration_scripts()
    ]


async def test_schema_has_the_tables_and_columns_of_sqlite(schema: str, tmp_path: Path) -> None:
    """Both backends' migrations produce the same tables with the same columns."""
    async with open_sqlite_ledger(tmp_path / "l.db"):
        pass
    with sqlite3.connect(tmp_path / "l.db") as lite:
        tables = [r[0] for r in lite.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        sqlite_columns = {
            table: {r[1] for r in lite.execute(f"PRAGMA table_info({table})")} for table in tables
        }
    async with open_postgres_ledger(URL, schema=schema):
        pass
    conn = await asyncpg.connect(URL)
    try:
        rows = await conn.fetch(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = $1",
            schema,
        )
    finally:
        await conn.close()
    pg_columns: dict[str, set[str]] = {}
    for row in rows:
        pg_columns.setdefault(row["table_name"], set()).add(row["column_name"])
    assert pg_columns == sqlite_columns


async def test_instances_starting_together_migrate_once(schema: str) -> None:
    """Three instances opening one fresh schema at once apply each migration exactly once."""
    opened: list[list[str]] = []

    async def start() -> None:
        async with open_postgres_ledger(URL, schema=schema, migrate=False) as ledger:
            opened.append(await ledger.migrate())

    await asyncio.gather(start(), start(), start())
    assert sorted(len(applied) for applied in opened) == [0, 0, len(migration_scripts())]
    conn = await asyncpg.connect(URL, server_settings={"search_path": schema})
    try:
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
    finally:
        await conn.close()
    assert versions == [v for v, _, _ in migration_scripts()]


async def test_events_are_append_only_in_the_database(schema: str) -> None:
    """The database itself refuses UPDATE, DELETE and TRUNCATE on events."""
    async with open_postgres_ledger(URL, schema=schema) as ledger:
        await ledger.append_event(None, "probe", actor="test")
    conn = await asyncpg.connect(URL, server_settings={"search_path": schema})
    try:
        for sql in ("UPDATE events SET kind = 'x'", "DELETE FROM events", "TRUNCATE events"):
            with pytest.raises(asyncpg.exceptions.RaiseError, match="append-only") as caught:
                await conn.execute(sql)
            assert isinstance(translate_error(caught.value), LedgerError)
        assert await conn.fetchval("SELECT count(*) FROM events") == 1
    finally:
        await conn.close()


async def test_a_transient_server_error_is_retried_inside_the_ledger(schema: str) -> None:
    """A deadlock and a serialization failure raised by the server are retried, then succeed."""
    sleeps = Sleeps()
    async with open_postgres_ledger(URL, schema=schema, retry=no_wait_policy(sleeps)) as ledger:
        codes = ["40P01", "40001"]
        runs = 0

        async def op(conn: Any) -> int:
            nonlocal runs
            runs += 1
            if codes:
                code = codes.pop(0)
                await conn.execute(
                    f"DO $$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = '{code}'; END $$"
                )
            return int(await conn.fetchval("SELECT 1"))

        assert await ledger._with_retry(op) == 1
    assert runs == 3
    assert sleeps.waits == [0.01, 0.02]


async def test_retries_are_capped_and_end_in_ledger_unavailable(schema: str) -> None:
    """A failure that keeps coming back ends as LedgerUnavailable after the capped backoff."""
    sleeps = Sleeps()
    async with open_postgres_ledger(
        URL, schema=schema, retry=no_wait_policy(sleeps, attempts=5)
    ) as ledger:

        async def op(conn: Any) -> None:
            await conn.execute(
                "DO $$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = '40001'; END $$"
            )

        with pytest.raises(LedgerUnavailable):
            await ledger._with_retry(op)
    assert sleeps.waits == [0.01, 0.02, 0.03, 0.03]


async def test_a_unique_violation_is_not_retried_and_becomes_duplicate_error(schema: str) -> None:
    """A constraint refusing a row is answered at once with DuplicateError."""
    sleeps = Sleeps()
    async with open_postgres_ledger(URL, schema=schema, retry=no_wait_policy(sleeps)) as ledger:

        async def op(conn: Any) -> None:
            await conn.execute("INSERT INTO customer_preferences VALUES ('+1', 'en', now())")
            await conn.execute("INSERT INTO customer_preferences VALUES ('+1', 'sw', now())")

        with pytest.raises(DuplicateError) as caught:
            await ledger._with_retry(op)
        assert caught.value.constraint == "customer_preferences_pkey"
        assert await ledger.get_language("+1") is None
    assert sleeps.waits == []


@pytest.mark.parametrize(
    ("sqlstate", "expected", "runs"),
    [
        ("23505", DuplicateError, 1),  # unique_violation
        ("23503", LedgerError, 1),  # foreign_key_violation
        ("23514", LedgerError, 1),  # check_violation
        ("53100", LedgerUnavailable, 1),  # disk_full: not worth retrying at once
        ("57014", LedgerUnavailable, 1),  # query_canceled (statement timeout)
        ("25006", LedgerUnavailable, 1),  # read_only_sql_transaction: a standby
        ("53300", LedgerUnavailable, 3),  # too_many_connections: retried
        ("40P01", LedgerUnavailable, 3),  # deadlock_detected: retried
        ("42P01", LedgerError, 1),  # undefined_table: a bug, not an outage
    ],
)
async def test_server_errors_become_ledger_errors(
    schema: str, sqlstate: str, expected: type[LedgerError], runs: int
) -> None:
    """A server error reaches the caller as our error, retried first only when transient."""
    sleeps = Sleeps()
    async with open_postgres_ledger(
        URL, schema=schema, retry=no_wait_policy(sleeps, attempts=3), migrate=False
    ) as ledger:
        calls = 0

        async def op(conn: Any) -> None:
            nonlocal calls
            calls += 1
            await conn.execute(
                f"DO $$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = '{sqlstate}'; END $$"
            )

        with pytest.raises(expected) as caught:
            await ledger._with_retry(op)
    assert type(caught.value) is expected
    assert isinstance(caught.value.__cause__, asyncpg.exceptions.PostgresError)
    assert calls == runs
    assert caught.value.retryable is (expected is LedgerUnavailable)


async def test_a_connection_killed_by_the_server_does_not_reach_the_caller(schema: str) -> None:
    """An instance whose only connection the server terminated carries on."""
    async with open_postgres_ledger(URL, schema=schema, min_size=1, max_size=1) as ledger:
        await seeded(ledger)
        pid = await ledger._pool.fetchval("SELECT pg_backend_pid()")
        admin = await asyncpg.connect(URL)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        purchase = await ledger.open_purchase(draft("after-kill"), actor="t")
        assert (await ledger.get_purchase(purchase.purchase_id)).state is PurchaseState.CREATED
        assert await ledger._pool.fetchval("SELECT pg_backend_pid()") != pid


async def test_no_server_gives_ledger_unavailable_after_the_retries() -> None:
    """Opening a ledger where nothing listens fails with LedgerUnavailable, after backoff."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps = Sleeps()
    with pytest.raises(LedgerUnavailable, match="nothing was written"):
        async with open_postgres_ledger(
            f"postgresql://127.0.0.1:{port}/test", retry=no_wait_policy(sleeps, attempts=3)
        ):
            pass
    assert len(sleeps.waits) == 2


async def two_instances(
    schema: str, body: Callable[[PostgresLedger, PostgresLedger], Awaitable[None]]
) -> None:
    """Run ``body`` with two ledgers (two pools, as two gateway instances) on one schema."""
    clock = FakeClock()
    async with (
        open_postgres_ledger(URL, schema=schema, clock=clock, max_size=5) as first,
        open_postgres_ledger(URL, schema=schema, clock=clock, max_size=5) as second,
    ):
        await seeded(first)
        await body(first, second)


async def test_two_instances_opening_one_key_make_one_purchase(schema: str) -> None:
    """Twenty opens with one idempotency key, spread over two instances, make one purchase."""

    async def body(first: PostgresLedger, second: PostgresLedger) -> None:
        opened = await asyncio.gather(
            *((first, second)[i % 2].open_purchase(draft("race"), actor="t") for i in range(20))
        )
        assert len({p.purchase_id for p in opened}) == 1
        (only,) = await first.find_purchases(phone=PHONE)
        assert [e.kind for e in await second.timeline(only.purchase_id)] == ["purchase_created"]

    await two_instances(schema, body)


async def test_two_instances_vending_one_meter_never_share_a_tid(schema: str) -> None:
    """Vends computed from the same last TID on two instances: one wins, the other must redo."""

    async def body(first: PostgresLedger, second: PostgresLedger) -> None:
        ids = [await paid(first, f"p{i}") for i in range(6)]
        results = await asyncio.gather(
            *(
                (first, second)[i % 2].record_vend(vend(pid, tid=100 + i, expected=None), actor="t")
                for i, pid in enumerate(ids)
            ),
            return_exceptions=True,
        )
        winners = [r for r in results if not isinstance(r, BaseException)]
        assert len(winners) == 1
        assert all(isinstance(r, TidConflict) for r in results if isinstance(r, BaseException))
        assert (await second.get_meter(METER)).last_tid == winners[0].vend.tid

    await two_instances(schema, body)


async def test_duplicate_vends_of_one_purchase_on_two_instances_store_one(schema: str) -> None:
    """The same vend sent to both instances at once is stored once; the other is a replay."""

    async def body(first: PostgresLedger, second: PostgresLedger) -> None:
        pid = await paid(first, "dup")
        outcomes = await asyncio.gather(
            *(
                (first, second)[i % 2].record_vend(vend(pid, tid=7, expected=None), actor="t")
                for i in range(8)
            )
        )
        assert sorted(o.replayed for o in outcomes) == [False] + [True] * 7
        assert len(await first.outbox_for(pid)) == 1

    await two_instances(schema, body)


async def test_two_outbox_workers_claim_disjoint_messages(schema: str) -> None:
    """Workers on two instances claiming at once take every due message exactly once."""

    async def body(first: PostgresLedger, second: PostgresLedger) -> None:
        ids = [await paid(first, f"m{i}") for i in range(30)]
        last: int | None = None
        for i, pid in enumerate(ids):
            await first.record_vend(vend(pid, tid=10 + i, expected=last), actor="t")
            last = 10 + i
        clock = FakeClock()
        lease = clock() + timedelta(seconds=60)
        batches = await asyncio.gather(
            *(
                (first, second)[i % 2].claim_outbox(clock(), lease_until=lease, limit=4)
                for i in range(12)
            )
        )
        claimed = [m.message_id for batch in batches for m in batch]
        assert len(claimed) == len(set(claimed)) == 30

    await two_instances(schema, body)


async def script(ledger: Ledger) -> list[object]:
    """A fixed sequence of ledger calls; what each answered, ids and row numbers left out."""
    seen: list[object] = []
    await ledger.put_tariff(TARIFF)
    await ledger.put_meter(meter_record(METER))
    await ledger.set_language(PHONE, "sw")
    drafts = {
        key: dataclasses.replace(draft(key), purchase_id=PurchaseId(f"P{key}")) for key in "abcde"
    }
    for key, one in drafts.items():
        await ledger.open_purchase(one, actor="t")
        await ledger.attach_payment(one.purchase_id, provider="fakepay", reference=key, actor="t")

    def proof(key: str, amount: int = 5000) -> ConfirmedPayment:
        return ConfirmedPayment(
            provider="fakepay",
            reference=key,
            amount=Money(amount, "KES"),
            payer=PHONE,
            receipt="R" + key,
        )

    async def attempt(call: Awaitable[object]) -> object:
        try:
            return await call
        except LedgerError as exc:
            return (type(exc).__name__, str(exc))

    seen.append(await ledger.vend_context("Pa"))
    last: int | None = None
    for key in "abcd":
        if key == "c":
            await ledger.transition("Pc", PurchaseState.EXPIRED, kind="purchase_expired", actor="t")
        if key == "d":
            seen.append(
                await ledger.mark_payment_mismatch(
                    "Pd", proof("d", 4900), expected=Money(5000, "KES"), actor="t"
                )
            )
        tid = 100 + ord(key)
        outcome = await attempt(
            ledger.record_vend(
                vend(f"P{key}", tid=tid, expected=last), actor="saga", payment=proof(key)
            )
        )
        seen.append(outcome)
        if not isinstance(outcome, tuple):
            last = tid
    seen.append(await attempt(ledger.record_vend(vend("Pa", tid=999, expected=last), actor="saga")))
    seen.append(await attempt(ledger.record_vend(vend("Pb", tid=998, expected=None), actor="saga")))
    stale = vend("Pe", tid=500, expected=None)  # the meter has moved on: nothing of it stays
    seen.append(await attempt(ledger.record_vend(stale, actor="saga", payment=proof("e"))))
    for key in "abcde":
        seen.append(await ledger.vend_context(f"P{key}"))
        seen.append(await ledger.get_payment("fakepay", key))
        seen.append([(e.kind, e.actor, e.data, e.at) for e in await ledger.timeline(f"P{key}")])
        seen.append(
            [(m.kind, m.state, m.recipient, m.attempts) for m in await ledger.outbox_for(f"P{key}")]
        )
    seen.append(await ledger.get_meter(METER))
    return seen


async def test_postgres_answers_a_script_exactly_as_sqlite(schema: str, tmp_path: Path) -> None:
    """The same calls on both backends give equal answers: records, errors, events, messages.

    Covers paying inside the vend (from awaiting, from expired), a refused vend after a
    mismatched payment, replays, and a stale TID that takes the payment recorded with it back.
    """
    async with open_sqlite_ledger(tmp_path / "l.db", clock=FakeClock()) as lite:
        expected = await script(lite)
    async with open_postgres_ledger(URL, schema=schema, clock=FakeClock()) as pg:
        answered = await script(pg)
    assert len(answered) == len(expected)
    for index, (got, want) in enumerate(zip(answered, expected, strict=True)):
        assert got == want, f"call {index}"
