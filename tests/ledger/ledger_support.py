"""Helpers shared by the ledger tests: a hand-moved clock, the tariff, meter records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.ledger import MeterNumber, MeterRecord
from gateway.tariff import Tariff

#: The ledger backends every contract test runs on (PostgreSQL on 127.0.0.1:5432).
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
POSTGRES_URL = "postgresql://127.0.0.1:5432/test"
POSTGRES_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


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
