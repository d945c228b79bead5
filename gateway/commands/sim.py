"""``gateway sim``: the simulated outside world as its own process, pointed at a gateway.

```
gateway sim [--gateway URL] [--callback-secret S] [--host HOST] [--ports AT,DARAJA,MOMO,AIRTEL]
            [--seed N] [--c2b-msisdn plain|masked|hashed] [--duplicate R] [--lose R]
            [--delay-max-s S] [--query-errors R] [--query-timeouts R] [--sms-errors R] [--json]
```

It runs the Africa's Talking, Daraja, MTN MoMo and Airtel simulators (``gateway/sim/*``) on
loopback, each on its own port, and prints their base URLs (one ``name URL`` line each, then one
JSON line with the URLs and the simulators' fixed credentials, which a gateway needs in its
``GATEWAY_*`` settings). It runs until SIGINT/SIGTERM. Run apart from the gateway, the
simulators' records (money taken, SMS accepted) outlive a gateway killed with SIGKILL, which is
what an auditor of a crash test reads.

``--gateway URL`` points the simulators at a gateway's routes: AT's USSD, inbound SMS and
delivery-report callbacks, and (with ``--callback-secret``) Daraja's registered C2B validation
and confirmation URLs. STK, MoMo and Airtel callbacks go where each request says.

Chaos, on top of the simulators' own count-based knobs (``/_sim/faults``): each rate is a
probability per event, changeable at run time with ``POST /_sim/chaos`` on any simulator (one
shared set of knobs; ``GET /_sim/chaos`` shows them and what they did):

- ``duplicate``: a callback is delivered twice; ``lose``: a callback is never delivered (a C2B
  confirmation, which Daraja retries, loses its first attempt instead); ``delay_max_s``: every
  callback copy waits a uniform random delay first, so callbacks are late and reordered;
- ``query_errors``: a status query (Daraja STK query, MoMo and Airtel status GETs) answers 5xx;
  ``query_timeouts``: it hangs ``hang_s`` (past the adapters' 10 s deadline), then answers 504;
- ``sms_errors``: an SMS send answers HTTP 500 (AT's ``InternalServerError``), nothing accepted.

A callback that gets no 200 is retried when the provider retries (C2B confirmations:
``--confirmation-retries``) with a doubling pause capped at 5 s, so a gateway that is down for a
few seconds still gets it, as it would from Safaricom's retry queue.

Extra inspection routes: ``GET /_sim/sms`` on the AT simulator lists every message it accepted
(id, to, text, the wall-clock time it was accepted ``accepted_at`` in Unix seconds, delivery
reports posted), which ``GET /sim/sent`` does not show.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import aiohttp
import structlog
from aiohttp import typedefs as aiohttp_typedefs
from aiohttp import web

from gateway.logging import configure_logging
from gateway.sim.africastalking import AtSimulator
from gateway.sim.airtel import AirtelSimulator
from gateway.sim.courier import CallbackFaults, Courier, TaskKeeper, read_json_object, update_faults
from gateway.sim.daraja import DarajaSimulator
from gateway.sim.momo import MomoSimulator

log = structlog.get_logger()

SIMULATORS: Final = ("africastalking", "daraja", "momo", "airtel")
USSD_PATH: Final = "/ussd/africastalking"
USSD_EVENTS_PATH: Final = "/ussd/africastalking/events"
SMS_INBOUND_PATH: Final = "/sms/africastalking/inbound"
SMS_DELIVERY_PATH: Final = "/sms/africastalking/delivery"
MAX_RETRY_PAUSE_S: Final = 5.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = aiohttp_typedefs.Middleware


@dataclass(slots=True, kw_only=True)
class Chaos:
    """Probabilistic faults shared by every simulator in the process (rates are 0 to 1)."""

    duplicate: float = 0.0  # a callback is delivered twice
    lose: float = 0.0  # a callback is never delivered (a retried one loses its first attempt)
    delay_max_s: float = 0.0  # each callback copy waits U(0, delay_max_s): late and reordered
    query_errors: float = 0.0  # a status query answers 5xx
    query_timeouts: float = 0.0  # a status query hangs hang_s, then answers 504
    hang_s: float = 12.0
    sms_errors: float = 0.0  # an SMS send answers HTTP 500
    retry_pause_s: float = 0.5  # first pause before a provider retries an unanswered callback

    @property
    def shapes_callbacks(self) -> bool:
        """Whether callbacks need the chaotic path (any callback knob is on)."""
        return self.duplicate > 0 or self.lose > 0 or self.delay_max_s > 0


@dataclass(slots=True)
class ChaosCounts:
    """What the chaos did, for the harness's report."""

    lost: int = 0
    duplicated: int = 0
    delayed: int = 0
    query_errors: int = 0
    query_timeouts: int = 0
    sms_errors: int = 0
    retries: int = 0


class ChaosCourier(Courier):
    """A ``Courier`` that also loses, duplicates and delays callbacks at random (``Chaos``).

    The simulators' own knobs (``hold``, ``drop_next``, ``copies``) keep their meaning: while one
    of them is set, callbacks take the plain ``Courier`` path. Retried deliveries pause between
    attempts (doubling from ``Chaos.retry_pause_s``, capped at 5 s).
    """

    def __init__(
        self,
        faults: CallbackFaults,
        tasks: TaskKeeper,
        *,
        provider: str,
        chaos: Chaos,
        counts: ChaosCounts,
        rng: random.Random,
    ) -> None:
        super().__init__(faults, tasks, provider=provider)
        self._chaos = chaos
        self._counts = counts
        self._rng = rng
        self._keeper = tasks

    async def open(self) -> None:
        """Create the HTTP session, without the default cap of 100 connections.

        A provider's callback fleet does not queue one merchant's callbacks behind 100 slow
        ones; with the cap, callbacks our side is slow to answer (C2B confirmations that wait
        for a Transaction Status result) starved every other callback in long runs.
        """
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    def send(self, method: str, url: str, body: bytes, *, retries: int = 0) -> None:
        """Queue one callback through the chaos (or the plain knobs when those are set)."""
        faults = self.faults
        if faults.hold or faults.drop_next > 0 or faults.copies != 1:
            super().send(method, url, body, retries=retries)
            return
        chaos = self._chaos
        lost = self._rng.random() < chaos.lose
        if lost and retries == 0:
            self._counts.lost += 1
            log.info("sim_callback_lost", url=url)
            return
        copies = 2 if self._rng.random() < chaos.duplicate else 1
        self._counts.duplicated += copies - 1
        for copy in range(copies):
            delay = self._rng.uniform(0.0, chaos.delay_max_s) if chaos.delay_max_s > 0 else 0.0
            self._counts.delayed += delay > 0
            skip_first = lost and copy == 0
            self._counts.lost += skip_first
            self._keeper.spawn(self._deliver_later(method, url, body, retries, delay, skip_first))

    async def _deliver_later(
        self, method: str, url: str, body: bytes, retries: int, delay_s: float, skip_first: bool
    ) -> None:
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        pause = self._chaos.retry_pause_s
        for attempt in range(1 + max(0, retries)):
            if attempt > 0:
                self._counts.retries += 1
                await asyncio.sleep(pause)
                pause = min(MAX_RETRY_PAUSE_S, pause * 2)
            if attempt == 0 and skip_first:
                continue
            delivery = await self._attempt(method, url, body, self._timeout_s)
            if delivery.status == 200:
                return


@dataclass(slots=True, kw_only=True)
class SimWorld:
    """The four simulators of one ``gateway sim`` process and the chaos they share."""

    at: AtSimulator
    daraja: DarajaSimulator
    momo: MomoSimulator
    airtel: AirtelSimulator
    chaos: Chaos = field(default_factory=Chaos)
    counts: ChaosCounts = field(default_factory=ChaosCounts)
    accepted_at: dict[str, float] = field(default_factory=dict)  # AT message id → Unix seconds

    def credentials(self) -> dict[str, dict[str, str]]:
        """The simulators' fixed credentials (not secrets: anyone may run a simulator)."""
        return {
            "africastalking": {"username": self.at.username, "key": self.at.api_key},
            "daraja": {
                "key": self.daraja.consumer_key,
                "secret": self.daraja.consumer_secret,
                "shortcode": self.daraja.shortcode,
                "passkey": self.daraja.passkey,
                "initiator": self.daraja.initiator,
                "security_credential": self.daraja.security_credential,
            },
            "momo": {
                "subscription_key": self.momo.subscription_key,
                "username": self.momo.api_user,
                "key": self.momo.api_key,
            },
            "airtel": {"username": self.airtel.client_id, "secret": self.airtel.client_secret},
        }

    def chaos_json(self) -> dict[str, Any]:
        """The chaos knobs and what they did so far."""
        return {"knobs": asdict(self.chaos), "counts": asdict(self.counts)}


def build_world(
    *,
    gateway: str | None,
    callback_secret: str | None,
    seed: int | None = None,
    c2b_msisdn: str = "plain",
    confirmation_retries: int = 8,
    chaos: Chaos | None = None,
) -> SimWorld:
    """Make the four simulators, pointed at ``gateway``, with the chaos wired in.

    Call it inside a running event loop's thread (the simulators make asyncio objects) and
    before their apps start (middlewares and routes are added here).
    """
    base = gateway.rstrip("/") if gateway else None
    at = AtSimulator(
        ussd_url=base + USSD_PATH if base else None,
        ussd_events_url=base + USSD_EVENTS_PATH if base else None,
        delivery_url=base + SMS_DELIVERY_PATH if base else None,
        inbound_url=base + SMS_INBOUND_PATH if base else None,
    )
    daraja = DarajaSimulator(
        seed=seed,
        c2b_msisdn=c2b_msisdn,  # type: ignore[arg-type] # argparse restricts the choices
        confirmation_retries=confirmation_retries,
    )
    if base and callback_secret:
        daraja.register_urls(
            validation_url=f"{base}/payments/daraja/{callback_secret}/c2b/validation",
            confirmation_url=f"{base}/payments/daraja/{callback_secret}/c2b/confirmation",
        )
    momo = MomoSimulator(seed=seed)
    airtel = AirtelSimulator(
        seed=seed,
        callback_url=f"{base}/payments/airtel/{callback_secret}/callback"
        if base and callback_secret
        else None,
    )
    world = SimWorld(at=at, daraja=daraja, momo=momo, airtel=airtel, chaos=chaos or Chaos())
    rng = random.Random(seed)
    for name, sim in (("daraja", daraja), ("momo", momo), ("airtel", airtel)):
        sim.courier = ChaosCourier(
            sim.faults.callbacks,
            sim._tasks,  # noqa: SLF001 - the simulator's own task keeper owns the deliveries
            provider=f"{name}-sim",
            chaos=world.chaos,
            counts=world.counts,
            rng=rng,
        )
    daraja.app.middlewares.append(_query_faults(world, rng, _is_daraja_query, _daraja_error))
    momo.app.middlewares.append(_query_faults(world, rng, _is_momo_query, _momo_error))
    airtel.app.middlewares.append(_query_faults(world, rng, _is_airtel_query, _airtel_error))
    at.app.middlewares.append(_sms_faults(world, rng))
    at.app.router.add_get("/_sim/sms", _sms_record(world))
    for app in (at.app, daraja.app, momo.app, airtel.app):
        app.router.add_get("/_sim/chaos", _show_chaos(world))
        app.router.add_post("/_sim/chaos", _change_chaos(world))
    return world


# --- query and SMS faults ------------------------------------------------------------------------


def _is_daraja_query(request: web.Request) -> bool:
    return request.method == "POST" and request.path == "/mpesa/stkpushquery/v1/query"


def _is_momo_query(request: web.Request) -> bool:
    return request.method == "GET" and request.path.startswith("/collection/v1_0/requesttopay/")


def _is_airtel_query(request: web.Request) -> bool:
    return request.method == "GET" and request.path.startswith("/standard/v1/payments/")


def _daraja_error(status: int) -> web.Response:
    code = "500.003.1001" if status == 500 else "503.001.01"
    return web.json_response(
        {"requestId": "sim-chaos", "errorCode": code, "errorMessage": "Internal Server Error"},
        status=status,
    )


def _momo_error(status: int) -> web.Response:
    return web.json_response(
        {"code": "INTERNAL_PROCESSING_ERROR", "message": "simulated failure"}, status=status
    )


def _airtel_error(status: int) -> web.Response:
    return web.json_response(
        {"status": {"code": str(status), "message": "simulated failure", "success": False}},
        status=status,
    )


def _query_faults(
    world: SimWorld,
    rng: random.Random,
    is_query: Callable[[web.Request], bool],
    error: Callable[[int], web.Response],
) -> Middleware:
    @web.middleware
    async def faults(request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_query(request):
            roll = rng.random()
            if roll < world.chaos.query_timeouts:
                world.counts.query_timeouts += 1
                await asyncio.sleep(world.chaos.hang_s)
                return error(504)
            if roll < world.chaos.query_timeouts + world.chaos.query_errors:
                world.counts.query_errors += 1
                return error(500)
        return await handler(request)

    return faults


def _sms_faults(world: SimWorld, rng: random.Random) -> Middleware:
    @web.middleware
    async def faults(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "POST" or request.path != "/version1/messaging":
            return await handler(request)
        if rng.random() < world.chaos.sms_errors:
            world.counts.sms_errors += 1
            return web.Response(status=500, text="simulated HTTP 500")
        response = await handler(request)
        if response.status == 201 and isinstance(response, web.Response):
            now = time.time()
            with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
                body = response.body
                data = json.loads(body if isinstance(body, bytes | str) else b"{}")
                for recipient in data["SMSMessageData"]["Recipients"]:
                    if recipient.get("messageId", "None") != "None":
                        world.accepted_at[recipient["messageId"]] = now
        return response

    return faults


def _sms_record(world: SimWorld) -> Handler:
    async def record(_request: web.Request) -> web.Response:
        return web.json_response(
            [
                {
                    "message_id": sms.message_id,
                    "to": sms.to,
                    "text": sms.text,
                    "accepted_at": world.accepted_at.get(sms.message_id),
                    "reports": list(sms.reports),
                }
                for sms in world.at.sent
            ]
        )

    return record


def _show_chaos(world: SimWorld) -> Handler:
    async def show(_request: web.Request) -> web.Response:
        return web.json_response(world.chaos_json())

    return show


def _change_chaos(world: SimWorld) -> Handler:
    async def change(request: web.Request) -> web.Response:
        try:
            update_faults(world.chaos, await read_json_object(request))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from exc
        return web.json_response(world.chaos_json())

    return change


# --- serving -------------------------------------------------------------------------------------


async def _serve(
    stack: contextlib.AsyncExitStack, app: web.Application, host: str, port: int
) -> str:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    return f"http://{bound_host}:{bound_port}"


@contextlib.asynccontextmanager
async def serve_world(
    world: SimWorld, *, host: str = "127.0.0.1", ports: Sequence[int] = (0, 0, 0, 0)
) -> AsyncIterator[dict[str, str]]:
    """Serve the four simulators; yields ``{name: base URL}`` until the block ends."""
    async with contextlib.AsyncExitStack() as stack:
        urls = {
            "africastalking": await stack.enter_async_context(world.at.running(host, ports[0])),
            "daraja": await _serve(stack, world.daraja.app, host, ports[1]),
            "momo": await _serve(stack, world.momo.app, host, ports[2]),
            "airtel": await _serve(stack, world.airtel.app, host, ports[3]),
        }
        yield urls


# --- the command ---------------------------------------------------------------------------------


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a rate between 0 and 1, got {text}")
    return value


def _ports(text: str) -> list[int]:
    try:
        ports = [int(part) for part in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"four port numbers, got {text!r}") from exc
    if len(ports) != len(SIMULATORS) or not all(0 <= p <= 65535 for p in ports):
        raise argparse.ArgumentTypeError(f"four port numbers (0: any), got {text!r}")
    return ports


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``gateway sim``."""
    parser = subparsers.add_parser(
        "sim",
        help="run the AT, Daraja, MoMo and Airtel simulators standalone, pointed at a gateway",
        description="Run the simulators of the outside world in their own process on loopback, "
        "pointed at a gateway's routes; print their URLs (and a JSON line). Chaos rates add "
        "random faults (see docs/performance.md).",
    )
    parser.add_argument("--gateway", default=None, help="the gateway's base URL")
    parser.add_argument(
        "--callback-secret", default=None, help="the gateway's callback path secret (C2B URLs)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument(
        "--ports",
        type=_ports,
        default=[0, 0, 0, 0],
        help="AT,DARAJA,MOMO,AIRTEL listen ports (default 0,0,0,0: free ports)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed ids and chaos (reproducible)")
    parser.add_argument(
        "--c2b-msisdn",
        choices=["plain", "masked", "hashed"],
        default="plain",
        help="how C2B callbacks show the payer (Daraja masks; plain lets tokens go by SMS)",
    )
    parser.add_argument(
        "--confirmation-retries", type=int, default=8, help="C2B confirmation retries (8)"
    )
    parser.add_argument("--duplicate", type=_rate, default=0.0, help="callbacks duplicated")
    parser.add_argument("--lose", type=_rate, default=0.0, help="callbacks lost")
    parser.add_argument(
        "--delay-max-s", type=float, default=0.0, help="callbacks delayed up to S (reordered)"
    )
    parser.add_argument("--query-errors", type=_rate, default=0.0, help="status queries 5xx")
    parser.add_argument("--query-timeouts", type=_rate, default=0.0, help="status queries hang")
    parser.add_argument("--sms-errors", type=_rate, default=0.0, help="SMS sends fail (HTTP 500)")
    parser.add_argument(
        "--log-level", default="warning", help="log level of the simulators' logs (on stderr)"
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.set_defaults(handler=_command)


def _command(args: argparse.Namespace) -> int:
    # Logs go to stderr: stdout carries only the URLs, so a parent may stop reading it.
    configure_logging(level=args.log_level, stream=sys.stderr)
    chaos = Chaos(
        duplicate=args.duplicate,
        lose=args.lose,
        delay_max_s=args.delay_max_s,
        query_errors=args.query_errors,
        query_timeouts=args.query_timeouts,
        sms_errors=args.sms_errors,
    )
    try:
        asyncio.run(_run(args, chaos))
    except OSError as exc:
        print(f"gateway sim: cannot listen: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


async def _run(args: argparse.Namespace, chaos: Chaos) -> None:
    world = build_world(
        gateway=args.gateway,
        callback_secret=args.callback_secret,
        seed=args.seed,
        c2b_msisdn=args.c2b_msisdn,
        confirmation_retries=args.confirmation_retries,
        chaos=chaos,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve_world(world, host=args.host, ports=args.ports) as urls:
        if not args.json:
            for name in SIMULATORS:
                print(f"{name:<15} {urls[name]}")
        line = {**urls, "gateway": args.gateway, "credentials": world.credentials()}
        print(json.dumps(line, separators=(",", ":")), flush=True)
        await stop.wait()


__all__ = [
    "Chaos",
    "ChaosCounts",
    "ChaosCourier",
    "SimWorld",
    "build_world",
    "register",
    "serve_world",
]
