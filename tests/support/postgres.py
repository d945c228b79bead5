"""The suite's PostgreSQL: where it is, how to start it, and a fresh schema per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest

from gateway.ledger import LedgerUnavailable
from gateway.ledger.postgres import create_schema, drop_schema

POSTGRES_URL = "postgresql://127.0.0.1:5432/test"
POSTGRES_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


async def fresh_schema() -> AsyncIterator[str]:
    """A fresh, empty schema, dropped afterwards; skipped (failed under CI) without a server.

    The ``schema`` fixture of every test that needs one (``tests/conftest.py``).
    """
    name = f"t_{uuid.uuid4().hex}"
    try:
        await create_schema(POSTGRES_URL, name)
    except LedgerUnavailable as exc:
        message = f"PostgreSQL at {POSTGRES_URL} does not answer ({exc}); start: {POSTGRES_START}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    yield name
    await drop_schema(POSTGRES_URL, name)
