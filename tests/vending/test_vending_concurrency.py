"""Many concurrent, duplicated confirmations: exactly one vend per purchase, TIDs per meter."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections import defaultdict
from pathlib import Path

import pytest

from gateway.ledger import PurchaseState, open_sqlite_ledger
from gateway.sts import MeterEmulator, Verdict
from tests.vending.vending_support import (
    AMOUNT_FOR_TESTS,
    PHONE,
    VENDING_KEY,
    FakeClock,
    FakeProvider,
    build_vending,
    make_drn,
    meter_record,
    profile_of,
    seed,
)


@pytest.mark.slow
async def test_thousand_confirmations_for_hundred_purchases(tmp_path: Path) -> None:
    """1,000 shuffled concurrent notices for 100 purchases on 10 meters in one minute: 100 vends.

    Each purchase gets 10 copies of its callback. There are exactly 100 vends and 100 messages,
    with distinct, increasing TIDs per meter that each meter accepts in order.
    """
    clock = FakeClock()
    provider = FakeProvider()
    drns = [make_drn(100 + i) for i in range(10)]
    path = tmp_path / "ledger.db"
    async with open_sqlite_ledger(path, clock=clock) as ledger:
        await seed(ledger, drns)
        vending = build_vending(ledger, provider, clock)
        purchases = []
        for i in range(100):
            purchase = await vending.start_purchase(
                channel="ussd",
                phone=PHONE,
                meter=drns[i % 10],
                amount=AMOUNT_FOR_TESTS,
                idempotency_key=f"key-{i}",
            )
            purchase = await vending.request_payment(purchase.purchase_id)
            assert purchase.provider_reference is not None
            provider.settle(purchase.provider_reference, amount=AMOUNT_FOR_TESTS)
            purchases.append(purchase)
        notices = [
            provider.notice(p.provider_reference or "") for p in purchases for _ in range(10)
        ]
        random.Random(7).shuffle(notices)
        await asyncio.gather(*(vending.on_payment_notice(n) for n in notices))
        states = {(await ledger.get_purchase(p.purchase_id)).state for p in purchases}
        assert states == {PurchaseState.VENDED}

    with sqlite3.connect(path) as conn:
        vends = conn.execute("SELECT meter, tid, token FROM vends ORDER BY vend_id").fetchall()
        (messages,) = conn.execute("SELECT count(*) FROM outbox WHERE kind = 'token'").fetchone()
    assert len(vends) == 100
    assert messages == 100
    by_meter: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for meter, tid, token in vends:
        by_meter[meter].append((tid, token))
    for drn, issued in by_meter.items():
        tids = [tid for tid, _ in issued]
        assert len(issued) == 10
        assert tids == sorted(set(tids)), f"meter {drn}: TIDs {tids}"
        emulator = MeterEmulator.for_profile(profile_of(meter_record(drn)), VENDING_KEY)
        for _, token in issued:
            assert emulator.enter(token).verdict is Verdict.ACCEPTED


async def test_two_sagas_without_a_shared_lock_still_never_reuse_a_tid(tmp_path: Path) -> None:
    """Two saga instances with no shared lock, one meter: the TID compare-and-set holds.

    They vend 20 purchases at once; the losers of each race read the meter again, and the meter
    gets 20 distinct, increasing TIDs.
    """
    clock = FakeClock()
    provider = FakeProvider()
    drn = make_drn(500)
    path = tmp_path / "ledger.db"
    async with open_sqlite_ledger(path, clock=clock) as ledger:
        await seed(ledger, [drn])
        sagas = [build_vending(ledger, provider, clock) for _ in range(2)]
        ids = []
        for i in range(20):
            purchase = await sagas[0].start_purchase(
                channel="sms",
                phone=PHONE,
                meter=drn,
                amount=AMOUNT_FOR_TESTS,
                idempotency_key=str(i),
            )
            purchase = await sagas[0].request_payment(purchase.purchase_id)
            provider.settle(purchase.provider_reference or "", amount=AMOUNT_FOR_TESTS)
            ids.append(purchase.purchase_id)
        await asyncio.gather(*(sagas[i % 2].confirm(pid) for i, pid in enumerate(ids)))
    with sqlite3.connect(path) as conn:
        tids = [row[0] for row in conn.execute("SELECT tid FROM vends ORDER BY vend_id")]
    assert len(tids) == 20
    assert tids == sorted(set(tids))
