"""Fixtures for the ledger contract: one ``ledger`` per backend, seeded reference data, a clock."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.ledger import Ledger, LedgerUnavailable, open_postgres_ledger, open_sqlite_ledger
from gateway.ledger.postgres import create_schema, drop_schema
from tests.ledger.ledger_support import (
    BACKENDS,
    POSTGRES_START,
    POSTGRES_URL,
    TARIFF,
    FakeClock,
    meter_record,
)


@contextlib.asynccontextmanager
async def postgres_test_ledger(clock: FakeClock) -> AsyncIterator[Ledger]:
    """A PostgreSQL ledger in a fresh schema of its own, dropped afterwards.

    No server: the test is skipped with how to start one, except under CI (``CI`` set), which
    never skips.
    """
    schema = f"t_{uuid.uuid4().hex}"
    try:
        await create_schema(POSTGRES_URL, schema)
    except LedgerUnavailable as exc:
        message = (
            f"PostgreSQL at {POSTGRES_URL} does not answer ({exc}); start it: {POSTGRES_START}"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        async with open_postgres_ledger(
            POSTGRES_URL, clock=clock, schema=schema, max_size=4
        ) as opened:
            yield opened
    finally:
        await drop_schema(POSTGRES_URL, schema)


@pytest.fixture
def clock() -> FakeClock:
    """A hand-moved clock shared by the ledger and the test."""
    return FakeClock()


@pytest.fixture(params=BACKENDS)
async def ledger(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[Ledger]:
    """A fresh, migrated ledger with the domestic tariff and meters 01234567890 … 01234567892."""
    opening = (
        postgres_test_ledger(clock)
        if request.param == "postgres"
        else open_sqlite_ledger(tmp_path / "ledger.db", clock=clock)
    )
    async with opening as opened:
        await opened.put_tariff(TARIFF)
        for drn in ("01234567890", "01234567891", "01234567892"):
            await opened.put_meter(meter_record(drn))
        yield opened
