"""PostgreSQL's vend path: the TID is taken under the meter's row lock, in the vend's transaction.

Two saga instances, each with its own pool (two gateway processes as far as PostgreSQL can
tell) and no shared in-process lock, vend for the same few meters at once: every purchase is
vended once, no compare-and-set is ever lost (``tid_conflicts`` stays 0), and each meter takes
its tokens in TID order. A vend that dies while it holds the meter's lock leaves nothing (the
TID it was making goes back with its transaction), and a gap in TIDs would be harmless.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
from collections import defaultdict

import asyncpg  # type: ignore[import-untyped]
import pytest

from gateway.ledger import (
    ConfirmedPayment,
    MeterRecord,
    Minted,
    NoticeRecord,
    PurchaseState,
    VendDraft,
    VendOutcome,
)
from gateway.ledger.postgres import PostgresLedger, open_postgres_ledger
from gateway.sts import MeterEmulator, Verdict
from gateway.vending import Vending
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

pytestmark = pytest.mark.postgres

URL = "postgresql://127.0.0.1:5432/test"


async def _open_paid(
    vending: Vending, provider: FakeProvider, drns: list[str], n: int
) -> list[str]:
    ids: list[str] = []
    for i in range(n):
        purchase = await vending.start_purchase(
            channel="ussd",
            phone=PHONE,
            meter=drns[i % len(drns)],
            amount=AMOUNT_FOR_TESTS,
            idempotency_key=f"k-{i}",
        )
        purchase = await vending.request_payment(purchase.purchase_id)
        assert purchase.provider_reference is not None
        provider.settle(purchase.provider_reference, amount=AMOUNT_FOR_TESTS)
        ids.append(purchase.purchase_id)
    return ids


async def _vends(schema: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(URL)
    try:
        return list(
            await conn.fetch(
                f"SELECT purchase_id, meter, tid, token FROM {schema}.vends ORDER BY vend_id"  # noqa: S608
            )
        )
    finally:
        await conn.close()


def _assert_meters_accept(vends: list[asyncpg.Record]) -> None:
    by_meter: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for row in vends:
        by_meter[row["meter"]].append((row["tid"], row["token"]))
    for drn, issued in by_meter.items():
        tids = [tid for tid, _ in issued]
        assert tids == sorted(set(tids)), f"meter {drn}: TIDs {tids} not increasing in vend order"
        emulator = MeterEmulator.for_profile(profile_of(meter_record(drn)), VENDING_KEY)
        for tid, token in issued:
            assert emulator.enter(token).verdict is Verdict.ACCEPTED, f"meter {drn} TID {tid}"


async def test_two_instances_vend_one_meter_set_without_a_tid_conflict(schema: str) -> None:
    """120 purchases on 3 meters, confirmed 3 times each across two instances: 0 lost CAS."""
    clock = FakeClock()
    provider = FakeProvider()
    drns = [make_drn(900 + i) for i in range(3)]
    async with (
        open_postgres_ledger(URL, schema=schema, clock=clock, max_size=6) as first,
        open_postgres_ledger(URL, schema=schema, clock=clock, max_size=6, migrate=False) as second,
    ):
        assert first.mints_under_lock
        await seed(first, drns)
        sagas = [build_vending(first, provider, clock), build_vending(second, provider, clock)]
        ids = await _open_paid(sagas[0], provider, drns, 120)
        calls = [(saga, pid) for pid in ids for saga in (sagas[0], sagas[1], sagas[0])]
        random.Random(3).shuffle(calls)
        await asyncio.gather(*(saga.confirm(pid) for saga, pid in calls))
        states = {(await first.get_purchase(pid)).state for pid in ids}
        assert states == {PurchaseState.VENDED}
        assert sagas[0].tid_conflicts == sagas[1].tid_conflicts == 0
    vends = await _vends(schema)
    assert sorted(row["purchase_id"] for row in vends) == sorted(ids)
    _assert_meters_accept(vends)


async def test_a_vend_that_dies_holding_the_meter_lock_leaves_nothing(schema: str) -> None:
    """A vend whose connection drops while it holds the meter's lock leaves nothing.

    All of it rolls back (the TID included), the other instance's vend of that meter goes on,
    and the dead one, run again, is vended once with the next TID: no TID used twice, none lost.
    """
    clock = FakeClock()
    provider = FakeProvider()
    drn = make_drn(950)
    async with (
        open_postgres_ledger(URL, schema=schema, clock=clock, max_size=4) as first,
        open_postgres_ledger(URL, schema=schema, clock=clock, max_size=4, migrate=False) as second,
    ):
        await seed(first, [drn])
        sagas = [build_vending(first, provider, clock), build_vending(second, provider, clock)]
        ids = await _open_paid(sagas[0], provider, [drn], 2)
        record_vend = first.record_vend
        holding = asyncio.Event()
        died: list[int] = []

        async def dying_record_vend(
            draft: VendDraft, *, actor: str, payment: ConfirmedPayment | None = None
        ) -> VendOutcome:
            mint = draft.mint
            assert mint is not None

            async def mint_then_die(locked: MeterRecord) -> Minted:
                made = await mint(locked)
                if not died:
                    died.append(made.tid)
                    holding.set()
                    await asyncio.sleep(0.2)  # the other instance waits on the row lock now
                    raise ConnectionResetError("the connection dropped mid-vend")
                return made

            return await record_vend(
                dataclasses.replace(draft, mint=mint_then_die), actor=actor, payment=payment
            )

        first.record_vend = dying_record_vend  # type: ignore[method-assign]
        first_vend = asyncio.create_task(sagas[0].confirm(ids[0]))
        await holding.wait()
        await sagas[1].confirm(ids[1])
        await first_vend
        assert first.retries >= 1
    vends = await _vends(schema)
    assert [row["purchase_id"] for row in vends] == [ids[1], ids[0]]
    # The dead vend's TID was made again by the other instance's vend: never stored twice.
    assert vends[0]["tid"] == died[0]
    assert vends[1]["tid"] > vends[0]["tid"]
    _assert_meters_accept(vends)


async def test_a_gap_in_tids_is_harmless(schema: str) -> None:
    """A gap in TIDs is harmless.

    Should a TID be skipped (a reservation that died, an operator's repair), the meter still
    takes the next token: TIDs must increase, not be consecutive.
    """
    clock = FakeClock()
    provider = FakeProvider()
    drn = make_drn(970)
    async with open_postgres_ledger(URL, schema=schema, clock=clock, max_size=2) as ledger:
        assert isinstance(ledger, PostgresLedger)
        await seed(ledger, [drn])
        saga = build_vending(ledger, provider, clock)
        first, second = await _open_paid(saga, provider, [drn], 2)
        await saga.confirm(first)
        vend = await ledger.get_vend(first)
        assert vend is not None
        conn = await asyncpg.connect(URL)
        try:  # a TID taken and never used
            await conn.execute(
                f"UPDATE {schema}.meters SET last_tid = last_tid + 7 WHERE drn = $1",  # noqa: S608
                drn,
            )
        finally:
            await conn.close()
        await saga.confirm(second)
    vends = await _vends(schema)
    assert vends[1]["tid"] >= vends[0]["tid"] + 8
    _assert_meters_accept(vends)


def _notice(reference: str, raw: bytes) -> NoticeRecord:
    return NoticeRecord(
        provider="fakepay",
        reference=reference,
        claimed_state="succeeded",
        amount=AMOUNT_FOR_TESTS,
        payer=PHONE,
        receipt="RCPT1",
        raw=raw,
        payload_hash=hashlib.sha256(raw).hexdigest(),
    )


async def test_copies_of_a_notice_racing_on_two_instances_keep_it_once(schema: str) -> None:
    """30 copies of a purchase's first notice at once on two pools, plus 3 altered copies.

    The one-statement notice path and the full path behind it agree: exactly one copy is
    kept as the first, the other exact copies are duplicates, every altered copy is a payload
    conflict, and every copy has its audit line.
    """
    clock = FakeClock()
    provider = FakeProvider()
    drn = make_drn(980)
    async with (
        open_postgres_ledger(URL, schema=schema, clock=clock, max_size=8) as first,
        open_postgres_ledger(URL, schema=schema, clock=clock, max_size=8, migrate=False) as second,
    ):
        await seed(first, [drn])
        saga = build_vending(first, provider, clock)
        (purchase_id,) = await _open_paid(saga, provider, [drn], 1)
        reference = provider.reference_for(purchase_id)
        genuine, altered = _notice(reference, b'{"ok": 1}'), _notice(reference, b'{"ok": 2}')
        copies = [genuine] * 30 + [altered] * 3
        random.Random(5).shuffle(copies)
        outcomes = await asyncio.gather(
            *(
                (first, second)[i % 2].record_notice(copy, actor="callback:fakepay")
                for i, copy in enumerate(copies)
            )
        )
        timeline = await first.timeline(purchase_id)
    kept = [o for o, c in zip(outcomes, copies, strict=True) if not o.is_duplicate]
    assert len(kept) == 1
    assert {o.purchase_id for o in outcomes} == {purchase_id}
    conflicts = sum(o.payload_conflict for o in outcomes)
    # Copies conflict with whichever payload was kept first: the genuine one (the 3 altered
    # copies conflict), or an altered copy that won the race (the 30 genuine copies conflict,
    # the 2 other altered ones are duplicates of it).
    winner = copies[[o.is_duplicate for o in outcomes].index(False)]
    assert conflicts == sum(copy.payload_hash != winner.payload_hash for copy in copies)
    notices = [e for e in timeline if e.kind in {"payment_notice", "notice_payload_conflict"}]
    assert len(notices) == len(copies)
