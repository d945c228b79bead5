"""Helpers shared by the ledger tests: a hand-moved clock, the tariff, meter records."""

from __future__ import annotations

import pytest

from gateway.ledger import MeterNumber, MeterRecord
from gateway.tariff import Tariff
from tests.support.clock import UtcClock

FakeClock = UtcClock  # the suite's one fake clock (tests/support/clock.py)

#: The ledger backends every contract test runs on (PostgreSQL on 127.0.0.1:5432).
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
POSTGRES_URL = "postgresql://127.0.0.1:5432/test"
POSTGRES_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"

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
