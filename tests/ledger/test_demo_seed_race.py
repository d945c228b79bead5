"""Two instances starting on one empty PostgreSQL database seed one demo vending key, and use it.

Each "instance" has its own pool on the one fresh schema; both read "no key yet" before either
writes (a barrier makes the race certain, not likely), then both seed. Exactly one key is
stored (one ``vending_key_stored`` event), and both token engines hold that key.
"""

from __future__ import annotations

import asyncio
import os
from typing import cast

import pytest

from gateway.app import load_token_engine
from gateway.demo_data import DEMO_KRN, DEMO_METERS, DEMO_SGC, seed_demo
from gateway.ledger import (
    Ledger,
    MeterNumber,
    SealedVendingKey,
    open_postgres_ledger,
    open_vending_key,
)
from gateway.ledger.postgres import PostgresLedger
from gateway.sts import MeterProfile
from tests.ledger.ledger_support import POSTGRES_URL

pytestmark = pytest.mark.postgres


class RacingLedger:
    """An instance's ledger whose first ``vending_keys`` read waits for the other instance's."""

    def __init__(self, ledger: PostgresLedger, barrier: asyncio.Barrier) -> None:
        self._ledger = ledger
        self._barrier = barrier
        self._raced = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._ledger, name)

    async def vending_keys(self) -> list[SealedVendingKey]:
        """The keys; the first read returns only once both instances have read."""
        found = await self._ledger.vending_keys()
        if not self._raced:
            self._raced = True
            await self._barrier.wait()
        return found


async def test_two_instances_seed_one_demo_key_and_both_use_it(schema: str) -> None:
    """Both see an empty database, both seed: one key stored, one event, both engines hold it."""
    master_key = os.urandom(32)
    barrier = asyncio.Barrier(2)
    async with (
        open_postgres_ledger(POSTGRES_URL, schema=schema, max_size=2) as first,
        open_postgres_ledger(POSTGRES_URL, schema=schema, max_size=2) as second,
    ):

        async def start(ledger: PostgresLedger) -> object:
            racing = cast("Ledger", RacingLedger(ledger, barrier))
            await seed_demo(racing, master_key)
            return await load_token_engine(ledger, master_key)

        engines = await asyncio.gather(start(first), start(second))
        stored = await first.vending_keys()
        events = await first.events(kind="vending_key_stored")
        meter = await first.get_meter(MeterNumber(DEMO_METERS[0].drn))
    assert [(k.sgc, k.krn) for k in stored] == [(DEMO_SGC, DEMO_KRN)]
    assert len(events) == 1
    winner = open_vending_key(stored[0], master_key).key
    profile = MeterProfile(
        drn=meter.drn,
        sgc=meter.sgc,
        tariff_index=meter.tariff_index,
        krn=meter.krn,
        dkga=meter.dkga,
        base_date=meter.base_date,
    )
    for engine in engines:
        assert engine._vending_key(profile).key == winner  # type: ignore[attr-defined]
