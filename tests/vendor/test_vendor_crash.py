"""kill -9 the vendor API during vends, then restart it: nothing debited is lost.

Every debit has its vend and token, every replay returns the stored answer, and the float's
books balance.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import cast

import aiohttp
import pytest

from gateway.ledger import open_sqlite_ledger
from gateway.ledger.vendor import VendorLedger
from gateway.vendor.service import register_vendor
from gateway.vendor_client import VendorClient
from tests.vending.vending_support import make_drn, seed
from tests.vendor.vendor_support import MASTER_KEY

ROOT = Path(__file__).resolve().parents[2]
KILLS = 5
SALES = 60
DRNS = [make_drn(700 + i) for i in range(4)]


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _start(path: Path, port: int) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.vendor.crash_server", str(path), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line.strip() == "ready", child.stderr.read() if child.stderr else line
    return child


async def _prepare(path: Path) -> tuple[str, str]:
    async with open_sqlite_ledger(path) as ledger:
        await seed(ledger, DRNS)
        vendors = cast("VendorLedger", ledger)
        key = (
            await register_vendor(
                vendors,
                "shop",
                name="Shop",
                currency="KES",
                rate_per_minute=10**6,
                actor="t",
                master_key=MASTER_KEY,
            )
        ).key
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


def _check(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        debit_without_vend = conn.execute(
            "SELECT count(*) FROM float_movements f LEFT JOIN vends v"
            " ON v.purchase_id = f.purchase_id WHERE f.kind = 'debit' AND v.vend_id IS NULL"
        ).fetchone()[0]
        vend_debits = conn.execute(
            "SELECT count(f.movement_id) FROM vends v JOIN purchases p"
            " ON p.purchase_id = v.purchase_id LEFT JOIN float_movements f"
            " ON f.purchase_id = v.purchase_id AND f.kind = 'debit'"
            " WHERE p.channel = 'vendor' GROUP BY v.vend_id"
        ).fetchall()
        balance = conn.execute("SELECT balance_minor FROM vendors").fetchone()[0]
        total = conn.execute("SELECT sum(amount_minor) FROM float_movements").fetchone()[0]
    assert debit_without_vend == 0, "a debit without its vend"
    assert all(count == 1 for (count,) in vend_debits), "a vendor vend without exactly one debit"
    assert balance == total, "the float is not top-ups minus debits plus refunds"


@pytest.mark.slow
def test_kill_9_during_vends_then_restart(tmp_path: Path) -> None:
    """Five kills mid-burst; after each restart every sale is answered, the same as before."""
    path = tmp_path / "vendor.db"
    key = asyncio.run(_prepare(path))
    rng = random.Random(9421)
    port = _port()
    url = f"http://127.0.0.1:{port}"
    before: dict[int, bytes] = {}
    interrupted = 0
    for kill in range(KILLS):
        child = _start(path, port)
        sales = range(kill * SALES, (kill + 1) * SALES)

        async def burst(child: subprocess.Popen[str] = child, sales: range = sales) -> None:
            firing = asyncio.create_task(_fire(url, key, sales))
            await asyncio.sleep(rng.uniform(0.05, 0.6))
            child.send_signal(signal.SIGKILL)
            before.update(await firing)

        asyncio.run(burst())
        child.communicate(timeout=10)
        interrupted += SALES - sum(1 for n in sales if n in before)
        _check(path)
    assert interrupted > 0, "no kill interrupted a sale: the test proved nothing"
    child = _start(path, port)
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
    _check(path)
