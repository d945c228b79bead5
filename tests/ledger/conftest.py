"""Fixtures for the ledger contract: one ``ledger`` per backend, seeded reference data, a clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.ledger import Ledger, MeterNumber, MeterRecord, open_sqlite_ledger
from gateway.tariff import Tariff

BACKENDS = ["sqlite"]  # issue 7 adds "postgres" here, with the same tests


class FakeClock:
    """A clock the test moves by hand (UTC, aware)."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 3, 14, 9, 26, 53, tzinfo=UTC)

    def __call__(self) -> datetime:
        """The current fake time."""
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        self.now += timedelta(seconds=seconds)


TARIFF = Tariff(
    tariff_id="domestic",
    name="Domestic",
    currency="KES",
    price_per_kwh_minor=2500,
    vat_basis_points=1600,
    fixed_charge_minor=0,
    min_purchase_minor=1000,
    max_purchase_minor=3_500_000,
)


def meter_record(drn: str, **changes: object) -> MeterRecord:
    """A registered meter on the domestic tariff."""
    fields: dict[str, object] = {
        "drn": MeterNumber(drn),
        "customer_name": "Wanjiru Kamau",
        "area": "Kibera",
        "sgc": "123457",
        "tariff_index": "01",
        "krn": 1,
        "tariff_id": TARIFF.tariff_id,
    }
    fields.update(changes)
    return MeterRecord(**fields)  # type: ignore[arg-type]


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
