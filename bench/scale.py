"""Vends/s with one and two gateway instances on PostgreSQL and one on SQLite, audited.

Each scenario: a fresh database (a schema of its own on PostgreSQL, a temporary file for SQLite)
gets a tariff, ``--meters`` meters and ``--purchases`` purchases awaiting payment (opened and
requested through the real saga). Then ``--instances`` instance processes start, each running the
real saga (``gateway.vending.Vending``) with its own ledger pool and a tiny aiohttp app on loopback
whose ``POST /notices`` hands a payment callback to ``Vending.on_payment_notice``. The payment
provider is stateless: the reference carries the amount, so every instance's status query confirms
the same payment. A client sends every purchase's confirmation ``--deliveries`` times, each copy to
a random instance, all at once (``--concurrency`` requests in flight), so two instances routinely
receive the same callback at the same moment.

Vends/s is purchases divided by the time from the first delivery sent to the last answered (every
purchase vended by then). Afterwards the driver runs one recovery sweep (``finish_paid``: what a
lost race left PAID, the sweeper finishes) and audits in SQL: exactly one vend per purchase, every
purchase VENDED, (meter, TID) unique and strictly increasing in vend order, exactly one token
message per vend, one ``token_vended`` event per vend. A failed audit exits non-zero.

SQLite runs one instance only: its ledger has one writer per file by design (several instances
need PostgreSQL).

Each run also reports, over the deliveries only: CPU per vend of the instance processes and of
the PostgreSQL backends serving their connections (utime + stime from ``/proc``, backends found
by their ``application_name`` in ``pg_stat_activity``: the figure that stays meaningful when the
2 cores saturate), the ledger's committed writes per vend (each instance's ``/stats``; on SQLite
the writer's group commits), and the TID compare-and-sets lost per 1,000 vends. Then (unless
``--no-kill``) two PostgreSQL instances run again and the first is SIGKILLed once 30 % of the
confirmations are answered: the balancer sends what it had on to the other, the recovery sweep
finishes what the dead one left, and the same audit must hold.

Then the whole path through real ``gateway serve`` processes (``--serve-purchases``, 0 skips it):
production configuration on the same database (Redis sessions with PostgreSQL), MTN MoMo and
Africa's Talking simulated in this process and shared by the instances, a loopback balancer in
front that delivers every MoMo callback ``--deliveries`` times to random instances. Purchases are
made over USSD (five hops, each to a random instance) ``--concurrency`` at a time; the figure is
purchases per second from the first dial until every phone has its token SMS, with each phone's
dial-to-SMS latency, and the same exactly-once audit plus exactly one SMS per phone. It includes
the payer's simulated 0.2 s and the outbox worker's polling, so it measures a path, not a ceiling.

Prints readable lines, then one JSON line.

Run: ``python bench/scale.py [--purchases 2000] [--serve-purchases 300] [--quick]`` (needs
PostgreSQL on 127.0.0.1:5432, database ``test``, and Redis on 127.0.0.1:6379). The same file is
the saga-only instance process (``python bench/scale.py instance --database-url URL [--schema
S]``), which ``tests/e2e/test_multi_instance.py`` also starts.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.ledger import (
    Ledger,
    LedgerError,
    MeterNumber,
    MeterRecord,
    VendingKeyMaterial,
    open_postgres_ledger,
    open_sqlite_ledger,
    seal_vending_key,
)
from gateway.ledger.postgres import PostgresLedger, create_schema, drop_schema, is_postgres_url
from gateway.ledger.sqlite import SqliteLedger
from gateway.logging import configure_logging
from gateway.money import Money
from gateway.payments import (
    CallbackAck,
    CollectionRequest,
    CollectionStarted,
    PaymentNotice,
    PaymentState,
    PaymentStatus,
    ProviderReference,
)
from gateway.phone import Msisdn
from gateway.sim.africastalking import AtSimulator
from gateway.sim.momo import MomoSimulator
from gateway.sts import LocalTokenEngine, VendingKey
from gateway.sts.pan import luhn_check_digit
from gateway.tariff import Tariff
from gateway.vending import SagaPolicy, Vending

PG_URL = "postgresql://127.0.0.1:5432/test"
PHONE = Msisdn("+254712345678")
PROVIDER = "fakepay"
VENDING_KEY = VendingKey(
    sgc="123457", krn=1, dkga=4, base_date=2014, key=bytes.fromhex("0abc" * 10)
)
TARIFF = Tariff(
    tariff_id="domestic",
    name="Domestic",
    currency="KES",
    price_per_kwh_minor=2500,
    vat_basis_points=1600,
    min_purchase_minor=1000,
    max_purchase_minor=3_500_000,
)
AMOUNTS = (Money(11600, "KES"), Money(23200, "KES"), Money(5800, "KES"))


def make_drn(number: int) -> MeterNumber:
    """A valid 11-digit DRN (Luhn check digit) from a serial number."""
    body = f"{number:010d}"
    return MeterNumber(body + luhn_check_digit(body))


def meter_record(drn: MeterNumber) -> MeterRecord:
    """A meter on the domestic tariff keyed by ``VENDING_KEY``."""
    return MeterRecord(
        drn=drn,
        customer_name="Wanjiru Kamau",
        area="Kibera",
        sgc=VENDING_KEY.sgc,
        tariff_index="01",
        krn=VENDING_KEY.krn,
        dkga=VENDING_KEY.dkga,
        base_date=VENDING_KEY.base_date,
        tariff_id=TARIFF.tariff_id,
    )


class StatelessProvider:
    """Every collection succeeds for the amount requested, which the reference carries.

    Any instance answers ``query_status`` the same way without shared state.
    """

    idempotent_requests = False  # the saga guards unknown outcomes (as for STK)

    name = PROVIDER

    async def request_collection(self, request: CollectionRequest) -> CollectionStarted:
        """Accept; the reference is ``REF-<purchase>-<amount minor>-<currency>``."""
        reference = (
            f"REF-{request.purchase_id}-{request.amount.amount_minor}-{request.amount.currency}"
        )
        return CollectionStarted(provider=self.name, reference=ProviderReference(reference))

    def parse_callback(self, body: bytes, headers: Mapping[str, str]) -> PaymentNotice:
        """The instance's ``/notices`` body: ``{"reference": …}``, a success claim."""
        del headers
        reference = ProviderReference(str(json.loads(body)["reference"]))
        return PaymentNotice(
            provider=self.name, reference=reference, claimed_state=PaymentState.SUCCEEDED, raw=body
        )

    async def query_status(self, reference: ProviderReference) -> PaymentStatus:
        """Succeeded, for the amount in the reference, paid by ``PHONE``."""
        _, purchase_id, minor, currency = reference.split("-")
        return PaymentStatus(
            provider=self.name,
            reference=reference,
            state=PaymentState.SUCCEEDED,
            amount=Money(int(minor), currency),
            payer=PHONE,
            receipt="R" + purchase_id[1:9],
        )

    def acknowledgement(self) -> CallbackAck:
        """An empty 200."""
        return CallbackAck()


def build_vending(ledger: Ledger) -> Vending:
    """The real saga with the local token engine and the stateless provider."""
    return Vending(
        ledger=ledger,
        engine=LocalTokenEngine([VENDING_KEY]),
        providers={PROVIDER: StatelessProvider()},
        default_provider=PROVIDER,
        policy=SagaPolicy(first_check_after_s=3600),
    )


@contextlib.asynccontextmanager
async def open_any_ledger(
    url: str, schema: str | None, *, pool_size: int = 10, application_name: str = "sts-gateway"
) -> AsyncIterator[Ledger]:
    """The ledger at ``url``: PostgreSQL (in ``schema``) or a ``sqlite:///`` file."""
    if is_postgres_url(url):
        async with open_postgres_ledger(
            url, schema=schema, max_size=pool_size, application_name=application_name
        ) as ledger:
            yield ledger
    else:
        async with open_sqlite_ledger(Path(url.removeprefix("sqlite:///"))) as ledger:
            yield ledger


# --- the instance process ----------------------------------------------------------------------


async def serve_instance(args: argparse.Namespace) -> None:
    """Serve ``POST /notices`` on ``--host:--port`` until SIGTERM; prints ``READY <port>`` first."""
    url: str = args.database_url
    schema: str | None = args.schema
    configure_logging(json=True, level="error", stream=sys.stderr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with open_any_ledger(
        url, schema, pool_size=args.pool, application_name=args.application_name
    ) as ledger:
        vending = build_vending(ledger)
        provider = StatelessProvider()

        async def notices(request: web.Request) -> web.Response:
            notice = provider.parse_callback(await request.read(), request.headers)
            try:
                await vending.on_payment_notice(notice)
            except LedgerError as exc:  # not recorded: the provider must send it again
                return web.json_response({"error": str(exc)}, status=503)
            return web.json_response({"ok": True})

        async def stats(_request: web.Request) -> web.Response:
            """What this instance counted: lost TID compare-and-sets, commits (or batches)."""
            # getattr: the same driver measures an older checkout as a baseline (-1: not counted)
            if isinstance(ledger, PostgresLedger):
                commits = getattr(ledger, "commits", -1)
            elif isinstance(ledger, SqliteLedger):
                commits = ledger.write_stats[0]
            else:
                commits = -1
            conflicts = getattr(vending, "tid_conflicts", -1)
            return web.json_response({"tid_conflicts": conflicts, "commits": commits})

        app = web.Application()
        app.router.add_post("/notices", notices)
        app.router.add_get("/stats", stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        bound = runner.addresses[0][1]
        print(f"READY {bound}", flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()


@dataclass
class Instance:
    """A running instance process and its port."""

    process: asyncio.subprocess.Process
    port: int


@contextlib.asynccontextmanager
async def start_instances(
    count: int,
    url: str,
    schema: str | None,
    *,
    pool: int = 8,
    application_name: str = "sts-gateway",
) -> AsyncIterator[list[Instance]]:
    """``count`` instance processes serving on loopback; stopped (SIGTERM) on exit.

    Their ledger connections show as ``application_name`` in ``pg_stat_activity``.
    """
    started: list[Instance] = []
    try:
        for _ in range(count):
            args = [sys.executable, __file__, "instance", "--database-url", url]
            args += ["--pool", str(pool), "--application-name", application_name]
            if schema:
                args += ["--schema", schema]
            process = await asyncio.create_subprocess_exec(
                *args, stdout=asyncio.subprocess.PIPE, stderr=None
            )
            assert process.stdout is not None  # noqa: S101 - asked for above
            line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
            if not line.startswith(b"READY "):
                process.kill()
                raise RuntimeError(f"instance did not start: {line!r}")
            started.append(Instance(process, int(line.split()[1])))
        yield started
    finally:
        for instance in started:
            if instance.process.returncode is None:
                instance.process.send_signal(signal.SIGTERM)
        for instance in started:
            try:
                await asyncio.wait_for(instance.process.wait(), timeout=15)
            except TimeoutError:
                instance.process.kill()
                await instance.process.wait()


# --- the driver --------------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used (``/proc/<pid>/stat``); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15)


async def backend_pids(url: str, application_name: str) -> list[int]:
    """The PostgreSQL backends serving connections named ``application_name``."""
    conn = await asyncpg.connect(url)
    try:
        found = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1", application_name
        )
    finally:
        await conn.close()
    return [int(row["pid"]) for row in found]


async def instance_stats(ports: list[int]) -> list[dict[str, int]]:
    """Every instance's ``/stats``."""
    async with aiohttp.ClientSession() as session:
        answers = []
        for port in ports:
            async with session.get(f"http://127.0.0.1:{port}/stats") as response:
                answers.append(await response.json())
    return answers


@dataclass
class CpuMeter:
    """CPU seconds of the instance processes and of their PostgreSQL backends over a run."""

    url: str
    application_name: str
    instance_pids: list[int]
    before: dict[int, float]

    @classmethod
    async def start(cls, url: str, application_name: str, pids: list[int]) -> CpuMeter:
        """Read every process's CPU now (backends opened later count from zero)."""
        backends = await backend_pids(url, application_name) if is_postgres_url(url) else []
        return cls(url, application_name, pids, {p: cpu_seconds(p) for p in [*pids, *backends]})

    async def stop(self) -> tuple[float, float]:
        """(instances' CPU seconds, backends' CPU seconds) since ``start``."""
        backends = (
            await backend_pids(self.url, self.application_name) if is_postgres_url(self.url) else []
        )
        gateway = sum(cpu_seconds(p) - self.before.get(p, 0.0) for p in self.instance_pids)
        database = sum(cpu_seconds(p) - self.before.get(p, 0.0) for p in backends)
        return gateway, database


async def prepare(
    ledger: Ledger, *, purchases: int, meters: int, run: str
) -> list[tuple[str, str]]:
    """Tariff, meters and purchases awaiting payment; (purchase id, provider reference) each."""
    await ledger.put_tariff(TARIFF)
    drns = [make_drn(7000 + i) for i in range(meters)]
    for drn in drns:
        await ledger.put_meter(meter_record(drn))
    vending = build_vending(ledger)
    opened: list[tuple[str, str]] = []

    async def one(index: int) -> None:
        purchase = await vending.start_purchase(
            channel="ussd",
            phone=PHONE,
            meter=drns[index % meters],
            amount=AMOUNTS[index % len(AMOUNTS)],
            idempotency_key=f"{run}-{index}",
        )
        purchase = await vending.request_payment(purchase.purchase_id)
        assert purchase.provider_reference is not None  # noqa: S101 - the provider always answers
        opened.append((purchase.purchase_id, purchase.provider_reference))

    for start in range(0, purchases, 50):
        await asyncio.gather(*(one(i) for i in range(start, min(purchases, start + 50))))
    return opened


@dataclass
class Delivery:
    """What sending every confirmation took."""

    seconds: float
    latencies_s: list[float]
    per_instance: list[int]  # confirmations answered by each instance
    resent_after_503: int
    failed_over: int  # sent again to the next instance after a connection failure


async def deliver(
    references: list[str],
    ports: list[int],
    *,
    copies: int,
    concurrency: int,
    rng: random.Random,
    on_answered: Callable[[int], None] | None = None,
) -> Delivery:
    """Send each reference's confirmation ``copies`` times to random instances, all at once.

    Like a load balancer, a confirmation whose instance cannot be reached (or drops the
    connection) goes to the next instance; a 503 (not recorded) is sent again. ``on_answered``
    is told how many confirmations have been answered so far, after each one.
    """
    sends = [(reference, rng.randrange(len(ports))) for reference in references] * copies
    rng.shuffle(sends)
    latencies: list[float] = []
    per_instance = [0] * len(ports)
    resent = 0
    failed_over = 0
    answered = 0
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send(reference: str, target: int) -> None:
            nonlocal resent, failed_over, answered
            body = json.dumps({"reference": reference}).encode()
            async with gate:
                for _ in range(10 + len(ports)):
                    began = time.perf_counter()
                    try:
                        async with session.post(
                            f"http://127.0.0.1:{ports[target]}/notices", data=body
                        ) as response:
                            await response.read()
                            status = response.status
                    except aiohttp.ClientConnectionError:
                        failed_over += 1
                        target = (target + 1) % len(ports)
                        continue
                    latencies.append(time.perf_counter() - began)
                    if status == 200:
                        per_instance[target] += 1
                        answered += 1
                        if on_answered is not None:
                            on_answered(answered)
                        return
                    if status != 503:
                        raise RuntimeError(f"instance answered {status} for {reference}")
                    resent += 1
                raise RuntimeError(f"no instance took the confirmation of {reference}")

        began = time.perf_counter()
        await asyncio.gather(*(send(reference, target) for reference, target in sends))
        seconds = time.perf_counter() - began
    return Delivery(seconds, latencies, per_instance, resent, failed_over)


@dataclass
class Audit:
    """What the database says after the run."""

    vends: int
    vended_purchases: int
    not_vended: int
    token_messages: int
    purchases_without_one_message: int
    token_vended_events: int
    tid_violations: int

    def problems(self, purchases: int) -> list[str]:
        """Every exactly-once promise broken, in words (empty when all hold)."""
        found = []
        if self.vends != purchases or self.vended_purchases != purchases:
            found.append(f"{self.vends} vends for {purchases} purchases")
        if self.not_vended:
            found.append(f"{self.not_vended} purchases not VENDED")
        if self.token_messages != self.vends or self.purchases_without_one_message:
            found.append(
                f"{self.token_messages} token messages for {self.vends} vends"
                f" ({self.purchases_without_one_message} purchases without exactly one)"
            )
        if self.token_vended_events != self.vends:
            found.append(f"{self.token_vended_events} token_vended events")
        if self.tid_violations:
            found.append(f"{self.tid_violations} TIDs not strictly increasing per meter")
        return found


AUDIT_QUERIES = {
    "vends": "SELECT count(*) FROM vends",
    "vended_purchases": "SELECT count(DISTINCT purchase_id) FROM vends",
    "not_vended": "SELECT count(*) FROM purchases WHERE state NOT IN ('vended', 'delivered')",
    "token_messages": "SELECT count(*) FROM outbox WHERE kind = 'token'",
    "purchases_without_one_message": (
        "SELECT count(*) FROM vends v WHERE (SELECT count(*) FROM outbox o"
        " WHERE o.purchase_id = v.purchase_id AND o.kind = 'token') <> 1"
    ),
    "token_vended_events": "SELECT count(*) FROM events WHERE kind = 'token_vended'",
    "tid_violations": (
        "SELECT count(*) FROM (SELECT tid, lag(tid) OVER (PARTITION BY meter ORDER BY vend_id)"
        " AS before FROM vends) t WHERE before IS NOT NULL AND tid <= before"
    ),
}


async def audit(url: str, schema: str | None) -> Audit:
    """Count, in SQL, what exactly-once requires."""
    counts: dict[str, int] = {}
    if is_postgres_url(url):
        settings = {"search_path": schema} if schema else {}
        conn = await asyncpg.connect(url, server_settings=settings)
        try:
            for name, sql in AUDIT_QUERIES.items():
                counts[name] = int(await conn.fetchval(sql))
        finally:
            await conn.close()
    else:
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
            for name, sql in AUDIT_QUERIES.items():
                counts[name] = int(conn.execute(sql).fetchone()[0])
    return Audit(**counts)


async def scenario(
    label: str, url: str, *, instances: int, args: argparse.Namespace, kill_at: float = 0.0
) -> dict[str, Any]:
    """One measured run on a fresh database; its figures.

    ``kill_at`` > 0: the first instance is SIGKILLed once that fraction of the confirmations
    has been answered; the balancer sends what it was handling on to the others (its CPU and
    counters are then not reported, the audit is).
    """
    schema = f"bench_{uuid.uuid4().hex[:12]}" if is_postgres_url(url) else None
    if schema:
        await create_schema(url, schema)
    try:
        async with open_any_ledger(url, schema) as ledger:
            opened = await prepare(
                ledger, purchases=args.purchases, meters=args.meters, run=uuid.uuid4().hex[:8]
            )
        name = f"bench-{uuid.uuid4().hex[:8]}"
        async with start_instances(
            instances, url, schema, pool=args.pool, application_name=name
        ) as running:
            ports = [instance.port for instance in running]
            counted_before = await instance_stats(ports)
            meter = await CpuMeter.start(url, name, [i.process.pid for i in running])
            kill_after = int(args.purchases * args.deliveries * kill_at) if kill_at else None

            def maybe_kill(answered: int) -> None:
                if answered == kill_after and running[0].process.returncode is None:
                    running[0].process.send_signal(signal.SIGKILL)

            delivery = await deliver(
                [reference for _, reference in opened],
                ports,
                copies=args.deliveries,
                concurrency=args.concurrency,
                rng=random.Random(args.seed),
                on_answered=maybe_kill if kill_after else None,
            )
            gateway_cpu_s, database_cpu_s = await meter.stop()
            if kill_after:  # the dead process's CPU and counters are gone with it
                gateway_cpu_s = database_cpu_s = 0.0
            counted_after = await instance_stats(ports) if not kill_after else counted_before
        async with open_any_ledger(url, schema) as ledger:
            swept = await build_vending(ledger).finish_paid(limit=args.purchases)
        found = await audit(url, schema)
    finally:
        if schema:
            await drop_schema(url, schema)
    latencies = sorted(delivery.latencies_s)
    vends = args.purchases

    def counted(key: str) -> int:
        return sum(a[key] - b[key] for a, b in zip(counted_after, counted_before, strict=True))

    return {
        "scenario": label,
        "instances": instances,
        "killed_one": bool(kill_at),
        "purchases": args.purchases,
        "gateway_cpu_us_per_vend": round(gateway_cpu_s / vends * 1e6),
        "database_cpu_us_per_vend": round(database_cpu_s / vends * 1e6),
        "cpu_us_per_vend": round((gateway_cpu_s + database_cpu_s) / vends * 1e6),
        "commits_per_vend": round(counted("commits") / vends, 2),
        "tid_conflicts_per_1000": round(counted("tid_conflicts") * 1000 / vends, 1),
        "deliveries": len(latencies),
        "seconds": round(delivery.seconds, 3),
        "vends_per_s": round(args.purchases / delivery.seconds, 1),
        "deliveries_per_s": round(len(latencies) / delivery.seconds, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
        "per_instance": delivery.per_instance,
        "resent_after_503": delivery.resent_after_503,
        "failed_over": delivery.failed_over,
        "finished_by_sweep": swept,
        "audit": found.__dict__,
        "problems": found.problems(args.purchases),
    }


# --- the same through real ``gateway serve`` processes ------------------------------------------


class Balancer:
    """A loopback balancer: payment callbacks go ``copies`` times to random instances at once."""

    def __init__(self, rng: random.Random, copies: int) -> None:
        self.rng = rng
        self.copies = copies
        self.ports: list[int] = []
        self.session: aiohttp.ClientSession | None = None
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.forward)

    async def forward(self, request: web.Request) -> web.Response:
        """Send the request on to one instance, or ``copies`` for a payment callback."""
        session = self.session
        assert session is not None  # noqa: S101 - set before serving
        body = await request.read()
        skip = {"host", "content-length", "transfer-encoding"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        copies = self.copies if request.path.startswith("/payments/") else 1

        async def one(port: int) -> tuple[int, bytes, str]:
            url = f"http://127.0.0.1:{port}{request.path_qs}"
            async with session.request(request.method, url, data=body, headers=headers) as got:
                return got.status, await got.read(), got.content_type

        try:
            answers = await asyncio.gather(
                *(one(self.ports[self.rng.randrange(len(self.ports))]) for _ in range(copies))
            )
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
    stack: contextlib.AsyncExitStack, env: dict[str, str], data: Path, *, workers: int = 1
) -> int:
    """``gateway serve --workers N`` on a free port; its port once it answers (SIGINT at exit)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "gateway", "serve", "--port", str(port), "--data-dir", str(data)),
        *("--workers", str(workers)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )

    async def stop() -> None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(process.wait(), timeout=15)
        except TimeoutError:
            process.kill()
            await process.wait()

    stack.push_async_callback(stop)
    assert process.stdout is not None  # noqa: S101 - asked for above
    while line := (await asyncio.wait_for(process.stdout.readline(), timeout=30)).decode():
        if line.strip().startswith("routes:"):
            return port
    raise RuntimeError("gateway serve did not start")


async def seed_production(
    url: str, schema: str | None, master_key: bytes, meters: int
) -> list[MeterNumber]:
    """Tariff, meters and the sealed vending key, as an operator loads them; the meters."""
    drns = [make_drn(8100 + i) for i in range(meters)]
    async with open_any_ledger(url, schema) as ledger:
        await ledger.put_tariff(TARIFF)
        for drn in drns:
            await ledger.put_meter(meter_record(drn))
        await ledger.put_vending_key(
            seal_vending_key(
                VendingKeyMaterial(
                    sgc=VENDING_KEY.sgc, krn=VENDING_KEY.krn, key_type=2, ea=7,
                    dkga=VENDING_KEY.dkga, base_date=VENDING_KEY.base_date, key=VENDING_KEY.key,
                ),
                master_key,
            )
        )  # fmt: skip
    return drns


async def ussd_purchase(
    http: aiohttp.ClientSession, ports: list[int], phone: str, meter: str, rng: random.Random
) -> str:
    """Dial, Buy, meter, KES 250, confirm; each hop to a random instance. The last screen."""
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
            reply = await r.text()
    return reply


async def serve_scenario(  # noqa: PLR0915 - one measured run, read top to bottom
    label: str,
    url: str,
    *,
    instances: int,
    args: argparse.Namespace,
    tmp: Path,
    workers: int = 1,
) -> dict[str, Any]:
    """Purchases over USSD through real ``gateway serve`` processes, until every token SMS."""
    purchases = args.serve_purchases
    schema = f"bench_{uuid.uuid4().hex[:12]}" if is_postgres_url(url) else None
    if schema:
        await create_schema(url, schema)
    master_key = os.urandom(32)
    rng = random.Random(args.seed)
    phones = [f"+2547{30000000 + i:08d}" for i in range(purchases)]
    started: dict[str, float] = {}
    texted: dict[str, float] = {}
    done = asyncio.Event()
    try:
        drns = await seed_production(url, schema, master_key, args.meters)
        momo = MomoSimulator(currency="KES", answer_delay_s=0.2)
        balancer = Balancer(rng, args.deliveries)
        async with aiohttp.ClientSession() as http, contextlib.AsyncExitStack() as stack:
            balancer.session = http
            public = await serve_on_loopback(stack, balancer.app)
            at = AtSimulator(delivery_url=public + "/sms/africastalking/delivery")
            stack.push_async_callback(at.close)

            @web.middleware
            async def watch(request: web.Request, handler: Handler) -> web.StreamResponse:
                response = await handler(request)
                for sms in at.sent:
                    texted.setdefault(sms.to, time.perf_counter())
                if len(texted) >= purchases:
                    done.set()
                return response

            at.app.middlewares.append(watch)
            momo_url = await serve_on_loopback(stack, momo.app)
            at_url = await serve_on_loopback(stack, at.app)
            database = f"{url}?search_path={schema}" if schema else url
            env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
            env |= {
                "GATEWAY_MODE": "production",
                "GATEWAY_DATABASE_URL": database,
                "GATEWAY_LEDGER_POOL_SIZE": str(args.pool),
                "GATEWAY_SESSION_STORE": "redis" if schema else "sqlite",
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
                "GATEWAY_LOG_LEVEL": "error",
            }
            for index in range(instances):
                data = tmp / f"{label}-{instances}-{index}"
                balancer.ports.append(await start_gateway(stack, env, data, workers=workers))
            gate = asyncio.Semaphore(args.concurrency)

            async def buy(index: int) -> None:
                async with gate:
                    started[phones[index]] = time.perf_counter()
                    await ussd_purchase(
                        http, balancer.ports, phones[index], drns[index % len(drns)], rng
                    )

            began = time.perf_counter()
            await asyncio.gather(*(buy(i) for i in range(purchases)))
            await asyncio.wait_for(done.wait(), timeout=300)
            seconds = time.perf_counter() - began
        found = await audit(url, schema)
        per_phone = Counter(sms.to for sms in at.sent)
    finally:
        if schema:
            await drop_schema(url, schema)
    problems = found.problems(purchases)
    if sorted(per_phone.values()) != [1] * purchases:
        problems.append("not exactly one SMS per phone")
    latencies = sorted(texted[p] - started[p] for p in phones)
    return {
        "scenario": f"serve-{label}" + (f"-workers{workers}" if workers > 1 else ""),
        "instances": instances,
        "workers": workers,
        "purchases": purchases,
        "seconds": round(seconds, 3),
        "purchases_per_s": round(purchases / seconds, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 1),
        "audit": found.__dict__,
        "problems": problems,
    }


async def main(args: argparse.Namespace) -> int:
    """Run the scenarios; print the figures and the JSON line. Non-zero if an audit failed."""
    configure_logging(json=True, level="error", stream=sys.stderr)
    print(
        f"cpus={os.cpu_count()} purchases={args.purchases} meters={args.meters}"
        f" deliveries={args.deliveries}x concurrency={args.concurrency}"
    )
    results = []
    serve_results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        plan = [("postgres", args.database_url, 1), ("postgres", args.database_url, 2)]
        if not args.skip_sqlite:
            plan.append(("sqlite", f"sqlite:///{Path(tmp) / 'ledger.db'}", 1))
        for label, url, instances in plan:
            result = await scenario(label, url, instances=instances, args=args)
            results.append(result)
            verdict = "exactly-once OK" if not result["problems"] else "; ".join(result["problems"])
            print(
                f"{label:8} x{instances}: {result['vends_per_s']:8.1f} vends/s"
                f"  {result['deliveries_per_s']:8.1f} deliveries/s"
                f"  p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms"
                f"  swept {result['finished_by_sweep']}  {verdict}"
            )
            print(
                f"{'':12}CPU per vend {result['cpu_us_per_vend']:6d} us"
                f" (gateway {result['gateway_cpu_us_per_vend']} us"
                f" + database backends {result['database_cpu_us_per_vend']} us)"
                f"  commits per vend {result['commits_per_vend']}"
                f"  TID conflicts per 1,000 vends {result['tid_conflicts_per_1000']}"
            )
        if args.kill:
            killed = await scenario(
                "postgres-kill", args.database_url, instances=2, args=args, kill_at=0.3
            )
            results.append(killed)
            verdict = "exactly-once OK" if not killed["problems"] else "; ".join(killed["problems"])
            print(
                f"postgres x2, one SIGKILLed at 30%: {killed['vends_per_s']:.1f} vends/s"
                f"  failed over {killed['failed_over']}"
                f"  finished by the recovery sweep {killed['finished_by_sweep']}  {verdict}"
            )
        if args.serve_purchases:
            print(
                f"real gateway serve: {args.serve_purchases} USSD purchases, MoMo callbacks"
                f" {args.deliveries}x to random instances, until every token SMS"
            )
            serve_plan = [
                ("postgres", args.database_url, 1, 1),
                ("postgres", args.database_url, 2, 1),
                ("postgres", args.database_url, 1, 2),
            ]
            if not args.skip_sqlite:
                serve_plan.append(("sqlite", f"sqlite:///{Path(tmp) / 'serve.db'}", 1, 1))
            for label, url, instances, workers in serve_plan:
                served = await serve_scenario(
                    label, url, instances=instances, args=args, tmp=Path(tmp), workers=workers
                )
                serve_results.append(served)
                verdict = (
                    "exactly-once OK" if not served["problems"] else "; ".join(served["problems"])
                )
                shape = f"x{instances}" + (f" --workers {workers}" if workers > 1 else "")
                print(
                    f"serve {label:8} {shape}: {served['purchases_per_s']:7.1f} purchases/s"
                    f"  USSD dial to token SMS p50 {served['p50_ms']:8.1f} ms"
                    f"  p99 {served['p99_ms']:8.1f} ms  {verdict}"
                )
    by_key = {(r["scenario"], r["instances"]): r["vends_per_s"] for r in results}
    runs = {(r["scenario"], r["instances"]): r for r in results}
    sqlite_run = runs.get(("sqlite", 1))
    serve_key = {(r["scenario"], r["instances"]): r["purchases_per_s"] for r in serve_results}
    summary: dict[str, Any] = {
        "bench": "scale",
        "purchases": args.purchases,
        "deliveries_per_purchase": args.deliveries,
        "postgres_1_vends_per_s": by_key[("postgres", 1)],
        "postgres_2_vends_per_s": by_key[("postgres", 2)],
        "postgres_2_over_1": round(by_key[("postgres", 2)] / by_key[("postgres", 1)], 2),
        "sqlite_1_vends_per_s": by_key.get(("sqlite", 1)),
        "pg_cpu_us_per_vend": runs[("postgres", 1)]["cpu_us_per_vend"],
        "pg_2_cpu_us_per_vend": runs[("postgres", 2)]["cpu_us_per_vend"],
        "sqlite_cpu_us_per_vend": sqlite_run["cpu_us_per_vend"] if sqlite_run else None,
        "pg_over_sqlite_cpu": (
            round(runs[("postgres", 1)]["cpu_us_per_vend"] / sqlite_run["cpu_us_per_vend"], 2)
            if sqlite_run
            else None
        ),
        "pg_commits_per_vend": runs[("postgres", 1)]["commits_per_vend"],
        "tid_conflicts_per_1000": max(
            r["tid_conflicts_per_1000"] for r in results if r["scenario"] == "postgres"
        ),
        "killed_one_exactly_once": next(
            (not r["problems"] for r in results if r["scenario"] == "postgres-kill"), None
        ),
        "serve_postgres_1_purchases_per_s": serve_key.get(("serve-postgres", 1)),
        "serve_postgres_2_purchases_per_s": serve_key.get(("serve-postgres", 2)),
        "serve_postgres_1_workers_2_purchases_per_s": serve_key.get(("serve-postgres-workers2", 1)),
        "serve_sqlite_1_purchases_per_s": serve_key.get(("serve-sqlite", 1)),
        "exactly_once": all(not r["problems"] for r in [*results, *serve_results]),
        "runs": [*results, *serve_results],
    }
    print(json.dumps(summary, separators=(",", ":")))
    return 0 if summary["exactly_once"] else 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line (``instance`` starts one instance process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command")
    instance = sub.add_parser("instance", help="serve POST /notices (started by the driver)")
    instance.add_argument("--database-url", required=True)
    instance.add_argument("--schema")
    instance.add_argument("--host", default="127.0.0.1")
    instance.add_argument("--port", type=int, default=0)
    instance.add_argument("--pool", type=int, default=8)
    instance.add_argument("--application-name", default="sts-gateway")
    parser.add_argument("--database-url", default=PG_URL)
    parser.add_argument("--purchases", type=int, default=2000)
    parser.add_argument("--meters", type=int, default=50)
    parser.add_argument("--deliveries", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--pool", type=int, default=4, help="ledger connections per instance")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument(
        "--no-kill",
        dest="kill",
        action="store_false",
        help="skip the run that SIGKILLs one of two PostgreSQL instances mid-load",
    )
    parser.add_argument(
        "--serve-purchases",
        type=int,
        default=300,
        help="USSD purchases through real gateway serve processes (0: skip that part)",
    )
    parser.add_argument("--quick", action="store_true", help="300 purchases, 100 through serve")
    args = parser.parse_args(argv)
    if getattr(args, "quick", False):
        args.purchases = 300
        args.serve_purchases = min(args.serve_purchases, 100)
    return args


if __name__ == "__main__":
    parsed = parse_args(sys.argv[1:])
    if parsed.command == "instance":
        asyncio.run(serve_instance(parsed))
        sys.exit(0)
    sys.exit(asyncio.run(main(parsed)))
