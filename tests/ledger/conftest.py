"""Fixtures for the ledger contract: one ``ledger`` per backend, seeded reference data, a clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from ledger_support import TARIFF, FakeClock, meter_record

from gateway.ledger import Ledger, open_sqlite_ledger

BACKENDS = ["sqlite"]  # issue 7 adds "postgres" here, with the same tests


@pytest.fixture
def clock() -> FakeClock:
    """A hand-moved clock shared by the ledger and the test."""
    return FakeClock()


@pytest.fixture(params=BACKENDS)
async def ledger(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[Ledger]:
    """A fresh, migrated ledger with the domestic tariff and meters 01234567890 … 01234567892."""
    assert request.param == "sqlite"
    async with open_sqlite_ledger(tmp_path / "ledger.db", clock=clock) as opened:
        await opened.put_tariff(TARIFF)
        for drn in ("01234567890", "01234567891", "01234567892"):
            await opened.put_meter(meter_record(drn))
        yield opened
