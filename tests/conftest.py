"""Suite-wide settings.

Hypothesis's default 200 ms deadline per example is a timed test: on a shared 2-core machine a
busy moment fails a correct codec. Speed is measured in ``bench/``, so the suite's profile turns
the deadline and the too-slow health check off; every other health check stays on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, settings

from tests.support.postgres import fresh_schema

settings.register_profile(
    "sts-gateway", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("sts-gateway")


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    """A fresh PostgreSQL schema, dropped afterwards (``tests/support/postgres.py``)."""
    async for name in fresh_schema():
        yield name
