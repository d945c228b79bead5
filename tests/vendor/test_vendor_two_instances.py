"""1,000 concurrent vends, each idempotency key sent four times, across two gateway instances.

Two instances (each its own pool, saga, service and HTTP server) share one PostgreSQL schema:
exactly one vend and one debit per key, every 201 for a key carries the same bytes, and the
float equals its top-up minus the debits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
from aiohttp import web

from gateway.ledger import Ledger, LedgerUnavailable, open_postgres_ledger
from gateway.ledger.postgres import create_schema, drop_schema
from gateway.ledger.vendor import MovementKind, VendorLedger
from gateway.sts import LocalTokenEngine
from gateway.vending import SagaPolicy, Vending
from gateway.vendor.service import VendorService, register_vendor
from gateway.vendor_client import VendorClient
from gateway.web.vendor import vendor_routes
from tests.ledger.ledger_support import POSTGRES_URL
from tests.vending.vending_support import VENDING_KEY, FakeProvider, make_drn, seed
from tests.vendor.vendor_support import MASTER_KEY

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

KEYS = 250
COPIES = 4
METERS = 10


@contextlib.asynccontextmanager
async def _schema() -> AsyncIterator[str]:
    schema = f"t_{uuid.uuid4().hex}"
    try:
        await create_schema(POSTGRES_URL, schema)
    except LedgerUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} does not answer ({exc})")
    try:
        yield schema
    finally:
        await drop_schema(POSTGRES_URL, schema)


@contextlib.asynccontextmanager
async def _instance(schema: str) -> AsyncIterator[tuple[Ledger, str]]:
    """One gateway instance's vendor API over the shared schema, on a loopback port."""
    async with open_postgres_ledger(POSTGRES_URL, schema=schema, max_size=6) as ledger:
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
            engine_wait_s=60,
            master_key=MASTER_KEY,
        )
        app = web.Application()
        app.add_routes(vendor_routes(service))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            yield ledger, f"http://127.0.0.1:{runner.addresses[0][1]}"
        finally:
            await runner.cleanup()


async def test_duplicated_keys_across_two_instances_vend_once() -> None:
    """Every key: one vend, one debit, one answer; the float's books balance."""
    async with (
        _schema() as schema,
        _instance(schema) as (first, url_a),
        _instance(schema) as (_second, url_b),
    ):
        vendors = cast("VendorLedger", first)
        drns = [make_drn(i) for i in range(1, METERS + 1)]
        await seed(first, drns)
        key = (
            await register_vendor(
                vendors,
                "bank",
                name="Bank",
                currency="KES",
                rate_per_minute=10**6,
                actor="t",
                master_key=MASTER_KEY,
            )
        ).key
        await vendors.top_up_float("bank", 10**9, reference="T", actor="t")
        sends = [(k, copy) for k in range(KEYS) for copy in range(COPIES)]
        async with (
            VendorClient(url_a, key.key_id, key.secret) as a,
            VendorClient(url_b, key.key_id, key.secret) as b,
        ):
            gate = asyncio.Semaphore(64)

            async def send(k: int, copy: int) -> tuple[int, int, bytes]:
                async with gate:
                    client = a if (k + copy) % 2 else b
                    reply = await client.vend(drns[k % METERS], 10_000, idempotency_key=f"k{k}")
                    return k, reply.status, reply.body

            replies = await asyncio.gather(*(send(k, c) for k, c in sends))
            finals = {
                k: await (a if k % 2 else b).last_response(idempotency_key=f"k{k}")
                for k in range(KEYS)
            }
        statuses = Counter(status for _k, status, _body in replies)
        assert set(statuses) <= {201, 409}, statuses
        for k, status, body in replies:
            if status == 201:
                assert body == finals[k].body
        assert all(final.status == 201 for final in finals.values())
        now = datetime.now(UTC)
        moves = await vendors.float_movements(
            "bank", since=now - timedelta(hours=1), until=now + timedelta(hours=1)
        )
        debits = Counter(m.purchase_id for m in moves if m.kind is MovementKind.DEBIT)
        vend_ids = {final.json()["vend_id"] for final in finals.values()}
        assert len(vend_ids) == KEYS
        assert set(debits) == vend_ids
        assert set(debits.values()) == {1}
        for vend_id in vend_ids:
            assert await first.get_vend(vend_id) is not None
        bank = await vendors.get_vendor("bank")
        assert bank.balance_minor == 10**9 - KEYS * 10_000
