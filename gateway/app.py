"""The composition root: the one place adapters are built and wired together.

``build_app(config)`` opens the ledger, builds the token engine, the payment providers, the SMS
sender, the conversation engines and the saga, starts the simulators when the configuration asks
for them, and returns the aiohttp application with every inbound route. Everything it opens is
closed by the application's cleanup, in reverse order; background work (the outbox worker, the
sweeper, follow-ups after USSD replies) has an owner and stops before the ledger closes.

Assumptions named here:
- In demo mode without ``GATEWAY_MASTER_KEY`` the master key is generated once into
  ``<data_dir>/master.key`` (mode 0600) so restarts can open the vending keys they sealed.
- Without ``GATEWAY_CALLBACK_SECRET`` (demo only) a random callback path secret is made per
  process: a callback for a purchase from an earlier run gets 404 and the sweeper's status query
  recovers it, as it would a lost callback.
- Without ``GATEWAY_ADMIN_TOKEN`` (demo only) a random admin token is made and printed.
- The AT simulator mounted at ``/sim/africastalking`` (demo) shows every SMS, tokens included:
  its pages answer loopback callers, others only with the admin token as a bearer token.
- The data directory is private (0700) and every file in it 0600 (the ledger and its -wal/-shm,
  sessions.db, master.key); files an earlier version left readable are tightened at start.
- A SQLite ledger is created only on a first start: a missing ledger file in a data directory
  that holds anything (``ledger.created``, written next to it, sessions, a master key) refuses
  to start instead of silently beginning an empty ledger (history, TIDs and keys gone).
  A PostgreSQL database with an empty schema is a first start and is migrated.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hmac
import ipaddress
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from flows.engine import UssdEngine
from flows.journeys import build_screens
from flows.ports import Language, SessionStore
from flows.sessions import MemorySessionStore, SqliteSessionStore
from flows.sms_commands import SmsCommands
from gateway.config import SIMULATED, Config, Mode, Secret
from gateway.customer_services import SagaCustomerServices
from gateway.demo_data import DEMO_METERS, demo_master_key, seed_demo
from gateway.errors import ConfigError, LedgerMissing
from gateway.ledger import Ledger, MeterNumber, open_ledger, open_vending_key
from gateway.ledger.postgres import is_postgres_url
from gateway.ledger.sqlite import sqlite_path
from gateway.ledger.vendor import VendorLedger, VendorSteps
from gateway.logging import register_secrets
from gateway.metrics import Metrics, ledger_refresher
from gateway.payments import PaymentProvider
from gateway.payments.airtel import AirtelProvider
from gateway.payments.daraja import DarajaProvider
from gateway.payments.momo import MomoProvider
from gateway.sms import SmsSender
from gateway.sms.africastalking import (
    LIVE_URL,
    AfricasTalkingHttpSender,
    AfricasTalkingSdkSender,
    parse_delivery_report,
)
from gateway.sms.outbox import OutboxPolicy, OutboxWorker
from gateway.sts import LocalTokenEngine, TokenEngine, VendingKey
from gateway.sweeper import Sweeper
from gateway.vending import SagaPolicy, Vending
from gateway.vendor.limits import LocalRateLimiter, RateLimiter, open_redis_rate_limiter
from gateway.vendor.sandbox import SANDBOX_VENDOR, SandboxEngine, seed_sandbox
from gateway.vendor.service import VendorService, reseal_vendor_keys
from gateway.web.admin import admin_routes, setup_admin
from gateway.web.callbacks import payment_routes
from gateway.web.delivery import delivery_routes
from gateway.web.health import cached, health_routes
from gateway.web.keys import CONFIG, METRICS, METRICS_REFRESH, READINESS
from gateway.web.middleware import context_middleware
from gateway.web.sms import sms_routes
from gateway.web.ussd import FollowUps, ussd_routes
from gateway.web.vendor import vendor_routes

log = structlog.get_logger()

USSD_PATH = "/ussd/africastalking"
USSD_EVENTS_PATH = "/ussd/africastalking/events"
SMS_INBOUND_PATH = "/sms/africastalking/inbound"
SMS_DELIVERY_PATH = "/sms/africastalking/delivery"
AT_SIM_PREFIX = "/sim/africastalking"
OUTBOX_INTERVAL_S = 0.25  # how often due SMS are looked for when the outbox was empty
# Sends are I/O-bound: many in flight, a claim lease a little over a send's deadline (so a
# crashed instance's claims come back within a minute), and the next batch at once when busy.
OUTBOX_POLICY = OutboxPolicy(batch=100, concurrency=32, send_timeout_s=15.0, lease_s=45.0)


@dataclass(slots=True, kw_only=True)
class Simulators:
    """The simulated outside world of the embedded defaults, each on its own loopback port."""

    at: object  # gateway.sim.africastalking.AtSimulator
    daraja: object  # gateway.sim.daraja.DarajaSimulator
    momo: object  # gateway.sim.momo.MomoSimulator
    airtel: object  # gateway.sim.airtel.AirtelSimulator
    urls: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True, kw_only=True)
class Runtime:
    """Everything ``build_app`` assembled, for the CLI's banner, the demo and tests."""

    config: Config
    ledger: Ledger
    vending: Vending
    sms: SmsSender
    providers: dict[str, PaymentProvider]
    outbox: OutboxWorker
    sweeper: Sweeper
    follow_ups: FollowUps
    sessions: SessionStore
    ussd: UssdEngine
    sms_commands: SmsCommands
    metrics: Metrics
    callback_secret: Secret
    admin_token: Secret
    vendor: VendorService
    simulators: Simulators | None = None

    @property
    def base_url(self) -> str:
        """Where this gateway is reached."""
        return self.config.effective_public_url

    def callback_url(self, provider: str, tail: str) -> str:
        """A provider's callback URL (with the secret path segment)."""
        return payment_callback_url(self.base_url, self.callback_secret, provider, tail)


RUNTIME = web.AppKey("runtime", Runtime)


async def load_token_engine(ledger: Ledger, master_key: bytes) -> LocalTokenEngine:
    """The embedded engine holding every vending key in the ledger, unsealed with ``master_key``.

    Raises:
        VendingKeyUnreadable: the master key does not open one of the keys (names it).
    """
    keys = [open_vending_key(sealed, master_key) for sealed in await ledger.vending_keys()]
    return LocalTokenEngine(
        VendingKey(sgc=k.sgc, krn=k.krn, dkga=k.dkga, base_date=k.base_date, key=k.key)
        for k in keys
    )


def payment_callback_url(base: str, secret: Secret, provider: str, tail: str) -> str:
    """A provider's callback URL under ``/payments/<provider>/<secret>/…``."""
    return f"{base}/payments/{provider}/{secret.reveal()}/{tail}"


async def _serve_app(stack: contextlib.AsyncExitStack, app: web.Application) -> str:
    """Serve ``app`` on a free loopback port until ``stack`` closes; its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


async def _start_simulators(
    stack: contextlib.AsyncExitStack, config: Config, callback_secret: Secret
) -> Simulators:
    # The composition root is the only production module allowed to reach the simulators.
    from gateway.sim.africastalking import AtSimulator  # noqa: PLC0415
    from gateway.sim.airtel import AirtelSimulator  # noqa: PLC0415
    from gateway.sim.daraja import DarajaSimulator  # noqa: PLC0415
    from gateway.sim.momo import MomoSimulator  # noqa: PLC0415

    base = config.effective_public_url
    at_api_key = secrets.token_urlsafe(18)  # not the simulator's well-known default
    register_secrets(at_api_key)
    at = AtSimulator(
        ussd_url=base + USSD_PATH,
        ussd_events_url=base + USSD_EVENTS_PATH,
        delivery_url=base + SMS_DELIVERY_PATH,
        inbound_url=base + SMS_INBOUND_PATH,
        shortcode=config.shortcode,
        api_key=at_api_key,
    )
    # C2B confirmations carry the payer's number in the clear here (Daraja's v1 behaviour), so
    # paybill tokens can be texted; v2 masks it, and then only a reprint reaches the customer.
    daraja = DarajaSimulator(c2b_msisdn="plain")
    momo = MomoSimulator()
    airtel = AirtelSimulator(
        callback_url=payment_callback_url(base, callback_secret, "airtel", "callback")
    )
    # AT's simulator is mounted inside the gateway's own app (``AT_SIM_PREFIX``), so
    # ``gateway phone`` finds it with no flags; the others listen on their own loopback ports.
    stack.push_async_callback(at.close)
    urls = {
        "africastalking": base + AT_SIM_PREFIX,
        "daraja": await _serve_app(stack, daraja.app),
        "momo": await _serve_app(stack, momo.app),
        "airtel": await _serve_app(stack, airtel.app),
    }
    return Simulators(at=at, daraja=daraja, momo=momo, airtel=airtel, urls=urls)


def _providers(
    config: Config,
    session: aiohttp.ClientSession,
    sims: Simulators | None,
    callback_url: Callable[[str, str], str],
) -> dict[str, PaymentProvider]:
    """The payment adapters: every simulated one in demo, the configured one otherwise."""
    if sims is not None:
        from gateway.sim.airtel import AirtelSimulator  # noqa: PLC0415
        from gateway.sim.daraja import DarajaSimulator  # noqa: PLC0415
        from gateway.sim.momo import MomoSimulator  # noqa: PLC0415

        daraja_sim = sims.daraja
        momo_sim = sims.momo
        airtel_sim = sims.airtel
        assert isinstance(daraja_sim, DarajaSimulator)  # noqa: S101 - narrowing for mypy
        assert isinstance(momo_sim, MomoSimulator)  # noqa: S101
        assert isinstance(airtel_sim, AirtelSimulator)  # noqa: S101
        daraja_sim.register_urls(
            validation_url=callback_url("daraja", "c2b/validation"),
            confirmation_url=callback_url("daraja", "c2b/confirmation"),
        )
        return {
            "daraja": DarajaProvider(
                session,
                base_url=sims.urls["daraja"],
                consumer_key=daraja_sim.consumer_key,
                consumer_secret=daraja_sim.consumer_secret,
                shortcode=daraja_sim.shortcode,
                passkey=daraja_sim.passkey,
                callback_url=callback_url("daraja", "stk"),
                initiator=daraja_sim.initiator,
                security_credential=daraja_sim.security_credential,
                status_result_url=callback_url("daraja", "status/result"),
                status_timeout_url=callback_url("daraja", "status/timeout"),
            ),
            "momo": MomoProvider(
                session,
                base_url=sims.urls["momo"],
                subscription_key=momo_sim.subscription_key,
                api_user=momo_sim.api_user,
                api_key=momo_sim.api_key,
                callback_url=callback_url("momo", "callback"),
            ),
            "airtel": AirtelProvider(
                session,
                base_url=sims.urls["airtel"],
                client_id=airtel_sim.client_id,
                client_secret=airtel_sim.client_secret,
            ),
        }
    name = config.payments
    settings = getattr(config, name)
    extra = settings.extra
    if name == "daraja":
        for needed in ("shortcode", "passkey"):
            if needed not in extra:
                raise ConfigError(f"GATEWAY_DARAJA_{needed.upper()}", "required")
        provider: PaymentProvider = DarajaProvider(
            session,
            base_url=settings.base_url,
            consumer_key=settings.key.reveal(),
            consumer_secret=settings.secret.reveal(),
            shortcode=extra["shortcode"],
            passkey=extra["passkey"],
            callback_url=callback_url("daraja", "stk"),
            initiator=extra.get("initiator"),
            security_credential=extra.get("security_credential"),
            status_result_url=callback_url("daraja", "status/result"),
            status_timeout_url=callback_url("daraja", "status/timeout"),
        )
    elif name == "momo":
        provider = MomoProvider(
            session,
            base_url=settings.base_url,
            subscription_key=extra.get("subscription_key", ""),
            api_user=settings.username,
            api_key=settings.key.reveal(),
            target_environment=extra.get("target_environment", "mtnuganda"),
            currency=config.currency,
            callback_url=callback_url("momo", "callback"),
        )
    else:
        provider = AirtelProvider(
            session,
            base_url=settings.base_url,
            client_id=settings.username,
            client_secret=settings.secret.reveal(),
            country=extra.get("country", config.country),
            currency=config.currency,
        )
    return {name: provider}


def _sms_sender(
    config: Config, session: aiohttp.ClientSession, sims: Simulators | None
) -> SmsSender:
    """The official SDK against the simulator; the pooled HTTP sender in production."""
    if sims is not None:
        from gateway.sim.africastalking import AtSimulator  # noqa: PLC0415

        at = sims.at
        assert isinstance(at, AtSimulator)  # noqa: S101 - narrowing for mypy
        return AfricasTalkingSdkSender(
            at.username, at.api_key, base_url=sims.urls["africastalking"] + "/version1"
        )
    settings = config.africastalking
    sender_id = settings.extra.get("sender_id") or None
    if settings.extra.get("client", "http") == "sdk":
        return AfricasTalkingSdkSender(
            settings.username, settings.key.reveal(), sender_id=sender_id
        )
    return AfricasTalkingHttpSender(
        session,
        settings.username,
        settings.key.reveal(),
        sender_id=sender_id,
        base_url=settings.base_url or LIVE_URL,
    )


async def _session_store(stack: contextlib.AsyncExitStack, config: Config) -> SessionStore:
    if config.session_store == "memory":
        return MemorySessionStore()
    if config.session_store == "redis":
        from gateway.redis_sessions import open_redis_session_store  # noqa: PLC0415

        return await stack.enter_async_context(open_redis_session_store(config.redis_url))
    _create_private(config.data_dir / "sessions.db")
    sqlite_store = SqliteSessionStore.open(config.data_dir / "sessions.db")
    stack.callback(sqlite_store.close)
    return sqlite_store


async def _rate_limiter(stack: contextlib.AsyncExitStack, config: Config) -> RateLimiter:
    """The vendor API's rate limits: in Redis with Redis (every instance), else in-process."""
    if config.session_store == "redis":
        return await stack.enter_async_context(open_redis_rate_limiter(config.redis_url))
    return LocalRateLimiter()


LEDGER_MARKER = "ledger.created"  # written in the data directory once a SQLite ledger exists
_PRIVATE_DIR = 0o700
_PRIVATE_FILE = 0o600


_OWN_FILES = ("gateway.db", "sessions.db", "master.key", LEDGER_MARKER)  # and -wal, -shm


def _private_data_dir(data_dir: Path) -> None:
    """Create ``data_dir`` 0700 if missing; make it and the gateway's own files in it private.

    Only the files the gateway writes there (``_OWN_FILES`` and their -wal/-shm) are tightened;
    anything else an operator keeps in the directory is left alone.
    """
    data_dir.mkdir(mode=_PRIVATE_DIR, parents=True, exist_ok=True)
    data_dir.chmod(_PRIVATE_DIR)
    for entry in data_dir.iterdir():
        own = entry.name.removesuffix("-wal").removesuffix("-shm") in _OWN_FILES
        if own and entry.is_file() and not entry.is_symlink():
            entry.chmod(_PRIVATE_FILE)


def _ledger_must_exist(config: Config) -> Path | None:
    """The SQLite ledger's path, after refusing a data directory that lost its ledger.

    Only a first start, with an empty (or brand-new) data directory, creates a ledger.

    Raises:
        LedgerMissing: the ledger file is gone but the data directory shows the gateway ran.
    """
    url = config.effective_database_url
    if is_postgres_url(url):
        return None
    path = sqlite_path(url)
    if path.exists():
        return path
    data_dir = config.data_dir
    left = sorted(e.name for e in data_dir.iterdir()) if data_dir.is_dir() else []
    if left:
        raise LedgerMissing(
            f"the ledger {path} is missing but the data directory {data_dir} is not empty"
            f" ({', '.join(left[:5])}): refusing to start an empty ledger over an existing"
            " installation. Restore the ledger from a backup (docs/operations.md), or, for a"
            " deliberate fresh start, move the data directory away."
        )
    return path


def _create_private(path: Path) -> None:
    """Create ``path`` empty, mode 0600 whatever the umask, if it does not exist.

    SQLite gives a database's -wal and -shm files the database file's mode.
    """
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _PRIVATE_FILE))


def _mark_ledger(config: Config, path: Path) -> None:
    """Note in the data directory that a ledger exists (so its loss is noticed at start)."""
    marker = config.data_dir / LEDGER_MARKER
    if marker.exists():
        return
    descriptor = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _PRIVATE_FILE)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(f"{path}\n")


def _secret(configured: Secret | None, config: Config, setting: str) -> Secret:
    if configured is not None:
        return configured
    if config.mode is Mode.PRODUCTION:  # Config.load already refuses this; kept as a guard
        raise ConfigError(setting, "required in production")
    return Secret(secrets.token_urlsafe(24))


async def _assemble(config: Config, stack: contextlib.AsyncExitStack) -> Runtime:
    ledger_path = _ledger_must_exist(config)  # before anything is written in the data directory
    _private_data_dir(config.data_dir)
    callback_secret = _secret(config.callback_secret, config, "GATEWAY_CALLBACK_SECRET")
    admin_token = _secret(config.admin_token, config, "GATEWAY_ADMIN_TOKEN")
    # From here on no log line, banner or error shows any of them (gateway.logging).
    register_secrets(*config.secret_values(), callback_secret.reveal(), admin_token.reveal())
    base = config.effective_public_url

    def callback_url(provider: str, tail: str) -> str:
        return payment_callback_url(base, callback_secret, provider, tail)

    master_key = config.master_key_bytes()
    if master_key is None:
        master_key = demo_master_key(config.data_dir)
        register_secrets(base64.b64encode(master_key).decode(), master_key.hex())
    if ledger_path is not None:
        ledger_path.parent.mkdir(parents=True, exist_ok=True)
        _create_private(ledger_path)
    ledger = await stack.enter_async_context(
        open_ledger(config.effective_database_url, pool_size=config.ledger_pool_size)
    )
    if ledger_path is not None:
        _mark_ledger(config, ledger_path)
    if config.mode is Mode.DEMO and await seed_demo(ledger, master_key):
        log.info("demo_data_seeded", database=config.effective_database_url)
    engine: TokenEngine = await load_token_engine(ledger, master_key)
    # Vendor keys: seal any a schema-8 ledger kept in the clear; refuse a master key that does
    # not open them (as for the vending keys).
    await reseal_vendor_keys(_vendor_port(ledger), master_key)
    if config.mode is Mode.DEMO:  # the vendor API's sandbox: demo-shop, a slow and a blocked meter
        if await seed_sandbox(
            ledger, _vendor_port(ledger), template=DEMO_METERS[0].drn, master_key=master_key
        ):
            log.info("vendor_sandbox_seeded", vendor=SANDBOX_VENDOR)
        engine = SandboxEngine(engine)

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=200), timeout=aiohttp.ClientTimeout(total=30)
    )
    stack.push_async_callback(session.close)
    sims = (
        await _start_simulators(stack, config, callback_secret) if config.uses_simulators else None
    )
    providers = _providers(config, session, sims, callback_url)
    for provider in providers.values():
        if isinstance(provider, DarajaProvider):  # Transaction Status results via the ledger
            provider.status_store = ledger
    default_provider = "daraja" if config.payments == SIMULATED else config.payments
    metrics = Metrics()
    vending = Vending(
        observer=metrics,
        ledger=ledger,
        engine=engine,
        providers=providers,
        default_provider=default_provider,
        policy=SagaPolicy(
            first_check_after_s=float(config.payment_first_check_s),
            check_interval_s=float(config.payment_check_interval_s),
            payment_expiry_s=float(config.payment_expiry_s),
            ambiguous_recheck_s=float(config.ambiguous_recheck_s),
            fbe_timezone=config.fbe_timezone,
        ),
    )
    sms = _sms_sender(config, session, sims)
    outbox = OutboxWorker(ledger=ledger, sender=sms, policy=OUTBOX_POLICY)
    sweeper = Sweeper(
        vending=vending,
        checks=ledger,
        outbox=None,
        interval_s=config.sweep_interval_s,
        check_concurrency=config.payment_checks_in_flight,
    )
    sessions = await _session_store(stack, config)
    services = SagaCustomerServices(vending, ledger)
    ussd = UssdEngine(
        services,
        sessions,
        build_screens(),
        default_language=Language.EN,
        resume_window_s=float(config.resume_window_s),
    )
    return Runtime(
        config=config,
        ledger=ledger,
        vending=vending,
        sms=sms,
        providers=providers,
        outbox=outbox,
        sweeper=sweeper,
        follow_ups=FollowUps(),
        sessions=sessions,
        ussd=ussd,
        sms_commands=SmsCommands(services, default_language=Language.EN),
        metrics=metrics,
        callback_secret=callback_secret,
        admin_token=admin_token,
        vendor=VendorService(
            vending,
            ledger,
            _vendor_port(ledger),
            limiter=await _rate_limiter(stack, config),
            master_key=master_key,
        ),
        simulators=sims,
    )


def _vendor_port(ledger: Ledger) -> VendorLedger:
    """The ledger's vendor port (both backends have it)."""
    if not isinstance(ledger, VendorSteps):
        raise TypeError(f"{type(ledger).__name__} has no vendor port")
    return ledger


async def _outbox_loop(outbox: OutboxWorker, stop: asyncio.Event) -> None:
    """Send due SMS promptly (tokens go out within a fraction of a second of the vend)."""
    while not stop.is_set():
        claimed = 0
        try:
            run = await outbox.run_once()
            claimed = run.sent + run.retried + run.failed
        except Exception:  # an outermost loop: log and go on
            log.exception("outbox_run_crashed")
        if claimed >= OUTBOX_POLICY.batch:
            continue  # a full batch: more are probably due
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(OUTBOX_INTERVAL_S):
                await stop.wait()


def _sim_guard(admin_token: Secret) -> Middleware:
    """The mounted AT simulator's pages (every SMS, tokens included) for loopback callers only.

    Its SMS API (``/version1/…``) checks AT's ``apiKey`` header itself (a random key per
    process); everything else (``/sim/inbox``, ``/sim/sent``, ``/sim/sms``) answers a caller on
    another host only with ``Authorization: Bearer <admin token>``, else 403.
    """
    expected = f"Bearer {admin_token.reveal()}".encode()

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.removeprefix(AT_SIM_PREFIX).startswith("/version1/"):
            return await handler(request)
        if _is_loopback(request.remote):
            return await handler(request)
        presented = request.headers.get("Authorization", "").encode()
        if hmac.compare_digest(presented, expected):
            return await handler(request)
        log.warning(
            "sim_access_refused", security_event=True, remote=request.remote, path=request.path
        )
        return web.json_response(
            {
                "error": "the simulator's pages answer loopback callers, or others with"
                " 'Authorization: Bearer <admin token>' (gateway phone --admin-token)"
            },
            status=403,
        )

    return guard


def _is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


def _background(runtime: Runtime) -> Callable[[web.Application], AsyncIterator[None]]:
    async def background(_app: web.Application) -> AsyncIterator[None]:
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(runtime.sweeper.run(stop), name="sweeper"),
            asyncio.create_task(_outbox_loop(runtime.outbox, stop), name="outbox"),
        ]
        yield
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    return background


def _readiness(runtime: Runtime) -> dict[str, Callable[[], Awaitable[bool]]]:
    url = runtime.config.effective_database_url
    ledger_file = None if is_postgres_url(url) else sqlite_path(url)
    opened = None if ledger_file is None else _identity(ledger_file)

    async def ledger_ready() -> bool:
        # A deleted or replaced file still takes writes through the open descriptor: compare.
        if ledger_file is not None and _identity(ledger_file) != opened:
            raise LedgerMissing(f"the ledger file {ledger_file} was deleted or replaced")
        await runtime.ledger.probe_write()  # a committed write, not just a read
        await runtime.ledger.lookup_meter(MeterNumber("00000000000"))
        return True

    async def sessions_ready() -> bool:
        await runtime.sessions.get("readyz")
        return True

    return {"ledger": cached("ledger", ledger_ready), "sessions": sessions_ready}


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` names now (device, inode), None when it is gone."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


async def build_app(config: Config) -> web.Application:
    """The gateway as an aiohttp application, every adapter built and every route mounted.

    Raises:
        ConfigError: a setting cannot be used (names the setting).
        LedgerError: the database cannot be opened or migrated.
        VendingKeyUnreadable: the master key does not open the stored vending keys.
    """
    stack = contextlib.AsyncExitStack()
    try:
        runtime = await _assemble(config, stack)
    except BaseException:
        await stack.aclose()
        raise
    app = web.Application(middlewares=[context_middleware])
    app[CONFIG] = config
    app[METRICS] = runtime.metrics
    app[RUNTIME] = runtime
    app[READINESS] = _readiness(runtime)
    app[METRICS_REFRESH] = [ledger_refresher(runtime.metrics, runtime.ledger)]
    app.add_routes(health_routes())
    app.add_routes(
        ussd_routes(runtime.ussd, runtime.follow_ups, path=USSD_PATH, events_path=USSD_EVENTS_PATH)
    )
    app.add_routes(
        sms_routes(
            runtime.sms_commands,
            runtime.follow_ups,
            runtime.sessions,
            path=SMS_INBOUND_PATH,
            default_region=config.country,
        )
    )
    app.add_routes(
        delivery_routes(
            runtime.outbox.apply_delivery_report,
            parse=parse_delivery_report,
            path=SMS_DELIVERY_PATH,
        )
    )
    app.add_routes(
        payment_routes(
            runtime.providers,
            runtime.vending,
            secret=runtime.callback_secret.reveal(),
            allow_from=list(config.callback_allow_from) or None,
            background=lambda work: runtime.follow_ups.spawn(work, what="c2b_confirmation"),
        )
    )
    setup_admin(
        app,
        ledger=runtime.ledger,
        vending=runtime.vending,
        admin_token=runtime.admin_token,
        vendors=runtime.vendor,
        currency=config.currency,
    )
    if runtime.simulators is not None:
        from gateway.sim.africastalking import AtSimulator  # noqa: PLC0415

        at = runtime.simulators.at
        assert isinstance(at, AtSimulator)  # noqa: S101 - narrowing for mypy
        at.app.middlewares.append(_sim_guard(runtime.admin_token))
        app.add_subapp(AT_SIM_PREFIX, at.app)
    app.add_routes(admin_routes())
    app.add_routes(vendor_routes(runtime.vendor))
    app.cleanup_ctx.append(_background(runtime))
    app.cleanup_ctx.append(runtime.follow_ups.cleanup_ctx)

    async def close(_app: web.Application) -> None:
        await stack.aclose()

    app.on_cleanup.append(close)
    return app


class Addressed(Protocol):
    """Where a gateway is reached (a ``Runtime``, or ``gateway serve``'s view of its workers)."""

    @property
    def base_url(self) -> str: ...  # noqa: D102 - as in Runtime

    def callback_url(self, provider: str, tail: str) -> str: ...  # noqa: D102


def routes_summary(runtime: Addressed) -> list[tuple[str, str]]:
    """The inbound routes an operator registers with the providers, with what each is for."""
    return [
        (runtime.base_url + USSD_PATH, "Africa's Talking USSD callback"),
        (runtime.base_url + USSD_EVENTS_PATH, "Africa's Talking USSD end-of-session events"),
        (runtime.base_url + SMS_INBOUND_PATH, "Africa's Talking incoming SMS"),
        (runtime.base_url + SMS_DELIVERY_PATH, "Africa's Talking SMS delivery reports"),
        (runtime.callback_url("daraja", "stk"), "Daraja STK push callback"),
        (runtime.callback_url("daraja", "c2b/validation"), "Daraja C2B validation"),
        (runtime.callback_url("daraja", "c2b/confirmation"), "Daraja C2B confirmation"),
        (runtime.callback_url("momo", "callback"), "MTN MoMo callback"),
        (runtime.callback_url("airtel", "callback"), "Airtel Money callback"),
        (runtime.base_url + "/admin", "operator admin page"),
        (runtime.base_url + "/vendor/v1/openapi.json", "vendor API (banks, agents, sales points)"),
        (runtime.base_url + "/healthz", "liveness"),
        (runtime.base_url + "/readyz", "readiness"),
        (runtime.base_url + "/metrics", "Prometheus metrics"),
    ]


def freeze_startup_heap() -> None:
    """Move everything alive once the app has started out of the garbage collector's sight.

    Modules, the app, its caches and connections live as long as the process; without this,
    every full collection walks all of them again: tens of milliseconds each, which show up in
    the USSD p99. After ``gc.freeze()`` collections walk only what requests allocated. Measured
    on the real app under USSD load: collector time per hop roughly halved (about 10 to 5 µs).
    Call once, after ``AppRunner.setup()`` (``gateway serve`` does).
    """
    gc.collect()
    gc.freeze()
