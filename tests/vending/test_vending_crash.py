"""A real crash test: SIGKILL a process running the saga, again and again, then recover."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gateway.ledger import open_sqlite_ledger
from tests.vending.crash_child import build

ROOT = Path(__file__).resolve().parents[2]
KILLS = 50


def check(path: Path) -> int:
    """The invariants after recovery; returns the number of vends."""
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        unvended = conn.execute(
            "SELECT count(*) FROM payments pay JOIN purchases p ON p.purchase_id = pay.purchase_id"
            " LEFT JOIN vends v ON v.purchase_id = p.purchase_id"
            " WHERE pay.state = 'succeeded' AND v.vend_id IS NULL"
        ).fetchone()[0]
        paid_left = conn.execute("SELECT count(*) FROM purchases WHERE state = 'paid'").fetchone()[
            0
        ]
        per_vend = conn.execute(
            "SELECT count(o.message_id) FROM vends v LEFT JOIN outbox o"
            " ON o.purchase_id = v.purchase_id AND o.kind = 'token' GROUP BY v.vend_id"
        ).fetchall()
        vends = conn.execute("SELECT meter, tid FROM vends ORDER BY vend_id").fetchall()
        vend_states = conn.execute(
            "SELECT count(*) FROM vends v JOIN purchases p ON p.purchase_id = v.purchase_id"
            " WHERE p.state NOT IN ('vended', 'delivered')"
        ).fetchone()[0]
    assert unvended == 0, "a confirmed payment has no token"
    assert paid_left == 0, "a paid purchase was left unvended"
    assert all(count == 1 for (count,) in per_vend), "a token without exactly one message"
    assert vend_states == 0
    last: dict[str, int] = {}
    for meter, tid in vends:
        assert tid > last.get(meter, -1), f"meter {meter}: TID {tid} after {last.get(meter)}"
        last[meter] = tid
    return len(vends)


async def recover(path: Path) -> int:
    """What a restart does: open the ledger and sweep once; returns what the sweep finished."""
    async with open_sqlite_ledger(path) as ledger:
        _, sweeper = build(ledger)
        report = await sweeper.sweep_once()
    return report.vended + report.checked


def run_child(path: Path, run: str, progress_lines: int) -> None:
    """Start the child, let it finish ``progress_lines`` purchases, then SIGKILL it."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.vending.crash_child", str(path), run],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    watchdog = threading.Timer(60, child.kill)  # a hung child fails the test, never hangs it
    watchdog.start()
    assert child.stdout is not None
    lines = [child.stdout.readline()]
    while lines[-1] and len(lines) <= progress_lines:
        lines.append(child.stdout.readline())
    child.send_signal(signal.SIGKILL)
    _, stderr = child.communicate()
    watchdog.cancel()
    assert lines[0].strip() == "ready", stderr
    assert all(lines), f"the child ended on its own: {stderr}"
    assert child.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    """After each of 50 SIGKILLs and one sweep, every paid purchase has exactly one token.

    Every token has exactly one message, and TIDs per meter only increase.
    """
    path = tmp_path / "crash.db"
    rng = random.Random(62055)
    vends = recovered = 0
    for kill in range(KILLS):
        run_child(path, f"run{kill}", rng.randrange(0, 25))
        recovered += asyncio.run(recover(path))
        vends = check(path)
    assert vends > KILLS
    assert recovered > 0, "the kills never interrupted a purchase: the test proved nothing"
