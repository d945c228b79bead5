"""Two gateway processes on one PostgreSQL keep exactly-once vending under duplicated callbacks.

The instance processes are ``bench/scale.py instance``: each runs the real saga
(``gateway.vending.Vending``) on its own ledger pool and takes payment callbacks on ``POST
/notices`` (loopback), with a stateless payment provider whose status query confirms the amount
carried in the reference. They stand in for ``gateway serve`` until the composition root serves
PostgreSQL; the promises checked here are the ledger's and the saga's.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
import random
import signal
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import asyncpg  # type: ignore[import-untyped]
import pytest

from gateway.ledger import LedgerUnavailable, open_postgres_ledger
from gateway.ledger.postgres import create_schema, drop_schema

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

URL = "postgresql://127.0.0.1:5432/test"
START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
HARNESS = Path(__file__).resolve().parents[2] / "bench" / "scale.py"
PURCHASES = 500
METERS = 20  # 25 purchases per meter, all in the same minute: TIDs contend across instances
COPIES = 3


def load_harness() -> ModuleType:
    """``bench/scale.py`` as a module (the instance process, purchase set-up, delivery)."""
    spec = importlib.util.spec_from_file_location("scale_harness", HARNESS)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    """A fresh schema, dropped afterwards; skipped (failed under CI) without a server."""
    name = f"t_{uuid.uuid4().hex}"
    try:
        await create_schema(URL, name)
    except LedgerUnavailable as exc:
        message = f"PostgreSQL at {URL} does not answer ({exc}); start it: {START}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    yield name
    await drop_schema(URL, name)


async def test_two_instances_vend_each_purchase_exactly_once(schema: str) -> None:
    """500 purchases, each confirmed 3 times to random instances at once: 500 vends, one SMS each.

    TIDs are unique and strictly increasing per meter in the order the vends were stored; no
    recovery sweep runs: the deliveries alone vend everything.
    """
    harness = load_harness()
    async with open_postgres_ledger(URL, schema=schema) as ledger:
        opened = await harness.prepare(
            ledger, purchases=PURCHASES, meters=METERS, run=uuid.uuid4().hex[:8]
        )
    assert len(opened) == PURCHASES
    async with harness.start_instances(2, URL, schema, pool=6) as instances:
        delivery = await harness.deliver(
            [reference for _, reference in opened],
            [instance.port for instance in instances],
            copies=COPIES,
            concurrency=48,
            rng=random.Random(20261124),
        )
    assert sum(delivery.per_instance) == PURCHASES * COPIES
    assert min(delivery.per_instance) > PURCHASES  # both instances took a real share

    await assert_exactly_once(schema, {purchase_id for purchase_id, _ in opened})


async def assert_exactly_once(schema: str, purchase_ids: set[str]) -> None:
    """One vend per purchase, every purchase VENDED, one token SMS per vend, TIDs increasing.

    TIDs must be unique and strictly increasing per meter in the order the vends were stored.
    """
    conn = await asyncpg.connect(URL, server_settings={"search_path": schema})
    try:
        vends = await conn.fetch("SELECT purchase_id, meter, tid FROM vends ORDER BY vend_id")
        messages = await conn.fetch("SELECT purchase_id FROM outbox WHERE kind = 'token'")
        states = Counter(r["state"] for r in await conn.fetch("SELECT state FROM purchases"))
        vended_events = await conn.fetchval(
            "SELECT count(*) FROM events WHERE kind = 'token_vended'"
        )
    finally:
        await conn.close()
    assert len(vends) == len(purchase_ids)
    assert {r["purchase_id"] for r in vends} == purchase_ids
    assert states == {"vended": len(purchase_ids)}
    assert vended_events == len(purchase_ids)
    assert Counter(r["purchase_id"] for r in messages) == dict.fromkeys(purchase_ids, 1)
    tids: defaultdict[str, list[int]] = defaultdict(list)
    for row in vends:
        tids[row["meter"]].append(row["tid"])
    for meter, issued in tids.items():
        assert all(a < b for a, b in itertools.pairwise(issued)), meter


async def test_an_instance_killed_mid_stream_loses_nothing(schema: str) -> None:
    """SIGKILL one instance mid-stream; the other and one recovery sweep vend each exactly once.

    Confirmations the dead instance cannot take fail over to the survivor, as a load balancer
    would send them; whatever the kill left paid but not vended, the sweep finishes.
    """
    harness = load_harness()
    purchases = 300
    async with open_postgres_ledger(URL, schema=schema) as ledger:
        opened = await harness.prepare(
            ledger, purchases=purchases, meters=METERS, run=uuid.uuid4().hex[:8]
        )
    async with harness.start_instances(2, URL, schema, pool=6) as instances:
        victim = instances[0].process
        halfway = asyncio.Event()

        def watch(answered: int) -> None:
            if answered >= purchases:
                halfway.set()

        async def kill_when_halfway() -> None:
            await halfway.wait()
            victim.kill()

        killer = asyncio.create_task(kill_when_halfway())
        delivery = await harness.deliver(
            [reference for _, reference in opened],
            [instance.port for instance in instances],
            copies=COPIES,
            concurrency=48,
            rng=random.Random(7),
            on_answered=watch,
        )
        await killer
        assert await victim.wait() == -signal.SIGKILL
    assert delivery.failed_over > 0
    async with open_postgres_ledger(URL, schema=schema) as ledger:
        await harness.build_vending(ledger).finish_paid(limit=purchases)
    await assert_exactly_once(schema, {purchase_id for purchase_id, _ in opened})


async def test_connections_dropped_by_the_server_are_retried_inside_the_ledger(
    schema: str,
) -> None:
    """The server drops every instance connection again and again; no confirmation is refused.

    Every hundredth answer the database terminates all the instances' ledger connections (as a
    restart or a failover would). The ledger retries inside: the instances never answer 503 for
    want of a ledger, and after one sweep every purchase is vended exactly once.
    """
    harness = load_harness()
    purchases = 300
    application = f"sts-gateway-test-{uuid.uuid4().hex[:8]}"
    async with open_postgres_ledger(URL, schema=schema) as ledger:
        opened = await harness.prepare(
            ledger, purchases=purchases, meters=METERS, run=uuid.uuid4().hex[:8]
        )
    admin = await asyncpg.connect(URL)
    terminated: list[int] = []
    storms: list[asyncio.Task[None]] = []

    async def storm() -> None:
        terminated.append(
            await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = $1",
                application,
            )
        )

    def every_hundredth(answered: int) -> None:
        if answered % 100 == 0 and answered < purchases * COPIES:
            storms.append(asyncio.create_task(storm()))

    try:
        async with harness.start_instances(
            2, URL, schema, pool=6, application_name=application
        ) as instances:
            delivery = await harness.deliver(
                [reference for _, reference in opened],
                [instance.port for instance in instances],
                copies=COPIES,
                concurrency=48,
                rng=random.Random(11),
                on_answered=every_hundredth,
            )
            await asyncio.gather(*storms)
    finally:
        await admin.close()
    assert len(terminated) == purchases * COPIES // 100 - 1
    assert sum(terminated) > len(terminated)  # each storm dropped connections in use
    assert delivery.resent_after_503 == 0
    assert delivery.failed_over == 0
    async with open_postgres_ledger(URL, schema=schema) as ledger:
        await harness.build_vending(ledger).finish_paid(limit=purchases)
    await assert_exactly_once(schema, {purchase_id for purchase_id, _ in opened})
