"""kill -9 the vendor API during vends, then restart it: nothing debited is lost.

On SQLite and on PostgreSQL: every debit has its vend and token (exactly one debit per vendor
vend), every replay (the same Idempotency-Key) returns the answer given before the kill byte for
byte, every sale is answered after the restart, and the float's books balance.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import pytest

from gateway.ledger import LedgerUnavailable
from gateway.ledger.postgres import create_schema, drop_schema
from gateway.ledger.vendor import VendorLedger
from gateway.vendor.service import register_vendor
from gateway.vendor_client import VendorClient
from tests.ledger.ledger_support import POSTGRES_URL
from tests.vending.vending_support import make_drn, seed
from tests.vendor.crash_server import open_crash_ledger
from tests.vendor.vendor_support import MASTER_KEY

ROOT = Path(__file__).resolve().parents[2]
KILLS = 5
SALES = 60
DRNS = [make_drn(700 + i) for i in range(4)]

DEBIT_WITHOUT_VEND = (
    "SELECT count(*) FROM float_movements f LEFT JOIN vends v"
    " ON v.purchase_id = f.purchase_id WHERE f.kind = 'debit' AND v.vend_id IS NULL"
)
DEBITS_PER_VEND = (
    "SELECT count(f.movement_id) FROM vends v JOIN purchases p"
    " ON p.purchase_id = v.purchase_id LEFT JOIN float_movements f"
    " ON f.purchase_id = v.purchase_id AND f.kind = 'debit'"
    " WHERE p.channel = 'vendor' GROUP BY v.vend_id"
)
BALANCE = "SELECT balance_minor FROM vendors"
TOTAL = "SELECT sum(amount_minor) FROM float_movements"


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _start(where: str, port: int) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.vendor.crash_server", where, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line.strip() == "ready", child.stderr.read() if child.stderr else line
    return child


async def _prepare(where: str) -> tuple[str, str]:
    async with open_crash_ledger(where) as ledger:
        await seed(ledger, DRNS)
        vendors = cast("VendorLedger", ledger)
        key = (
            await register_vendor(
                vendors, "shop", name="Shop", currency="KES", rate_per_minute=10**6, actor="t",
                master_key=MASTER_KEY,
            )
        ).key  # fmt: skip
        await vendors.top_up_float("shop", 10**9, reference="T", actor="t")
    return key.key_id, key.secret


async def _fire(url: str, key: tuple[str, str], sales: range) -> dict[int, bytes]:
    """Send the sales concurrently until the server dies; the answers that arrived."""
    answered: dict[int, bytes] = {}
    async with VendorClient(url, *key, timeout_s=20) as client:

        async def one(n: int) -> None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                reply = await client.vend(DRNS[n % len(DRNS)], 10_000, idempotency_key=f"s{n}")
                if reply.status == 201:
                    answered[n] = reply.body

        await asyncio.gather(*(one(n) for n in sales))
    return answered


def _query(where: str, sql: str) -> list[tuple[Any, ...]]:
    if not where.startswith("postgres:"):
        with sqlite3.connect(where) as conn:
            return list(conn.execute(sql).fetchall())

    async def fetch() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(
            POSTGRES_URL, server_settings={"search_path": where.removeprefix("postgres:")}
        )
        try:
            return [tuple(row) for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(fetch())


def _check(where: str) -> None:
    if not where.startswith("postgres:"):
        assert _query(where, "PRAGMA integrity_check")[0][0] == "ok"
    assert _query(where, DEBIT_WITHOUT_VEND)[0][0] == 0, "a debit without its vend"
    counts = _query(where, DEBITS_PER_VEND)
    assert all(count == 1 for (count,) in counts), "a vendor vend without exactly one debit"
    balance, total = _query(where, BALANCE)[0][0], _query(where, TOTAL)[0][0]
    assert balance == total, "the float is not top-ups minus debits plus refunds"


@contextlib.contextmanager
def _ledger(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield str(tmp_path / "vendor.db")
        return
    schema = f"t_{uuid.uuid4().hex}"
    try:
        asyncio.run(create_schema(POSTGRES_URL, schema))
    except LedgerUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} does not answer ({exc})")
    try:
        yield f"postgres:{schema}"
    finally:
        asyncio.run(drop_schema(POSTGRES_URL, schema))


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_kill_9_during_vends_then_restart(backend: str, tmp_path: Path) -> None:
    """Five kills mid-burst; after each restart every sale is answered, the same as before."""
    with _ledger(backend, tmp_path) as where:
        _kill_and_replay(where)


def _kill_and_replay(where: str) -> None:
    key = asyncio.run(_prepare(where))
    rng = random.Random(9421)
    port = _port()
    url = f"http://127.0.0.1:{port}"
    before: dict[int, bytes] = {}
    interrupted = 0
    for kill in range(KILLS):
        child = _start(where, port)
        sales = range(kill * SALES, (kill + 1) * SALES)

        async def burst(child: subprocess.Popen[str] = child, sales: range = sales) -> None:
            firing = asyncio.create_task(_fire(url, key, sales))
            await asyncio.sleep(rng.uniform(0.05, 0.6))
            child.send_signal(signal.SIGKILL)
            before.update(await firing)

        asyncio.run(burst())
        child.communicate(timeout=10)
        interrupted += SALES - sum(1 for n in sales if n in before)
        _check(where)
    assert interrupted > 0, "no kill interrupted a sale: the test proved nothing"
    child = _start(where, port)
    try:

        async def replay_all() -> dict[int, bytes]:
            after: dict[int, bytes] = {}
            for _ in range(40):  # resumed once the dead run's lease (1 s) ends
                missing = [n for n in range(KILLS * SALES) if n not in after]
                if not missing:
                    break
                async with VendorClient(url, *key) as client:
                    for n in missing:
                        reply = await client.vend(
                            DRNS[n % len(DRNS)], 10_000, idempotency_key=f"s{n}"
                        )
                        if reply.status == 201:
                            after[n] = reply.body
                await asyncio.sleep(0.3)
            return after

        after = asyncio.run(replay_all())
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=10)
    assert len(after) == KILLS * SALES
    for n, body in before.items():
        assert after[n] == body, f"sale {n}: the replay differs from the answer given"
    _check(where)
    # Every sale answered once the dust settled has exactly one vend and one debit.
    assert _query(where, "SELECT count(*) FROM vends")[0][0] == KILLS * SALES
    debits = "SELECT count(*) FROM float_movements WHERE kind = 'debit'"
    assert _query(where, debits)[0][0] == KILLS * SALES
