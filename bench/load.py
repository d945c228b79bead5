"""Load, faults and SIGKILLs against a whole running gateway, then an independent audit.

```
python bench/load.py [--purchases N | --duration-s S] [--concurrency C] [--meters M]
                     [--faults] [--kills K] [--kill-every-s LO HI] [--seed N] [--json] …
```

What runs, each in its own process:

- ``gateway sim`` (the AT, Daraja, MoMo and Airtel simulators, with the chaos knobs the fault
  switches turn on): its records of money taken and SMS accepted survive every gateway kill;
- ``gateway serve`` with ``payments = daraja`` and ``sms = africastalking`` pointed at those
  simulators (demo mode allows that), on a fresh SQLite data directory holding a vending key and
  ``--meters`` meters this harness generated (imported with ``gateway keys add`` and
  ``gateway meters import``);
- this process: many simulated customers at once, each with its own phone, buying by USSD (AT's
  form POSTs to ``/ussd/africastalking``, five hops: home, buy, meter, amount, pay), by SMS
  (``BUY <meter> <amount>`` through the AT simulator's inbound SMS) or by C2B paybill (the Daraja
  simulator's "SIM menu" payment, account = meter number). A customer whose attempt fails (the
  gateway was being killed) tries again, as people do.

Fault switches (``--faults`` turns them all on at the rates below; each has its own flag):
callbacks duplicated (30 %), lost (10 %), delayed up to 2 s and so reordered; status queries
failing (5 %) and hanging past the adapters' deadline (2 %); SMS sends failing (10 %); the gateway
SIGKILLed every ``--kill-every-s`` seconds and restarted (``--kills``).

When the customers are done the fault switches are turned off (the outage is over;
``--faulty-drain`` keeps them on) and the harness drains: it waits (``--drain-timeout-s``) until
no purchase is pending recovery (money taken without a delivered token, by the simulators'
records; paid purchases not vended, by the ledger). The drain ends ``recovered`` (every payment
has its token delivered), ``settled`` (nothing pending, but some payments are second charges for
one purchase, which never get a token) or ``timeout``; ``recovery_s`` is the time from the last
fault (the last kill; with none, the load's end) to that end. Then ``bench/audit.py``'s auditor
reads only the simulators' records and keys every token into a meter emulator. Printed: how the
drain ended, USSD hops/s with p50/p99 latency, purchases/s offered, vends/s (from the ledger's
vend times), payment-confirmed (ledger event) to SMS-accepted (AT simulator clock) latency
p50/p99, what the faults did, the audit's counts; then one JSON line (``figures`` holds
``drain_end``, ``drain_pending`` and ``recovery_s``, null on a timeout). Exit status 1 when any
audit count is non-zero.

The long run of docs/performance.md: ``python bench/load.py --purchases 10000 --faults --kills 50``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import csv
import importlib.util
import itertools
import json
import os
import random
import secrets
import signal
import sqlite3
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any, Final, TextIO

import aiohttp

from gateway.demo_data import DEMO_TARIFF
from gateway.ledger import open_ledger
from gateway.sts.pan import luhn_check_digit

HERE: Final = Path(__file__).resolve().parent
SGC: Final = "600001"  # the harness's own supply group, so its key is nobody else's
KRN: Final = 1
SERVICE_CODE: Final = "*384*123#"
CALLBACK_SECRET_BYTES: Final = 24
FAULT_NAMES: Final = (
    "duplicate",
    "lose",
    "delay_max_s",
    "query_errors",
    "query_timeouts",
    "sms_errors",
)
METER_COLUMNS: Final = (
    "drn",
    "customer_name",
    "area",
    "sgc",
    "tariff_index",
    "krn",
    "tariff_id",
    "key_type",
    "ea",
    "dkga",
    "base_date",
    "ken",
    "iin",
    "status",
)


def _load_bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    if spec is None or spec.loader is None:  # pragma: no cover - the file sits next to this one
        raise ImportError(f"bench/{name}.py not found")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(f"bench_{name}", module)
    spec.loader.exec_module(module)
    return module


def _load_auditor() -> ModuleType:
    return _load_bench("audit")


# --- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Faults:
    """The fault switches (rates 0 to 1); the all-on set is ``Faults.all_on()``."""

    duplicate: float = 0.0
    lose: float = 0.0
    delay_max_s: float = 0.0
    query_errors: float = 0.0
    query_timeouts: float = 0.0
    sms_errors: float = 0.0

    @classmethod
    def all_on(cls) -> Faults:
        """Every switch on at the issue's rates."""
        return cls(
            duplicate=0.3,
            lose=0.1,
            delay_max_s=2.0,
            query_errors=0.05,
            query_timeouts=0.02,
            sms_errors=0.1,
        )

    def sim_flags(self) -> list[str]:
        """The ``gateway sim`` flags that turn these on."""
        return [
            f"--duplicate={self.duplicate}",
            f"--lose={self.lose}",
            f"--delay-max-s={self.delay_max_s}",
            f"--query-errors={self.query_errors}",
            f"--query-timeouts={self.query_timeouts}",
            f"--sms-errors={self.sms_errors}",
        ]


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadSettings:
    """One run's settings.

    ``purchases`` or ``duration_s`` bounds the offered load (both: whichever ends first); the
    load also goes on until ``kills`` kills happened.
    """

    purchases: int | None = 2000
    duration_s: float | None = None
    concurrency: int = 48
    meters: int = 500
    mix: tuple[float, float, float] = (0.5, 0.25, 0.25)  # USSD, SMS, C2B
    faults: Faults = field(default_factory=Faults)
    kills: int = 0
    kill_every_s: tuple[float, float] = (2.0, 5.0)
    drain_timeout_s: float = 90.0
    seed: int = 1
    workdir: Path | None = None
    show_progress: bool = True
    sweep_interval_s: float = 0.5
    payment_first_check_s: int = 2
    session_store: str = "sqlite"  # the gateway's USSD session store (sqlite | memory)
    calm_drain: bool = True  # switch the chaos off when the load ends (the outage is over)
    attacks: int = 0  # rounds of bench/attacks.py's forged callbacks during the load (0: none)
    # "" → a SQLite file in the work directory; a postgresql:// URL → a fresh database created
    # on that server for the run (and dropped after it).
    database_url: str = ""


# --- results -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (nearest rank), 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass(slots=True)
class Tally:
    """What the customers did, updated as they go."""

    started: int = 0
    done: int = 0
    gave_up: int = 0
    retries: int = 0
    by_channel: Counter[str] = field(default_factory=Counter)
    hop_latencies_s: list[float] = field(default_factory=list)
    hop_errors: int = 0
    kills: int = 0
    restart_s: list[float] = field(default_factory=list)
    last_fault_at: float = 0.0  # perf_counter of the last kill (its restart began)


@dataclass(slots=True, kw_only=True)
class LoadResult:
    """The figures of one run and the audit."""

    settings: dict[str, Any]
    figures: dict[str, Any]
    chaos: dict[str, Any]
    audit: dict[str, Any]
    ok: bool
    lines: list[str]


# --- set-up --------------------------------------------------------------------------------------


def meter_numbers(count: int) -> list[str]:
    """``count`` distinct 11-digit meter numbers with valid check digits (``0500…``)."""
    drns = []
    for n in range(1, count + 1):
        body = f"0500{n:06d}"
        drns.append(body + luhn_check_digit(body))
    return drns


def write_fixtures(workdir: Path, meters: int) -> dict[str, Any]:
    """Generate the vending key, the meters CSV and the secrets; the paths and values."""
    key = secrets.token_bytes(20)
    key_path = workdir / "vending_key.json"
    key_path.write_text(
        json.dumps({"sgc": SGC, "krn": KRN, "dkga": 4, "base_date": 2014, "key_hex": key.hex()}),
        encoding="utf-8",
    )
    key_path.chmod(0o600)
    key_hex_path = workdir / "vending_key.hex"
    key_hex_path.write_text(key.hex() + "\n", encoding="ascii")
    key_hex_path.chmod(0o600)
    meters_path = workdir / "meters.csv"
    drns = meter_numbers(meters)
    with meters_path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(METER_COLUMNS)
        for drn in drns:
            name = ("Load Customer", "Bench")
            key_attributes = (SGC, "01", KRN, DEMO_TARIFF.tariff_id, 2, 7, 4, 2014, 255)
            writer.writerow((drn, *name, *key_attributes, "600727", "active"))
    return {
        "key": key,
        "key_path": key_path,
        "key_hex_path": key_hex_path,
        "meters_path": meters_path,
        "drns": drns,
        "master_key": base64.b64encode(secrets.token_bytes(32)).decode(),
        "callback_secret": secrets.token_urlsafe(CALLBACK_SECRET_BYTES),
        "admin_token": secrets.token_urlsafe(24),
    }


async def seed_tariff(database_url: str) -> None:
    """Write the demo tariff the meters use, before they are imported.

    The gateway seeds it only at its first start, and no command writes tariffs yet.
    """
    async with open_ledger(database_url) as ledger:
        await ledger.put_tariff(DEMO_TARIFF)


def _is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


class LedgerReader:
    """Read-only queries on the gateway's database, SQLite or PostgreSQL (``?`` placeholders)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: Any = None

    async def rows(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        """The rows of ``sql`` (timestamps as the driver gives them: see ``epoch``)."""
        if not _is_postgres(self.url):
            return await asyncio.to_thread(self._sqlite_rows, sql, args)
        if self._pool is None:
            import asyncpg  # type: ignore[import-untyped]  # noqa: PLC0415 - PostgreSQL only

            self._pool = await asyncpg.create_pool(self.url, min_size=0, max_size=2)
        numbered = sql
        for n in range(1, len(args) + 1):
            numbered = numbered.replace("?", f"${n}", 1)
        return [tuple(row) for row in await self._pool.fetch(numbered, *args)]

    def _sqlite_rows(self, sql: str, args: Sequence[object]) -> list[tuple[Any, ...]]:
        path = self.url.removeprefix("sqlite:///")
        with contextlib.closing(
            sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        ) as conn:
            return [tuple(row) for row in conn.execute(sql, args)]

    async def close(self) -> None:
        """Close the PostgreSQL pool, if one was opened."""
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


def epoch(value: object) -> float:
    """A ledger timestamp (ISO text from SQLite, a datetime from PostgreSQL) as epoch seconds."""
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value)).timestamp()


@contextlib.asynccontextmanager
async def run_database(settings: LoadSettings, workdir: Path) -> AsyncIterator[str]:
    """The database URL of one run: a SQLite file, or a fresh PostgreSQL database dropped after."""
    if not _is_postgres(settings.database_url):
        yield f"sqlite:///{workdir / 'data' / 'gateway.db'}"
        return
    import asyncpg  # noqa: PLC0415 - PostgreSQL only

    name = f"load_{secrets.token_hex(6)}"
    base, _, _db = settings.database_url.rpartition("/")
    admin = await asyncpg.connect(settings.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{base}/{name}"
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def free_port() -> int:
    """A TCP port free on loopback right now."""
    import socket  # noqa: PLC0415 - only here

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- processes -----------------------------------------------------------------------------------


class Processes:
    """The simulator and gateway processes of one run (started, killed, restarted, stopped)."""

    def __init__(
        self,
        workdir: Path,
        fixtures: dict[str, Any],
        settings: LoadSettings,
        database_url: str,
    ) -> None:
        self.workdir = workdir
        self.database_url = database_url
        self.reader = LedgerReader(database_url)
        self.fixtures = fixtures
        self.settings = settings
        self.port = free_port()
        self.gateway_url = f"http://127.0.0.1:{self.port}"
        self.sims: dict[str, Any] = {}
        self._sim: asyncio.subprocess.Process | None = None
        self._gateway: asyncio.subprocess.Process | None = None
        self._log: TextIO | None = None
        self.env: dict[str, str] = {}
        self._gateway_cpu_done = 0.0
        self._cpu_mark = (0.0, 0.0, 0.0)

    async def start_sims(self) -> dict[str, Any]:
        """Start ``gateway sim`` and read its JSON line."""
        command = [
            sys.executable,
            "-m",
            "gateway",
            "sim",
            "--json",
            f"--gateway={self.gateway_url}",
            f"--callback-secret={self.fixtures['callback_secret']}",
            f"--seed={self.settings.seed}",
            *self.settings.faults.sim_flags(),
        ]
        sim_log = (self.workdir / "sim.log").open("ab")
        self._sim = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=sim_log, env=self._base_env()
        )
        sim_log.close()
        assert self._sim.stdout is not None  # noqa: S101 - PIPE was asked for
        async with asyncio.timeout(60):
            line = await self._sim.stdout.readline()
        if not line:
            raise RuntimeError(f"gateway sim did not start; see {self.workdir / 'sim.log'}")
        self.sims = json.loads(line)
        (self.workdir / "sims.json").write_text(line.decode(), encoding="utf-8")
        self.env = self._gateway_env()
        return self.sims

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env["GATEWAY_LOG_LEVEL"] = "warning"
        env["GATEWAY_LOG_JSON"] = "true"
        return env

    def _gateway_env(self) -> dict[str, str]:
        sims = self.sims
        creds = sims["credentials"]
        daraja = creds["daraja"]
        at = creds["africastalking"]
        return {
            **self._base_env(),
            "GATEWAY_MASTER_KEY": self.fixtures["master_key"],
            "GATEWAY_CALLBACK_SECRET": self.fixtures["callback_secret"],
            "GATEWAY_ADMIN_TOKEN": self.fixtures["admin_token"],
            "GATEWAY_PAYMENTS": "daraja",
            "GATEWAY_SMS": "africastalking",
            "GATEWAY_DARAJA_BASE_URL": sims["daraja"],
            "GATEWAY_DARAJA_KEY": daraja["key"],
            "GATEWAY_DARAJA_SECRET": daraja["secret"],
            "GATEWAY_DARAJA_SHORTCODE": daraja["shortcode"],
            "GATEWAY_DARAJA_PASSKEY": daraja["passkey"],
            "GATEWAY_DARAJA_INITIATOR": daraja["initiator"],
            "GATEWAY_DARAJA_SECURITY_CREDENTIAL": daraja["security_credential"],
            "GATEWAY_AFRICASTALKING_BASE_URL": sims["africastalking"] + "/version1",
            "GATEWAY_AFRICASTALKING_USERNAME": at["username"],
            "GATEWAY_AFRICASTALKING_KEY": at["key"],
            "GATEWAY_AFRICASTALKING_CLIENT": "http",
            "GATEWAY_PAYMENT_FIRST_CHECK_S": str(self.settings.payment_first_check_s),
            "GATEWAY_SWEEP_INTERVAL_S": str(self.settings.sweep_interval_s),
            "GATEWAY_SESSION_STORE": self.settings.session_store,
            "GATEWAY_DATABASE_URL": self.database_url,
        }

    async def _gateway_command(self, *args: str) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            *args,
            "--data-dir",
            str(self.workdir / "data"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**self.env, "GATEWAY_LOG_LEVEL": "error"},
        )
        out, err = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"gateway {args[:2]} failed: {out.decode()} {err.decode()}")

    async def import_key_and_meters(self) -> None:
        """``gateway keys add`` the generated vending key, ``gateway meters import`` the CSV."""
        await self._gateway_command(
            "keys",
            "add",
            f"--sgc={SGC}",
            f"--krn={KRN}",
            "--dkga=4",
            "--base-date=2014",
            f"--key-file={self.fixtures['key_hex_path']}",
        )
        await self._gateway_command("meters", "import", str(self.fixtures["meters_path"]))

    async def start_gateway(self) -> float:
        """Start ``gateway serve`` and wait until ``/readyz`` answers 200; seconds it took."""
        began = time.perf_counter()
        log = (self.workdir / "gateway.log").open("ab")
        self._gateway = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--data-dir",
            str(self.workdir / "data"),
            "--port",
            str(self.port),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
            env=self.env,
        )
        log.close()
        async with aiohttp.ClientSession() as session, asyncio.timeout(60):
            while True:
                if self._gateway.returncode is not None:
                    raise RuntimeError(f"gateway exited; see {self.workdir / 'gateway.log'}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(self.gateway_url + "/readyz") as response:
                        if response.status == 200:
                            return time.perf_counter() - began
                await asyncio.sleep(0.05)

    def _cpu_of(self, process: asyncio.subprocess.Process | None) -> float:
        """User + system CPU seconds of a live child (``/proc``; 0.0 where unavailable)."""
        if process is None or process.returncode is not None:
            return 0.0
        try:
            fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def mark_cpu(self) -> None:
        """Remember the CPU use so far (call when the load starts)."""
        self._cpu_mark = (
            self._gateway_cpu_done + self._cpu_of(self._gateway),
            self._cpu_of(self._sim),
            time.process_time(),
        )

    def cpu_seconds(self, _load_s: float) -> dict[str, float]:
        """CPU seconds each process used since ``mark_cpu`` (killed gateways included)."""
        gateway = self._gateway_cpu_done + self._cpu_of(self._gateway) - self._cpu_mark[0]
        return {
            "cpu_gateway_s": round(gateway, 1),
            "cpu_sims_s": round(self._cpu_of(self._sim) - self._cpu_mark[1], 1),
            "cpu_load_s": round(time.process_time() - self._cpu_mark[2], 1),
        }

    async def kill_gateway(self) -> None:
        """SIGKILL the gateway and reap it."""
        if self._gateway is not None and self._gateway.returncode is None:
            self._gateway_cpu_done += self._cpu_of(self._gateway)
            self._gateway.send_signal(signal.SIGKILL)
            await self._gateway.wait()

    async def stop(self) -> None:
        """Stop both processes (SIGTERM, then SIGKILL if they linger)."""
        for process in (self._gateway, self._sim):
            if process is None or process.returncode is not None:
                continue
            process.terminate()
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


# --- customers -----------------------------------------------------------------------------------


class Customers:
    """Simulated customers: each purchase has its own phone, a meter and an amount."""

    def __init__(
        self,
        settings: LoadSettings,
        procs: Processes,
        drns: Sequence[str],
        session: aiohttp.ClientSession,
    ) -> None:
        self.settings = settings
        self.procs = procs
        self.drns = drns
        self.session = session
        self.tally = Tally()
        self.rng = random.Random(settings.seed)
        self._numbers = itertools.count(1)
        self.first_at = 0.0
        self.last_at = 0.0

    def _phone(self, n: int) -> str:
        return f"+25471{n:07d}"

    async def _ussd(self, phone: str, meter: str, amount: int) -> bool:
        session_id = "ATUid_" + uuid.uuid4().hex
        answers = ["", "1", f"1*{meter}", f"1*{meter}*{amount}", f"1*{meter}*{amount}*1"]
        for text in answers:
            form = {
                "sessionId": session_id,
                "serviceCode": SERVICE_CODE,
                "phoneNumber": phone,
                "networkCode": "63902",
                "text": text,
            }
            began = time.perf_counter()
            try:
                async with self.session.post(
                    self.procs.gateway_url + "/ussd/africastalking", data=form
                ) as response:
                    body = await response.text()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                self.tally.hop_errors += 1
                return False
            if status != 200 or not body.startswith(("CON ", "END ")):
                self.tally.hop_errors += 1
                return False
            self.tally.hop_latencies_s.append(time.perf_counter() - began)
        return body.startswith("END You will get a payment prompt")

    async def _sms(self, phone: str, meter: str, amount: int) -> bool:
        form = {"from": phone, "text": f"BUY {meter} {amount}"}
        try:
            async with self.session.post(
                self.procs.sims["africastalking"] + "/sim/sms", data=form
            ) as response:
                answer = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False
        return bool(answer.get("callbackStatus") == 200)

    async def _c2b(self, phone: str, meter: str, amount: int) -> bool:
        body = {"msisdn": phone.removeprefix("+"), "bill_ref": meter, "amount": amount}
        try:
            async with self.session.post(
                self.procs.sims["daraja"] + "/_sim/c2b/pay", json=body
            ) as response:
                answer = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False
        # Refused at validation (the gateway was down: Daraja's default applies, see sim docs).
        return bool(answer.get("accepted"))

    async def buy(self) -> None:
        """One customer's purchase, tried again (up to five times) when the gateway is away."""
        n = next(self._numbers)
        phone = self._phone(n)
        meter = self.drns[n % len(self.drns)]
        amount = self.rng.randint(50, 500)
        channel = self.rng.choices(["ussd", "sms", "c2b"], weights=self.settings.mix)[0]
        action = {"ussd": self._ussd, "sms": self._sms, "c2b": self._c2b}[channel]
        self.tally.started += 1
        self.tally.by_channel[channel] += 1
        for attempt in range(5):
            # Each attempt its own amount: the auditor tells a customer's retry from a second
            # charge for one purchase by it.
            if await action(phone, meter, amount + attempt):
                self.tally.done += 1
                return
            self.tally.retries += 1
            await asyncio.sleep(0.5 * (attempt + 1))
        self.tally.gave_up += 1


# --- the run -------------------------------------------------------------------------------------


def _progress(tally: Tally, began: float, out: TextIO, *, final: bool = False) -> None:
    elapsed = time.perf_counter() - began
    hops = len(tally.hop_latencies_s)
    line = (
        f"\r{elapsed:6.1f}s  purchases {tally.done}/{tally.started}  "
        f"hops {hops} ({hops / max(elapsed, 1e-9):.0f}/s)  retries {tally.retries}  "
        f"kills {tally.kills}   "
    )
    out.write(line + ("\n" if final else ""))
    out.flush()


async def _offer_load(customers: Customers, settings: LoadSettings, done: asyncio.Event) -> None:
    """Run customers, ``concurrency`` at a time, until the count/duration and the kills end."""
    began = time.perf_counter()

    def more() -> bool:
        tally = customers.tally
        under_count = settings.purchases is None or tally.started < settings.purchases
        under_time = (
            settings.duration_s is None or time.perf_counter() - began < settings.duration_s
        )
        return (under_count and under_time) or tally.kills < settings.kills

    async def worker() -> None:
        while more():
            await customers.buy()

    customers.first_at = time.time()
    async with asyncio.TaskGroup() as group:
        for _ in range(settings.concurrency):
            group.create_task(worker())
    customers.last_at = time.time()
    done.set()


async def _kill_loop(
    procs: Processes, tally: Tally, settings: LoadSettings, done: asyncio.Event
) -> None:
    rng = random.Random(settings.seed + 1)
    while tally.kills < settings.kills and not done.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(rng.uniform(*settings.kill_every_s)):
                await done.wait()
        if done.is_set():
            return
        await procs.kill_gateway()
        tally.kills += 1
        tally.last_fault_at = time.perf_counter()
        tally.restart_s.append(await procs.start_gateway())


async def _ticker(tally: Tally, began: float, done: asyncio.Event, out: TextIO) -> None:
    while not done.is_set():
        _progress(tally, began, out)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await done.wait()
    _progress(tally, began, out, final=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class DrainOutcome:
    """How the drain ended.

    ``end``: ``recovered`` (every payment has its token delivered and no purchase is still
    pending recovery), ``settled`` (nothing is pending any more, but some payments are second
    charges for one purchase: they never get a token, waiting does not change them) or
    ``timeout`` (still pending after ``--drain-timeout-s``). ``pending``: what was still
    pending at the end.
    """

    end: str
    pending: int
    waited_s: float
    ended_at: float  # perf_counter


async def ledger_pending(reader: LedgerReader) -> int:
    """Paid purchases the gateway has not vended yet (its sweeper still has to), read-only."""
    ((count,),) = await reader.rows(
        "SELECT COUNT(*) FROM purchases p LEFT JOIN vends v ON v.purchase_id = p.purchase_id"
        " WHERE p.state = 'paid' AND v.vend_id IS NULL"
    )
    return int(count)


#: Purchase states an operator's stuck lists show (gateway/web/admin.py); a paid purchase without
#: its token in any other state (or with no purchase at all) is one nobody will look at.
OPERATOR_SEES: Final = frozenset(
    {"created", "awaiting_payment", "paid", "vended", "vend_failed", "refund_pending"}
)
#: ... and a paybill (c2b) purchase that ended unpaid: its confirmation said money moved.
OPERATOR_SEES_PAYBILL: Final = frozenset({"payment_failed", "expired"})


async def paid_unseen_by_operator(reader: LedgerReader, references: Sequence[str]) -> list[str]:
    """Of charges no token carried, those whose purchase no operator list shows, read-only."""
    unseen = []
    for reference in references:
        rows = await reader.rows(
            "SELECT p.state, p.channel FROM purchases p WHERE p.provider_reference = ?"
            " OR p.purchase_id IN (SELECT purchase_id FROM payments WHERE reference = ?)",
            reference,
            reference,
        )
        if not rows:
            unseen.append(f"{reference}: no purchase")
            continue
        state, channel = rows[0]
        if state not in OPERATOR_SEES and not (channel == "c2b" and state in OPERATOR_SEES_PAYBILL):
            unseen.append(f"{reference}: {state}")
    return unseen


def drain_pending(report: Any, paid_not_vended: int) -> int:  # noqa: ANN401 - an AuditReport
    """Purchases still pending recovery: money without a delivered token, paid not vended.

    A second charge for one purchase never gets a token: waiting does not change it, so it is
    not pending (it makes the end ``settled``, not ``recovered``).
    """
    return (
        report.paid_without_token
        - report.charged_twice
        + report.undelivered_tokens
        + paid_not_vended
    )


def drain_end(pending: int, charged_twice: int) -> str:
    """How a drain ended: ``timeout``, ``settled`` (only second charges left) or ``recovered``."""
    if pending:
        return "timeout"
    return "settled" if charged_twice else "recovered"


async def _drain(
    auditor: ModuleType,
    procs: Processes,
    meters: Any,  # noqa: ANN401 - the auditor's meter profiles
    key: Any,  # noqa: ANN401 - the auditor's vending key
    timeout_s: float,
    out: TextIO | None,
) -> tuple[Any, DrainOutcome]:
    """Wait until nothing is pending recovery (or ``timeout_s``); the last audit, how it ended."""
    began = time.perf_counter()
    while True:
        report = await auditor.audit_running(procs.sims, meters, key, key_tokens=False)
        pending = drain_pending(report, await ledger_pending(procs.reader))
        waited = time.perf_counter() - began
        if out is not None:
            out.write(f"\rdrain {waited:5.1f}s  purchases still pending recovery: {pending}   ")
            out.flush()
        if pending == 0 or waited > timeout_s:
            ended_at = time.perf_counter()
            if out is not None:
                out.write("\n")
            outcome = DrainOutcome(
                end=drain_end(pending, report.charged_twice),
                pending=pending,
                waited_s=waited,
                ended_at=ended_at,
            )
            return await auditor.audit_running(procs.sims, meters, key), outcome
        await asyncio.sleep(2.0)


async def _ledger_figures(
    reader: LedgerReader, sms: Sequence[dict[str, Any]], window: tuple[float, float]
) -> dict[str, Any]:
    """Vends/s and payment-confirmed → SMS-accepted latency, from the ledger and the AT sim."""
    accepted = {m["message_id"]: m["accepted_at"] for m in sms if m.get("accepted_at")}
    vend_times = [epoch(row[0]) for row in await reader.rows("SELECT created_at FROM vends")]
    confirmed = await reader.rows(
        "SELECT o.provider_message_id, MIN(e.at) FROM outbox o JOIN events e"
        " ON e.purchase_id = o.purchase_id AND e.kind = 'payment_confirmed'"
        " WHERE o.kind = 'token' AND o.provider_message_id IS NOT NULL"
        " GROUP BY o.provider_message_id"
    )
    states = {
        str(state): int(count)
        for state, count in await reader.rows(
            "SELECT state, COUNT(*) FROM purchases GROUP BY state"
        )
    }
    latencies = [accepted[mid] - epoch(at) for mid, at in confirmed if mid in accepted]
    first, last = window
    in_window = sum(1 for at in vend_times if first <= at <= last)
    span = last - first
    return {
        "vends": len(vend_times),
        "vends_during_load": in_window,
        "vends_per_s": round(in_window / span, 1) if span > 0 else 0.0,
        "paid_to_sms_p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "paid_to_sms_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "paid_to_sms_samples": len(latencies),
        "purchases_by_state": states,
    }


async def run_load(settings: LoadSettings, *, out: TextIO | None = None) -> LoadResult:
    """One whole run: set up, start, load with faults and kills, drain, audit.

    The simulator and gateway processes are stopped whatever happens.
    """
    auditor = _load_auditor()
    with contextlib.ExitStack() as stack:
        if settings.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="load-")))
        else:
            workdir = settings.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        fixtures = write_fixtures(workdir, settings.meters)
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        async with run_database(settings, workdir) as database_url:
            await seed_tariff(database_url)
            procs = Processes(workdir, fixtures, settings, database_url)
            try:
                return await _run(settings, procs, fixtures, auditor, out)
            finally:
                await procs.stop()
                await procs.reader.close()


def _attacker(
    settings: LoadSettings,
    procs: Processes,
    fixtures: dict[str, Any],
    session: aiohttp.ClientSession,
) -> Any:  # noqa: ANN401 - bench/attacks.py's Attacker, or None without --attacks
    """The attacker of ``--attacks`` (bench/attacks.py), or None."""
    if not settings.attacks:
        return None
    return _load_bench("attacks").Attacker(
        session,
        gateway_url=procs.gateway_url,
        sims=procs.sims,
        secret=fixtures["callback_secret"],
        reader=procs.reader,
        drns=fixtures["drns"],
        seed=settings.seed + 2,
    )


def _attack_figures(
    attacker: Any,  # noqa: ANN401 - bench/attacks.py's Attacker, or None
    charges: Sequence[dict[str, Any]],
    sms: Sequence[dict[str, Any]],
    figures: dict[str, Any],
) -> list[str]:
    """Per attack case, tried and worked (into ``figures``); the line to print."""
    if attacker is None:
        return []
    table = _load_bench("attacks").outcomes(attacker.log.tried, charges, sms)
    figures["attacks"] = table
    figures["attack_posts"] = dict(attacker.log.posts)
    worked = ", ".join(f"{case} {row['succeeded']}/{row['tried']}" for case, row in table.items())
    return [f"attacks     {worked} (worked/tried)"]


def _audit_json(report: Any, unseen: Sequence[str]) -> dict[str, Any]:  # noqa: ANN401
    """The auditor's report with ``paid_unseen_by_operator`` counted in (and in ``ok``)."""
    audit_json: dict[str, Any] = {**report.to_json(), "paid_unseen_by_operator": len(unseen)}
    if unseen:
        audit_json["examples"]["paid_unseen_by_operator"] = list(unseen[:10])
    audit_json["ok"] = bool(report.ok) and not unseen
    return audit_json


async def _run(
    settings: LoadSettings,
    procs: Processes,
    fixtures: dict[str, Any],
    auditor: ModuleType,
    out: TextIO | None,
) -> LoadResult:
    await procs.start_sims()
    await procs.import_key_and_meters()
    await procs.start_gateway()
    meters = auditor.read_meters(fixtures["meters_path"])
    key = auditor.read_key(fixtures["key_path"])
    connector = aiohttp.TCPConnector(limit=settings.concurrency * 2)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        customers = Customers(settings, procs, fixtures["drns"], session)
        done = asyncio.Event()
        began = time.perf_counter()
        procs.mark_cpu()
        attacker = _attacker(settings, procs, fixtures, session)
        async with asyncio.TaskGroup() as group:
            group.create_task(_offer_load(customers, settings, done))
            group.create_task(_kill_loop(procs, customers.tally, settings, done))
            if attacker is not None:
                group.create_task(attacker.run(settings.attacks, done))
            if out is not None and settings.show_progress:
                group.create_task(_ticker(customers.tally, began, done, out))
        load_s = time.perf_counter() - began
        cpu = procs.cpu_seconds(load_s)
        if settings.calm_drain:
            calm = dict.fromkeys(FAULT_NAMES, 0.0)
            async with session.post(procs.sims["daraja"] + "/_sim/chaos", json=calm) as response:
                response.raise_for_status()
        report, drained = await _drain(
            auditor,
            procs,
            meters,
            key,
            settings.drain_timeout_s,
            out if settings.show_progress else None,
        )
        async with session.get(procs.sims["africastalking"] + "/_sim/sms") as response:
            sms = await response.json()
        (procs.workdir / "sms.json").write_text(json.dumps(sms), encoding="utf-8")
        all_charges: list[dict[str, Any]] = []
        for name in ("daraja", "momo", "airtel"):
            async with session.get(procs.sims[name] + "/_sim/ledger") as response:
                charges = await response.json()
            all_charges += charges
            (procs.workdir / f"{name}_ledger.json").write_text(json.dumps(charges), "utf-8")
        async with session.get(procs.sims["daraja"] + "/_sim/chaos") as response:
            chaos = await response.json()
    tally = customers.tally
    hops = tally.hop_latencies_s
    figures: dict[str, Any] = {
        "load_s": round(load_s, 1),
        "drain_s": round(drained.waited_s, 1),
        "drain_end": drained.end,
        "drain_pending": drained.pending,
        # From the last fault (the last kill; with none, the load's end) to nothing pending.
        "recovery_s": (
            None
            if drained.end == "timeout"
            else round(drained.ended_at - (tally.last_fault_at or began + load_s), 1)
        ),
        "purchases_offered": tally.started,
        "purchases_accepted": tally.done,
        "purchases_given_up": tally.gave_up,
        "customer_retries": tally.retries,
        "by_channel": dict(tally.by_channel),
        "purchases_per_s": round(tally.done / load_s, 1) if load_s else 0.0,
        "ussd_hops": len(hops),
        "ussd_hops_per_s": round(len(hops) / load_s, 1) if load_s else 0.0,
        "ussd_hop_p50_ms": round(percentile(hops, 0.5) * 1000, 2),
        "ussd_hop_p99_ms": round(percentile(hops, 0.99) * 1000, 2),
        "ussd_hop_errors": tally.hop_errors,
        "kills": tally.kills,
        "restart_p50_s": round(percentile(tally.restart_s, 0.5), 2),
        # Token SMS repeated (the AT simulator's record), per 1,000 kills: what a kill costs.
        "duplicate_token_sms": report.duplicate_token_sms,
        "duplicate_token_sms_per_1000_kills": (
            round(report.duplicate_token_sms * 1000 / tally.kills) if tally.kills else None
        ),
    }
    window = (customers.first_at, customers.last_at)
    figures.update(await _ledger_figures(procs.reader, sms, window))
    figures.update(cpu)
    unseen = await paid_unseen_by_operator(procs.reader, report.paid_without_token_refs)
    audit_json = _audit_json(report, unseen)
    attack_lines = _attack_figures(attacker, all_charges, sms, figures)
    lines = [
        f"load {figures['load_s']} s, drain {figures['drain_s']} s, kills {tally.kills}",
        (
            f"drain       ended {drained.end}"
            + (
                f", {drained.pending} purchase(s) still pending recovery"
                if drained.pending
                else f": recovered {figures['recovery_s']} s after the last fault"
            )
        ),
        (
            f"purchases   offered {tally.started}, accepted {tally.done}, gave up"
            f" {tally.gave_up} ({figures['purchases_per_s']}/s; {dict(tally.by_channel)})"
        ),
        (
            f"USSD hops   {figures['ussd_hops_per_s']}/s  p50 {figures['ussd_hop_p50_ms']} ms"
            f"  p99 {figures['ussd_hop_p99_ms']} ms  ({len(hops)} hops, {tally.hop_errors}"
            " failed)"
        ),
        (
            f"vends       {figures['vends']} ({figures['vends_per_s']}/s during the load,"
            f" {figures['vends_during_load']} vends)"
        ),
        (
            f"CPU         gateway {figures['cpu_gateway_s']} s, simulators"
            f" {figures['cpu_sims_s']} s, load generator {figures['cpu_load_s']} s"
            f" over {figures['load_s']} s of load on {os.cpu_count()} cores"
        ),
        (
            f"paid → SMS  p50 {figures['paid_to_sms_p50_ms']} ms  p99"
            f" {figures['paid_to_sms_p99_ms']} ms  ({figures['paid_to_sms_samples']} tokens)"
        ),
        f"chaos       {chaos['counts']}",
        *attack_lines,
        (
            f"duplicates  {figures['duplicate_token_sms']} token SMS repeated"
            f" ({figures['duplicate_token_sms_per_1000_kills']} per 1,000 kills)"
        ),
        *report.lines(),
        f"paid, unseen by an operator {len(unseen)}" + ("   <-- FAIL" if unseen else ""),
        *(f"    e.g. {example}" for example in unseen[:3]),
    ]
    settings_json = {
        **{k: v for k, v in asdict(settings).items() if k not in {"workdir", "faults"}},
        "faults": asdict(settings.faults),
    }
    return LoadResult(
        settings=settings_json,
        figures=figures,
        chaos=chaos,
        audit=audit_json,
        ok=bool(audit_json["ok"]),
        lines=lines,
    )


# --- command line --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[LoadSettings, bool]:
    """The settings from the command line, and whether to print only JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--purchases", type=int, default=None, help="purchases to offer")
    parser.add_argument("--duration-s", type=float, default=None, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=48, help="customers at once (48)")
    parser.add_argument("--meters", type=int, default=None, help="meters (purchases/10)")
    parser.add_argument("--faults", action="store_true", help="every fault switch on")
    parser.add_argument("--duplicate", type=float, default=None, help="callbacks duplicated")
    parser.add_argument("--lose", type=float, default=None, help="callbacks lost")
    parser.add_argument("--delay-max-s", type=float, default=None, help="callback delay (max)")
    parser.add_argument("--query-errors", type=float, default=None, help="status queries 5xx")
    parser.add_argument("--query-timeouts", type=float, default=None, help="queries hang")
    parser.add_argument("--sms-errors", type=float, default=None, help="SMS sends fail")
    parser.add_argument("--kills", type=int, default=0, help="SIGKILL the gateway this often")
    parser.add_argument(
        "--kill-every-s", type=float, nargs=2, default=(2.0, 5.0), metavar=("LO", "HI")
    )
    parser.add_argument("--drain-timeout-s", type=float, default=120.0)
    parser.add_argument(
        "--faulty-drain",
        action="store_true",
        help="keep the faults on while draining (default: off once the load ends)",
    )
    parser.add_argument(
        "--mix",
        type=float,
        nargs=3,
        default=(0.5, 0.25, 0.25),
        metavar=("USSD", "SMS", "C2B"),
        help="weights of the channels (0.5 0.25 0.25)",
    )
    parser.add_argument(
        "--session-store", choices=["sqlite", "memory"], default="sqlite", help="USSD sessions"
    )
    parser.add_argument(
        "--attacks",
        type=int,
        nargs="?",
        const=3,
        default=0,
        metavar="ROUNDS",
        help="forged callbacks during the load (bench/attacks.py), ROUNDS rounds (3)",
    )
    parser.add_argument(
        "--database-url",
        default="",
        help="a postgresql:// server to run on (a fresh database per run); default SQLite",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    faults = Faults.all_on() if args.faults else Faults()
    changes = {name: getattr(args, name) for name in FAULT_NAMES if getattr(args, name) is not None}
    faults = replace(faults, **changes)
    purchases = args.purchases
    if purchases is None and args.duration_s is None:
        purchases = 2000
    meters = args.meters or max(20, (purchases or 3000) // 10)
    settings = LoadSettings(
        purchases=purchases,
        duration_s=args.duration_s,
        concurrency=args.concurrency,
        meters=meters,
        faults=faults,
        kills=args.kills,
        kill_every_s=(args.kill_every_s[0], args.kill_every_s[1]),
        drain_timeout_s=args.drain_timeout_s,
        seed=args.seed,
        session_store=args.session_store,
        calm_drain=not args.faulty_drain,
        attacks=args.attacks,
        database_url=args.database_url,
        mix=(args.mix[0], args.mix[1], args.mix[2]),
        workdir=args.workdir,
        show_progress=not args.json,
    )
    return settings, bool(args.json)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load and the audit; 0 only when every audit count is zero."""
    settings, json_only = parse_args(argv)

    def interrupted(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through run_load, which stops the child processes

    signal.signal(signal.SIGTERM, interrupted)
    result = asyncio.run(run_load(settings, out=sys.stderr))
    if not json_only:
        print("\n".join(result.lines))
    print(
        json.dumps(
            {
                "settings": result.settings,
                "figures": result.figures,
                "chaos": result.chaos,
                "audit": result.audit,
                "ok": result.ok,
            },
            separators=(",", ":"),
        )
    )
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
