"""The vendor API's test world: real ledger, real saga and engine, routes on loopback HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.ledger import Ledger, LedgerUnavailable, open_postgres_ledger, open_sqlite_ledger
from gateway.ledger.postgres import create_schema, drop_schema
from gateway.ledger.vendor import VendorLedger
from gateway.sts import LocalTokenEngine, MeterProfile, Token, VendingKey
from gateway.vending import SagaPolicy, Vending
from gateway.vendor.service import LocalRateLimiter, VendorService
from gateway.vendor_client import VendorClient
from gateway.web.vendor import vendor_routes
from tests.ledger.ledger_support import BACKENDS, POSTGRES_URL, FakeClock
from tests.vending.vending_support import VENDING_KEY, FakeProvider, make_drn, seed
from tests.vendor.openapi_check import Exchange, problems

__all__ = ["BACKENDS", "MASTER_KEY", "NEW_KEY", "SlowEngine", "VendorWorld", "unix", "vendor_world"]


def unix(clock: FakeClock) -> Callable[[], float]:
    """The clock's now in Unix seconds, read at each call."""

    def now() -> float:
        return clock.now.timestamp()

    return now


#: The master key the test worlds seal vendor keys under.
MASTER_KEY = bytes(range(32))

#: A second key revision the engine holds, for key changes.
NEW_KEY = VendingKey(sgc="123457", krn=2, dkga=4, base_date=2014, key=bytes.fromhex("5e7a" * 10))


class SlowEngine(LocalTokenEngine):
    """The local engine, ``delay_s`` slower per credit token (an HSM under load)."""

    delay_s = 0.0

    async def credit_token(
        self, meter: MeterProfile, units: int, tid: int, *, subclass: int = 0
    ) -> Token:
        """As the local engine's, after ``delay_s``."""
        await asyncio.sleep(self.delay_s)
        return await super().credit_token(meter, units, tid, subclass=subclass)


@dataclass
class VendorWorld:
    """Everything a vendor API test touches."""

    ledger: Ledger
    vendors: VendorLedger
    vending: Vending
    service: VendorService
    engine: SlowEngine
    clock: FakeClock
    url: str
    key_id: str
    secret: str
    drns: list[str]
    master_key: bytes = MASTER_KEY
    exchanges: list[Exchange] = field(default_factory=list)

    def client(self, *, terminal: str = "till-1", secret: str | None = None) -> VendorClient:
        """A client signing as ``shop``'s first key, on the world's clock."""
        return VendorClient(
            self.url,
            self.key_id,
            secret or self.secret,
            terminal=terminal,
            clock=unix(self.clock),
        )


def recorder(exchanges: list[Exchange]) -> Middleware:
    """A middleware keeping every vendor API response (for ``openapi_check.problems``)."""

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        resource = request.match_info.route.resource
        if resource is not None and isinstance(response, web.Response):
            exchanges.append(
                Exchange(
                    method=request.method,
                    path=resource.canonical,
                    status=response.status,
                    content_type=response.content_type,
                    headers=dict(response.headers),
                    body=bytes(response.body) if isinstance(response.body, bytes) else b"",
                )
            )
        return response

    return record


@contextlib.asynccontextmanager
async def _open(tmp_path: Path, backend: str, clock: FakeClock) -> AsyncIterator[Ledger]:
    if backend == "postgres":
        schema = f"t_{uuid.uuid4().hex}"
        try:
            await create_schema(POSTGRES_URL, schema)
        except LedgerUnavailable as exc:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"PostgreSQL at {POSTGRES_URL} does not answer ({exc})")
        try:
            async with open_postgres_ledger(
                POSTGRES_URL, clock=clock, schema=schema, max_size=8
            ) as ledger:
                yield ledger
        finally:
            await drop_schema(POSTGRES_URL, schema)
        return
    async with open_sqlite_ledger(tmp_path / "ledger.db", clock=clock) as ledger:
        yield ledger


@contextlib.asynccontextmanager
async def vendor_world(tmp_path: Path, backend: object) -> AsyncIterator[VendorWorld]:
    """Vendor ``shop`` (terminal till-1, 2 % commission, KES 1,000.00 float) on ``backend``."""
    name = backend if isinstance(backend, str) else "postgres"
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))
    async with _open(tmp_path, name, clock) as ledger:
        drns = [make_drn(i) for i in range(1, 4)]
        await seed(ledger, drns)
        engine = SlowEngine([VENDING_KEY, NEW_KEY])
        provider = FakeProvider()
        vending = Vending(
            ledger=ledger,
            engine=engine,
            providers={provider.name: provider},
            default_provider=provider.name,
            clock=clock,
            policy=SagaPolicy(payment_expiry_s=600),
        )
        vendors = cast("VendorLedger", ledger)
        service = VendorService(
            vending,
            ledger,
            vendors,
            clock=clock,
            lease_s=5.0,
            engine_wait_s=2.0,
            limiter=LocalRateLimiter(clock=unix(clock)),
            master_key=MASTER_KEY,
        )
        registered = await service.register(
            "shop",
            name="Corner shop",
            currency="KES",
            commission_bp=200,
            terminals=("till-1", "till-2"),
            actor="test",
        )
        await vendors.top_up_float("shop", 100_000, reference="BANK-1", actor="test")
        exchanges: list[Exchange] = []
        app = web.Application(middlewares=[recorder(exchanges)])
        app.add_routes(vendor_routes(service))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            yield VendorWorld(
                ledger=ledger,
                vendors=vendors,
                vending=vending,
                service=service,
                engine=engine,
                clock=clock,
                url=f"http://127.0.0.1:{port}",
                key_id=registered.key.key_id,
                secret=registered.key.secret,
                drns=drns,
                exchanges=exchanges,
            )
        finally:
            await runner.cleanup()
        # Every answer the test got conforms to the OpenAPI document (status, media, schema).
        nonconforming = [problem for exchange in exchanges for problem in problems(exchange)]
        assert not nonconforming, "\n".join(nonconforming)
