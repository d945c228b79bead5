"""Fixtures for the saga: a real ledger file, the real local token engine, a fake provider."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.ledger import open_sqlite_ledger
from gateway.sts import LocalTokenEngine
from tests.vending.vending_support import (
    VENDING_KEY,
    FakeClock,
    FakeProvider,
    World,
    build_vending,
    make_drn,
    seed,
)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """A saga on a fresh ledger file with three meters."""
    clock = FakeClock()
    provider = FakeProvider()
    drns = [make_drn(i) for i in range(1, 4)]
    async with open_sqlite_ledger(tmp_path / "ledger.db", clock=clock) as ledger:
        await seed(ledger, drns)
        vending = build_vending(ledger, provider, clock)
        yield World(ledger, vending, provider, clock, LocalTokenEngine([VENDING_KEY]), drns)
