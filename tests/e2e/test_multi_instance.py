"""Several gateway processes on one PostgreSQL keep exactly-once vending under duplicated callbacks.

The last test runs two real ``gateway serve`` processes (production configuration: PostgreSQL,
Redis sessions, MTN MoMo and Africa's Talking simulated on loopback and shared) behind a loopback
balancer that delivers every payment callback three times to random instances.

The others drive the ledger and the saga harder than a USSD front end can: their instance
processes are ``bench/scale.py instance`` (the real saga, ``gateway.vending.Vending``, on its own
ledger pool, taking callbacks on ``POST /notices``, with a stateless provider whose status query
confirms the amount carried in the reference), so that 500 purchases, a SIGKILLed instance and
storms of dropped database connections each run in seconds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import itertools
import os
import random
import re
import signal
import socket
import sys
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from types import ModuleType
from typing import cast

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import pytest
import redis.asyncio
import redis.exceptions
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.ledger import (
    VendingKeyMaterial,
    open_postgres_ledger,
    seal_vending_key,
)
from gateway.ledger.vendor import VendorLedger
from gateway.sim.africastalking import AtSimulator
from gateway.sim.momo import MomoSimulator
from gateway.vendor.service import register_vendor
from gateway.vendor_client import VendorClient

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

URL = "postgresql://127.0.0.1:5432/test"
START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
HARNESS = Path(__file__).resolve().parents[2] / "bench" / "scale.py"
PURCHASES = 500
METERS = 20  # 25 purchases per meter, all in the same minute: TIDs contend across instances
COPIES = 3
REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_START = 'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save ""'
TOKEN_TEXT = re.compile(r"\d{4}-\d{4}-\d{4}-\d{4}-\d{4}")


def load_harness() -> ModuleType:
    """``bench/scale.py`` as a module (the instance process, purchase set-up, delivery)."""
    spec = importlib.util.spec_from_file_location("scale_harness", HARNESS)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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
    """One vend per purchase, each VENDED (or DELIVERED), one token SMS each, TIDs increasing.

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
    assert set(states) <= {"vended", "delivered"}  # delivered: its SMS was confirmed
    assert sum(states.values()) == len(purchase_ids)
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


# ------------------------------------------------------------------------- two ``gateway serve``


class Balancer:
    """A loopback load balancer in front of the instances.

    Provider callbacks (``/payments/…``) are delivered ``copies`` times, each copy to a random
    instance, all at once (the provider's answer is the first copy's); anything else goes to one
    random instance.
    """

    def __init__(self, rng: random.Random, copies: int) -> None:
        self.rng = rng
        self.copies = copies
        self.ports: list[int] = []
        self.callbacks_per_instance: Counter[int] = Counter()
        self.session: aiohttp.ClientSession | None = None
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.forward)

    async def forward(self, request: web.Request) -> web.Response:
        """Send the request on to one instance, or ``copies`` for a payment callback."""
        assert self.session is not None
        body = await request.read()
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in {"host", "content-length", "transfer-encoding"}
        }
        copies = self.copies if request.path.startswith("/payments/") else 1
        targets = [self.rng.randrange(len(self.ports)) for _ in range(copies)]

        async def one(target: int) -> tuple[int, bytes, str]:
            assert self.session is not None
            url = f"http://127.0.0.1:{self.ports[target]}{request.path_qs}"
            async with self.session.request(
                request.method, url, data=body, headers=headers
            ) as answer:
                return answer.status, await answer.read(), answer.content_type

        if copies > 1:
            self.callbacks_per_instance.update(targets)
        try:
            answers = await asyncio.gather(*(one(t) for t in targets))
        except aiohttp.ClientError:
            return web.Response(status=502, text="no instance answered")
        status, payload, content_type = answers[0]
        return web.Response(status=status, body=payload, content_type=content_type)


async def serve_on_loopback(stack: contextlib.AsyncExitStack, app: web.Application) -> str:
    """Serve ``app`` on a free loopback port until ``stack`` closes; its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}"


async def start_gateway(
    stack: contextlib.AsyncExitStack, env: dict[str, str], data_dir: Path
) -> int:
    """``gateway serve`` on a free port with ``env``; its port once it answers (stopped on exit)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "gateway", "serve", "--port", str(port)),
        *("--data-dir", str(data_dir)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )

    async def stop() -> None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(15):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()

    stack.push_async_callback(stop)
    assert process.stdout is not None
    seen: list[str] = []
    async with asyncio.timeout(30):
        while line := (await process.stdout.readline()).decode():
            seen.append(line)
            if line.strip().startswith("routes:"):
                return port
    raise AssertionError("gateway serve did not start:\n" + "".join(seen))


async def buy_over_ussd(
    http: aiohttp.ClientSession, ports: list[int], phone: str, meter: str, rng: random.Random
) -> str:
    """One USSD purchase (a new session) whose hops land on random instances; the last screen."""
    session_id = f"ATUid_{uuid.uuid4().hex}"
    inputs: list[str] = []
    reply = ""
    for answer in (None, "1", meter, "250", "1"):
        if answer is not None:
            inputs.append(answer)
        form = {
            "sessionId": session_id,
            "serviceCode": "*384*123#",
            "phoneNumber": phone,
            "networkCode": "63902",
            "text": "*".join(inputs),
        }
        port = ports[rng.randrange(len(ports))]
        async with http.post(f"http://127.0.0.1:{port}/ussd/africastalking", data=form) as r:
            assert r.status == 200
            reply = await r.text()
    return reply


async def seed_production_ledger(
    schema: str, harness: ModuleType, meters: list[str], master_key: bytes
) -> None:
    """What an operator loads before production starts: tariff, meters, the sealed vending key."""
    async with open_postgres_ledger(URL, schema=schema) as ledger:
        await ledger.put_tariff(harness.TARIFF)
        for drn in meters:
            await ledger.put_meter(harness.meter_record(drn))
        key = harness.VENDING_KEY
        await ledger.put_vending_key(
            seal_vending_key(
                VendingKeyMaterial(
                    sgc=key.sgc, krn=key.krn, key_type=2, ea=7, dkga=key.dkga,
                    base_date=key.base_date, key=key.key,
                ),
                master_key,
            )
        )  # fmt: skip


async def stuck_report(schema: str, at: AtSimulator) -> str:
    """Where the purchases stand, for a failure message."""
    conn = await asyncpg.connect(URL, server_settings={"search_path": schema})
    try:
        states = await conn.fetch("SELECT state, count(*) AS n FROM purchases GROUP BY state")
        outbox = await conn.fetch("SELECT state, count(*) AS n FROM outbox GROUP BY state")
        events = await conn.fetch(
            "SELECT kind, count(*) AS n FROM events GROUP BY kind ORDER BY kind"
        )
    finally:
        await conn.close()
    return (
        f"purchases {dict(states)}; outbox {dict(outbox)}; events {dict(events)};"
        f" {len(at.sent)} SMS accepted"
    )


def production_env(
    schema: str,
    master_key: bytes,
    public: str,
    momo: MomoSimulator,
    momo_url: str,
    at: AtSimulator,
    at_url: str,
) -> dict[str, str]:
    """The environment both instances share: one database, Redis, secrets and providers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {
        "GATEWAY_MODE": "production",
        "GATEWAY_DATABASE_URL": f"{URL}?search_path={schema}",
        "GATEWAY_SESSION_STORE": "redis",
        "GATEWAY_MASTER_KEY": base64.b64encode(master_key).decode(),
        "GATEWAY_ADMIN_TOKEN": "admin-" + uuid.uuid4().hex,
        "GATEWAY_CALLBACK_SECRET": "cb-" + uuid.uuid4().hex,
        "GATEWAY_PUBLIC_URL": public,
        "GATEWAY_PAYMENTS": "momo",
        "GATEWAY_MOMO_BASE_URL": momo_url,
        "GATEWAY_MOMO_USERNAME": momo.api_user,
        "GATEWAY_MOMO_KEY": momo.api_key,
        "GATEWAY_MOMO_SUBSCRIPTION_KEY": momo.subscription_key,
        "GATEWAY_MOMO_TARGET_ENVIRONMENT": momo.target_environment,
        "GATEWAY_SMS": "africastalking",
        "GATEWAY_AFRICASTALKING_BASE_URL": at_url + "/version1",
        "GATEWAY_AFRICASTALKING_USERNAME": at.username,
        "GATEWAY_AFRICASTALKING_KEY": at.api_key,
        "GATEWAY_PAYMENT_FIRST_CHECK_S": "2",
        "GATEWAY_SWEEP_INTERVAL_S": "0.5",
    }
    return env


async def sold_tokens(schema: str) -> tuple[dict[str, str], set[str]]:
    """Each phone's vended token, and every purchase id."""
    conn = await asyncpg.connect(URL, server_settings={"search_path": schema})
    try:
        vends = await conn.fetch(
            "SELECT p.phone, v.token FROM vends v JOIN purchases p USING (purchase_id)"
        )
        purchases = await conn.fetch("SELECT purchase_id FROM purchases")
    finally:
        await conn.close()
    return {r["phone"]: r["token"] for r in vends}, {r["purchase_id"] for r in purchases}


async def require_redis() -> None:
    """Skip (fail under CI) when Redis does not answer on loopback."""
    client = redis.asyncio.Redis.from_url(REDIS_URL, socket_timeout=2)
    try:
        await client.ping()
    except redis.exceptions.ConnectionError as exc:
        message = f"Redis at {REDIS_URL} does not answer ({exc}); start it: {REDIS_START}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_two_gateway_serve_processes_sell_each_token_once(
    schema: str, tmp_path: Path
) -> None:
    """Two ``gateway serve`` on one PostgreSQL and Redis, behind a balancer, sell exactly once.

    USSD hops land on random instances (sessions live in Redis); MTN MoMo (simulated, shared)
    calls back through the balancer, which delivers every callback three times to random
    instances at once; each instance's outbox worker texts tokens through Africa's Talking
    (simulated, shared). Every purchase is vended once, with increasing TIDs per meter, and
    exactly one token SMS reaches each phone.
    """
    await require_redis()
    harness = load_harness()
    purchases = 500
    master_key = os.urandom(32)
    rng = random.Random(5)
    meters = [harness.make_drn(8100 + i) for i in range(4)]
    phones = [f"+2547{22000000 + i:08d}" for i in range(purchases)]
    await seed_production_ledger(schema, harness, meters, master_key)
    momo = MomoSimulator(currency="KES", answer_delay_s=0.2)
    balancer = Balancer(rng, COPIES)
    async with aiohttp.ClientSession() as http, contextlib.AsyncExitStack() as stack:
        balancer.session = http
        public = await serve_on_loopback(stack, balancer.app)
        at = AtSimulator(delivery_url=public + "/sms/africastalking/delivery")
        stack.push_async_callback(at.close)
        all_texted = asyncio.Event()

        @web.middleware
        async def watch(request: web.Request, handler: Handler) -> web.StreamResponse:
            response = await handler(request)
            texted = {sms.to for sms in at.sent if TOKEN_TEXT.search(sms.text)}
            if len(texted) >= purchases:
                all_texted.set()
            return response

        at.app.middlewares.append(watch)
        momo_url = await serve_on_loopback(stack, momo.app)
        at_url = await serve_on_loopback(stack, at.app)
        env = production_env(schema, master_key, public, momo, momo_url, at, at_url)
        for name in ("a", "b"):  # one after the other: the second finds the schema migrated
            balancer.ports.append(await start_gateway(stack, env, tmp_path / name))
        gate = asyncio.Semaphore(12)

        async def buy(index: int) -> str:
            async with gate:
                return await buy_over_ussd(
                    http, balancer.ports, phones[index], meters[index % len(meters)], rng
                )

        replies = await asyncio.gather(*(buy(i) for i in range(purchases)))
        assert all(reply.startswith("END ") for reply in replies), replies[0]
        try:
            async with asyncio.timeout(120):  # a deadline on a loaded machine, not a pause
                await all_texted.wait()
        except TimeoutError:
            raise AssertionError(await stuck_report(schema, at)) from None

    assert min(balancer.callbacks_per_instance.values()) > 0
    assert sum(balancer.callbacks_per_instance.values()) == purchases * COPIES
    tokens, purchase_ids = await sold_tokens(schema)
    assert len(purchase_ids) == purchases
    await assert_exactly_once(schema, purchase_ids)
    for phone in phones:
        texts = [sms.text for sms in at.sent if sms.to == phone]
        assert len(texts) == 1, (phone, texts)
        grouped = "-".join(tokens[phone][i : i + 4] for i in range(0, 20, 4))
        assert grouped in texts[0]


async def test_two_gateway_serve_processes_share_the_vendor_rate_limits(
    schema: str, tmp_path: Path
) -> None:
    """Two ``gateway serve`` with one Redis: a vendor's per-minute rate holds across both.

    A vendor allowed 6 requests a minute (one token every 10 s) sends 14 signed meter confirms,
    alternating between the instances: 6 are admitted in all (each process alone would admit 6),
    the rest answer 429 ``rate_limited`` with ``Retry-After``, from both instances.
    """
    await require_redis()
    harness = load_harness()
    master_key = os.urandom(32)
    meters = [harness.make_drn(8200)]
    await seed_production_ledger(schema, harness, meters, master_key)
    async with open_postgres_ledger(URL, schema=schema) as ledger:
        made = await register_vendor(
            cast("VendorLedger", ledger), f"v{uuid.uuid4().hex[:8]}", name="Kiosk",
            currency="KES", rate_per_minute=6, actor="test", master_key=master_key,
        )  # fmt: skip
    momo = MomoSimulator(currency="KES")
    async with contextlib.AsyncExitStack() as stack:
        at = AtSimulator(delivery_url="http://127.0.0.1:9/unused")
        stack.push_async_callback(at.close)
        momo_url = await serve_on_loopback(stack, momo.app)
        at_url = await serve_on_loopback(stack, at.app)
        env = production_env(schema, master_key, "http://127.0.0.1:9", momo, momo_url, at, at_url)
        ports = [await start_gateway(stack, env, tmp_path / name) for name in ("a", "b")]
        clients = [
            await stack.enter_async_context(
                VendorClient(f"http://127.0.0.1:{port}", made.key.key_id, made.key.secret)
            )
            for port in ports
        ]
        replies = [await clients[n % 2].confirm_meter(meters[0]) for n in range(14)]
    admitted = [n for n, reply in enumerate(replies) if reply.status == 200]
    refused = [n for n, reply in enumerate(replies) if reply.status == 429]
    assert len(admitted) == 6, [r.status for r in replies]
    assert len(admitted) + len(refused) == 14
    assert {n % 2 for n in refused} == {0, 1}  # both instances refused: one bucket
    assert all(replies[n].problem == "rate_limited" for n in refused)
    assert all(int(replies[n].headers["Retry-After"]) >= 1 for n in refused)
