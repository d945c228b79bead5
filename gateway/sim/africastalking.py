"""An Africa's Talking look-alike on loopback: USSD driver, SMS API, callbacks.

It speaks AT's real wire formats (docs/protocols.md §1, §6.1, §6.2), so the production adapters run
against it unchanged:

- **USSD**: :meth:`AtSimulator.dial` drives our USSD route the way AT does: form POST with
  ``sessionId`` (``ATUid_<32 hex>``), ``serviceCode``, ``phoneNumber``, ``networkCode`` and the
  cumulative ``text`` (answers joined by ``*``). It enforces AT's budget: a reply slower than
  ``app_timeout_s`` ends the session (``Failed``), a customer idle for ``user_timeout_s`` or a
  session older than ``session_limit_s`` ends it (``Incomplete``), a new dial from the same phone
  ends the old one. It checks each reply (HTTP 200, ``CON ``/``END ``, length, GSM-7) and
  records violations. At the end it POSTs AT's end-of-session notification.
- **SMS API**: ``POST /version1/messaging`` exactly as AT: ``apiKey`` header, form fields,
  HTTP 201 with ``Content-Type: application/json`` (no charset: the SDK needs it exact), one
  ``Recipients[]`` entry per number with AT's status codes, ``messageId`` ``ATXid_…``, cost per
  segment (GSM-7 or UCS-2). Each phone keeps an inbox. Delivery reports follow to
  ``delivery_url`` per a :class:`DeliveryPlan` (delay, duplicates, out of order, never).
- **Inbound SMS**: :meth:`AtSimulator.send_inbound` POSTs AT's incoming-message callback to
  ``inbound_url``; ``GET /version1/messaging`` serves them too.
- **Faults**: per-number status codes (:attr:`AtSimulator.recipient_status`), queued HTTP
  failures (:attr:`AtSimulator.http_failures`), a response delay, all behind a ``sleep`` seam so
  tests never wait.

Operator/phone surface (JSON): ``GET /sim/inbox?phone=+2547…``, ``POST /sim/sms`` (``from``,
``text``: a customer texting the shortcode), ``GET /sim/sent``.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp
import structlog
from aiohttp import web

from flows.messages.gsm7 import is_gsm7, sms_segments

log = structlog.get_logger()

Sleep = Callable[[float], Awaitable[None]]

STATUS_NAMES: Final[Mapping[int, str]] = {
    100: "Processed",
    101: "Success",  # the code table says "Sent"; AT's fixtures and docs answer "Success"
    102: "Queued",
    401: "RiskHold",
    402: "InvalidSenderId",
    403: "InvalidPhoneNumber",
    404: "UnsupportedNumberType",
    405: "InsufficientBalance",
    406: "UserInBlacklist",
    407: "CouldNotRoute",
    409: "DoNotDisturbRejection",
    500: "InternalServerError",
    501: "GatewayError",
    502: "RejectedByGateway",
}
_E164: Final = re.compile(r"^\+\d{1,3}\d{3,}$")  # the SDK's own check
COST_PER_SEGMENT_MINOR: Final = 80  # "KES 0.8000"


def _now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryPlan:
    """What delivery reports follow an accepted message.

    ``statuses`` are posted in order (reversed when ``out_of_order``), each ``delay_s`` after
    the previous; ``duplicate`` posts each twice; ``never`` posts nothing.
    """

    statuses: tuple[str, ...] = ("Sent", "Success")
    delay_s: float = 0.0
    duplicate: bool = False
    out_of_order: bool = False
    never: bool = False
    failure_reason: str | None = None


@dataclass(slots=True, kw_only=True)
class SimSms:
    """A message AT accepted for a phone (the phone's inbox holds these)."""

    message_id: str
    to: str
    sender: str
    text: str
    encoding: str
    segments: int
    cost: str
    sent_at: str
    reports: list[str] = field(default_factory=list)  # statuses posted to the gateway


@dataclass(slots=True, kw_only=True)
class InboundSms:
    """A message a phone sent to the shortcode."""

    id: str
    sender: str
    to: str
    text: str
    date: str
    link_id: str | None
    network_code: str
    callback_status: int | None = None


class UssdSessionClosedError(RuntimeError):
    """The USSD session is over (END, timeout, hang-up, a newer dial); no more answers."""


@dataclass(frozen=True, slots=True)
class UssdScreen:
    """What the handset shows after a hop."""

    text: str
    ended: bool


@dataclass(slots=True)
class UssdSimSession:
    """One simulated USSD session: the handset side of AT's protocol."""

    sim: AtSimulator
    phone: str
    service_code: str
    network_code: str
    session_id: str = field(default_factory=lambda: "ATUid_" + secrets.token_hex(16))
    inputs: list[str] = field(default_factory=list)
    hops: int = 0
    started_at: float = 0.0
    last_at: float = 0.0
    last_response: str = ""
    status: str | None = None  # Success | Incomplete | Failed once over
    error: str | None = None
    violations: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The cumulative ``text`` AT sends: every answer so far joined by ``*``."""
        return "*".join(self.inputs)

    @property
    def is_open(self) -> bool:
        """Whether the session still takes answers."""
        return self.status is None

    async def answer(self, text: str) -> UssdScreen:
        """Type ``text`` and send it; the next screen.

        Raises:
            UssdSessionClosedError: the session ended (also when the customer took longer than
                ``user_timeout_s`` or the session passed ``session_limit_s``).
        """
        if not self.is_open:
            raise UssdSessionClosedError(f"session {self.status}: {self.last_response!r}")
        now = self.sim.clock()
        if now - self.last_at > self.sim.user_timeout_s:
            await self.sim.end_session(self, "Incomplete", "user did not respond in time")
            raise UssdSessionClosedError("timed out waiting for the customer")
        if now - self.started_at > self.sim.session_limit_s:
            await self.sim.end_session(self, "Incomplete", "session too long")
            raise UssdSessionClosedError("session time limit reached")
        self.inputs.append(text)
        return await self.sim.hop(self)

    async def hang_up(self) -> None:
        """The customer cancels on the handset: no more hops; AT reports ``Incomplete``."""
        if self.is_open:
            await self.sim.end_session(self, "Incomplete", None)


class AtSimulator:
    """Africa's Talking on loopback. See the module docstring for what it does.

    Args:
        api_key, username: what the SMS API accepts (wrong → HTTP 401, as AT).
        ussd_url: our USSD callback; ``ussd_events_url`` gets the end-of-session notification.
        delivery_url, inbound_url: our SMS delivery-report and incoming-message callbacks.
        app_timeout_s: how long AT waits for our USSD reply before it ends the session.
        user_timeout_s, session_limit_s: the customer's and the session's budgets.
        max_chars: longest USSD reply a handset shows (longer is flagged and cut).
        clock: seconds; ``sleep``: the delay seam (tests pass one that returns at once).
    """

    def __init__(  # noqa: PLR0913 - each is a documented knob of the simulator
        self,
        *,
        api_key: str = "sim-api-key",
        username: str = "sandbox",
        ussd_url: str | None = None,
        ussd_events_url: str | None = None,
        delivery_url: str | None = None,
        inbound_url: str | None = None,
        shortcode: str = "20880",
        network_code: str = "63902",
        app_timeout_s: float = 10.0,
        user_timeout_s: float = 60.0,
        session_limit_s: float = 180.0,
        max_chars: int = 182,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.api_key = api_key
        self.username = username
        self.ussd_url = ussd_url
        self.ussd_events_url = ussd_events_url
        self.delivery_url = delivery_url
        self.inbound_url = inbound_url
        self.shortcode = shortcode
        self.network_code = network_code
        self.app_timeout_s = app_timeout_s
        self.user_timeout_s = user_timeout_s
        self.session_limit_s = session_limit_s
        self.max_chars = max_chars
        self.clock = clock
        self.sleep = sleep
        # Faults and plans (tests set these).
        self.recipient_status: dict[str, int] = {}
        self.http_failures: list[int] = []
        self.send_delay_s = 0.0
        self.delivery_plan = DeliveryPlan()
        self.delivery_plans: dict[str, DeliveryPlan] = {}
        # What happened.
        self.sent: list[SimSms] = []
        self.send_requests: list[dict[str, str]] = []
        self.inbound: list[InboundSms] = []
        self.sessions: list[UssdSimSession] = []
        self.session_events: list[dict[str, str]] = []
        self.delivery_posts: list[tuple[str, str, int | None]] = []  # id, status, HTTP status
        self._active: dict[str, UssdSimSession] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: aiohttp.ClientSession | None = None
        self.app = self._build_app()

    # --- lifecycle -------------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Serve the simulator's HTTP API; yields its base URL (``http://host:port``)."""
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        server = site._server  # noqa: SLF001 - the only way to learn the bound port
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname()[1] if sockets else port
        try:
            yield f"http://{host}:{bound}"
        finally:
            await self.close()
            await runner.cleanup()

    async def close(self) -> None:
        """Finish the background posts and close the HTTP client."""
        await self.drain()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def drain(self) -> None:
        """Wait for every scheduled callback (delivery reports, inbound posts)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return self._http

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post_form(self, url: str, form: Mapping[str, str]) -> int | None:
        try:
            async with (
                asyncio.timeout(self.app_timeout_s),
                self._client().post(url, data=dict(form)) as response,
            ):
                await response.read()
                return response.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("sim_callback_failed", url=url, error=type(exc).__name__)
            return None

    # --- USSD ------------------------------------------------------------------------------------

    async def dial(
        self, phone: str, service_code: str = "*384*123#", *, network_code: str | None = None
    ) -> tuple[UssdSimSession, UssdScreen]:
        """Dial ``service_code`` from ``phone``; the session and its first screen.

        Extra segments in the code (``*384*123*1#``) pre-fill answers, as networks do. A dial
        ends any session the same phone still has open (a handset has one).
        """
        previous = self._active.get(phone)
        if previous is not None and previous.is_open:
            await self.end_session(previous, "Incomplete", "replaced by a new dial")
        now = self.clock()
        base, extra = _split_service_code(service_code)
        session = UssdSimSession(
            sim=self,
            phone=phone,
            service_code=base,
            network_code=network_code or self.network_code,
            inputs=extra,
            started_at=now,
            last_at=now,
        )
        self._active[phone] = session
        self.sessions.append(session)
        return session, await self.hop(session)

    async def hop(self, session: UssdSimSession) -> UssdScreen:
        """Send the session's current ``text`` to our USSD route and judge the reply."""
        if self.ussd_url is None:
            raise RuntimeError("ussd_url is not configured")
        session.hops += 1
        form = {
            "sessionId": session.session_id,
            "serviceCode": session.service_code,
            "phoneNumber": session.phone,
            "networkCode": session.network_code,
            "text": session.text,
        }
        try:
            async with (
                asyncio.timeout(self.app_timeout_s),
                self._client().post(self.ussd_url, data=form) as response,
            ):
                status = response.status
                body = await response.text()
        except TimeoutError:
            await self.end_session(session, "Failed", "application response timeout")
            return UssdScreen(text="Connection problem or invalid MMI code.", ended=True)
        except aiohttp.ClientError as exc:
            await self.end_session(session, "Failed", f"connection error: {type(exc).__name__}")
            return UssdScreen(text="Connection problem or invalid MMI code.", ended=True)
        session.last_at = self.clock()
        if status != 200:
            await self.end_session(session, "Failed", f"HTTP {status}")
            return UssdScreen(text="Connection problem or invalid MMI code.", ended=True)
        if not body.startswith(("CON ", "END ")):
            await self.end_session(session, "Failed", "Response should start with a CON or an END")
            return UssdScreen(text="Connection problem or invalid MMI code.", ended=True)
        if not is_gsm7(body):
            session.violations.append(f"hop {session.hops}: characters outside GSM-7")
        if len(body) > self.max_chars:
            session.violations.append(f"hop {session.hops}: {len(body)} characters")
            body = body[: self.max_chars]
        session.last_response = body
        screen = UssdScreen(text=body[4:], ended=body.startswith("END "))
        if screen.ended:
            await self.end_session(session, "Success", None)
        return screen

    async def end_session(self, session: UssdSimSession, status: str, error: str | None) -> None:
        """Close ``session`` and POST AT's end-of-session notification (if configured)."""
        if not session.is_open:
            return
        session.status = status
        session.error = error
        if self._active.get(session.phone) is session:
            del self._active[session.phone]
        event = {
            "date": _now_text(),
            "sessionId": session.session_id,
            "serviceCode": session.service_code,
            "networkCode": session.network_code,
            "phoneNumber": session.phone,
            "status": status,
            "cost": "KES 0.10" if session.hops else "0",
            "durationInMillis": str(int((self.clock() - session.started_at) * 1000)),
            "hopsCount": str(session.hops),
            "input": session.text,
            "lastAppResponse": session.last_response,
        }
        if error is not None and status == "Failed":
            event["errorMessage"] = error
        self.session_events.append(event)
        if self.ussd_events_url is not None:
            await self._post_form(self.ussd_events_url, event)

    # --- SMS -------------------------------------------------------------------------------------

    def inbox(self, phone: str) -> list[SimSms]:
        """Messages AT accepted for ``phone``, oldest first."""
        return [sms for sms in self.sent if sms.to == phone]

    async def send_inbound(
        self, phone: str, text: str, *, to: str | None = None, link_id: str | None = None
    ) -> InboundSms:
        """``phone`` texts the shortcode: AT stores it and POSTs it to ``inbound_url``."""
        message = InboundSms(
            id=secrets.token_hex(16),
            sender=phone,
            to=to or self.shortcode,
            text=text,
            date=_now_text(),
            link_id=link_id,
            network_code=self.network_code,
        )
        self.inbound.append(message)
        if self.inbound_url is not None:
            form = {
                "date": message.date,
                "from": message.sender,
                "to": message.to,
                "text": message.text,
                "id": message.id,
                "networkCode": message.network_code,
            }
            if link_id is not None:
                form["linkId"] = link_id
            message.callback_status = await self._post_form(self.inbound_url, form)
        return message

    def _build_app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.post("/version1/messaging", self._handle_send),
                web.get("/version1/messaging", self._handle_fetch),
                web.get("/sim/inbox", self._handle_inbox),
                web.get("/sim/sent", self._handle_sent),
                web.post("/sim/sms", self._handle_inject),
            ]
        )
        return app

    def _json(self, payload: object, status: int = 200) -> web.Response:
        # Exactly "application/json", no charset: the SDK parses nothing else (PROTOCOLS §1.5).
        return web.Response(
            body=json.dumps(payload).encode(), status=status, content_type="application/json"
        )

    async def _handle_send(self, request: web.Request) -> web.Response:
        if not secrets.compare_digest(request.headers.get("apiKey", ""), self.api_key):
            return web.Response(status=401, text="The supplied authentication is invalid")
        if self.http_failures:
            status = self.http_failures.pop(0)
            return web.Response(status=status, text=f"simulated HTTP {status}")
        if self.send_delay_s > 0:
            await self.sleep(self.send_delay_s)
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        self.send_requests.append(form)
        if form.get("username") != self.username:
            return web.Response(status=401, text="The supplied authentication is invalid")
        recipients_text, message = form.get("to"), form.get("message")
        if not recipients_text or message is None:
            return web.Response(status=400, text="Request is missing required form field 'to'")
        encoding, segments = sms_segments(message)
        recipients: list[dict[str, object]] = []
        total_minor = 0
        for number in (part.strip() for part in recipients_text.split(",")):
            code = 101 if _E164.match(number) else 403
            code = self.recipient_status.get(number, code)
            if code in {100, 101, 102}:
                cost_minor = COST_PER_SEGMENT_MINOR * segments
                total_minor += cost_minor
                sms = SimSms(
                    message_id="ATXid_" + secrets.token_hex(16),
                    to=number,
                    sender=form.get("from", "AFRICASTKNG"),
                    text=message,
                    encoding=encoding,
                    segments=segments,
                    cost=_kes(cost_minor),
                    sent_at=_now_text(),
                )
                self.sent.append(sms)
                self._spawn(self._deliver(sms))
                recipients.append(
                    {
                        "statusCode": code,
                        "number": number,
                        "status": STATUS_NAMES[code],
                        "cost": sms.cost,
                        "messageId": sms.message_id,
                    }
                )
            else:
                recipients.append(
                    {
                        "statusCode": code,
                        "number": number,
                        "status": STATUS_NAMES.get(code, "Failed"),
                        "cost": "0",
                        "messageId": "None",
                    }
                )
        accepted = sum(1 for r in recipients if r["statusCode"] in {100, 101, 102})
        summary = f"Sent to {accepted}/{len(recipients)} Total Cost: {_kes(total_minor)}"
        return self._json(
            {"SMSMessageData": {"Message": summary, "Recipients": recipients}}, status=201
        )

    async def _deliver(self, sms: SimSms) -> None:
        plan = self.delivery_plans.get(sms.to, self.delivery_plan)
        if plan.never or self.delivery_url is None:
            return
        statuses = list(reversed(plan.statuses) if plan.out_of_order else plan.statuses)
        for status in statuses:
            await self.sleep(plan.delay_s)
            form = {
                "id": sms.message_id,
                "status": status,
                "phoneNumber": sms.to,
                "networkCode": self.network_code,
                "retryCount": "0",
            }
            if status in {"Failed", "Rejected"} and plan.failure_reason:
                form["failureReason"] = plan.failure_reason
            for _ in range(2 if plan.duplicate else 1):
                answer = await self._post_form(self.delivery_url, form)
                sms.reports.append(status)
                self.delivery_posts.append((sms.message_id, status, answer))

    async def _handle_fetch(self, request: web.Request) -> web.Response:
        if not secrets.compare_digest(request.headers.get("apiKey", ""), self.api_key):
            return web.Response(status=401, text="The supplied authentication is invalid")
        last = request.query.get("lastReceivedId", "0")
        ids = [m.id for m in self.inbound]
        start = ids.index(last) + 1 if last in ids else 0
        messages = [
            {
                "linkId": m.link_id,
                "text": m.text,
                "to": m.to,
                "id": m.id,
                "date": m.date,
                "from": m.sender,
            }
            for m in self.inbound[start:]
        ]
        return self._json({"SMSMessageData": {"Messages": messages}})

    async def _handle_inbox(self, request: web.Request) -> web.Response:
        phone = request.query.get("phone", "")
        return self._json(
            [
                {
                    "messageId": sms.message_id,
                    "from": sms.sender,
                    "text": sms.text,
                    "sentAt": sms.sent_at,
                    "segments": sms.segments,
                    "reports": sms.reports,
                }
                for sms in self.inbox(phone)
            ]
        )

    async def _handle_sent(self, request: web.Request) -> web.Response:  # noqa: ARG002
        return self._json(
            [{"messageId": s.message_id, "to": s.to, "segments": s.segments} for s in self.sent]
        )

    async def _handle_inject(self, request: web.Request) -> web.Response:
        form = await request.post()
        sender, text = form.get("from"), form.get("text")
        if not isinstance(sender, str) or not isinstance(text, str):
            return web.Response(status=400, text="from and text are required")
        message = await self.send_inbound(sender, text)
        return self._json({"id": message.id, "callbackStatus": message.callback_status})


def _kes(minor: int) -> str:
    return f"KES {minor // 100}.{minor % 100:02d}00"


def _split_service_code(code: str) -> tuple[str, list[str]]:
    """``*384*123*1*2#`` → (``*384*123#``, [``1``, ``2``]): a base code has two parts."""
    parts = code.strip("#").split("*")
    parts = [p for p in parts if p]
    if len(parts) <= 2:
        return code, []
    return "*" + "*".join(parts[:2]) + "#", parts[2:]
