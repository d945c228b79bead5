"""Fixtures for the vendor API: a gateway's vendor routes on loopback over a real ledger."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.vendor.vendor_support import BACKENDS, VendorWorld, vendor_world


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[VendorWorld]:
    """The vendor API on SQLite: vendor ``shop`` (till-1, 2 % commission, KES 1,000 float)."""
    async with vendor_world(tmp_path, "sqlite") as opened:
        yield opened


@pytest.fixture(params=BACKENDS)
async def both(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[VendorWorld]:
    """The same on every ledger backend."""
    async with vendor_world(tmp_path, request.param) as opened:
        yield opened
