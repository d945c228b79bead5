"""The process the vendor crash test kills: the vendor API on a ledger, on a given port.

Run as ``python -m tests.vendor.crash_server LEDGER PORT`` from the repository root; ``LEDGER``
is a SQLite file, or ``postgres:SCHEMA`` (a schema of the test PostgreSQL). Prints
``ready`` once it serves, then serves vends (with a short lease, so a request a kill interrupted
is resumed quickly) until it is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import structlog
from aiohttp import web

sys.path.insert(0, str(Path(__file__).parents[1] / "vending"))

from gateway.ledger import Ledger, open_postgres_ledger, open_sqlite_ledger
from gateway.ledger.vendor import VendorLedger
from gateway.sts import LocalTokenEngine
from gateway.vending import SagaPolicy, Vending
from gateway.vendor.service import VendorService
from gateway.web.vendor import vendor_routes
from tests.ledger.ledger_support import POSTGRES_URL
from tests.vending.vending_support import VENDING_KEY, FakeProvider
from tests.vendor.vendor_support import MASTER_KEY

LEASE_S = 1.0


@contextlib.asynccontextmanager
async def open_crash_ledger(where: str) -> AsyncIterator[Ledger]:
    """The ledger ``where`` names: a SQLite file, or ``postgres:SCHEMA``."""
    if where.startswith("postgres:"):
        schema = where.removeprefix("postgres:")
        async with open_postgres_ledger(POSTGRES_URL, schema=schema, max_size=8) as ledger:
            yield ledger
        return
    async with open_sqlite_ledger(Path(where)) as ledger:
        yield ledger


async def serve(where: str, port: int) -> None:
    """Serve until killed."""
    async with open_crash_ledger(where) as ledger:
        provider = FakeProvider()
        vending = Vending(
            ledger=ledger,
            engine=LocalTokenEngine([VENDING_KEY]),
            providers={provider.name: provider},
            default_provider=provider.name,
            policy=SagaPolicy(),
        )
        service = VendorService(
            vending,
            ledger,
            cast("VendorLedger", ledger),
            lease_s=LEASE_S,
            engine_wait_s=30,
            master_key=MASTER_KEY,
        )
        app = web.Application()
        app.add_routes(vendor_routes(service))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print("ready", flush=True)  # noqa: T201 - the parent waits for it
        await asyncio.Event().wait()


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))
