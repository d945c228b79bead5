"""USSD over HTTP: aggregator dialects in front of the flows engine.

A dialect turns an aggregator's request into a :class:`flows.engine.UssdHop` and the engine's
:class:`flows.engine.UssdReply` into the aggregator's response. Africa's Talking is the first
(docs/protocols.md §1.1): a form POST with ``sessionId``, ``phoneNumber``, ``serviceCode``,
``networkCode`` and the cumulative ``text``; the answer is ``text/plain`` ``CON …`` or ``END …``.
Hubtel, Nalo and Arkesel (JSON, last input only) fit the same :class:`UssdDialect` shape.

The reply goes out first; slow work (the payment prompt) runs after it, owned by
:class:`FollowUps`. Each hop is bounded by ``reply_deadline_s``, well inside AT's 10 s: past it
the customer gets a clean ``END`` and can redial to resume. One timer watches every hop in
flight (:class:`HopDeadlines`), not one per hop.

Routes (mounted by ``gateway/app.py``)::

    POST /ussd/africastalking          the USSD callback
    POST /ussd/africastalking/events   AT's end-of-session notification
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Mapping
from functools import lru_cache
from typing import Final, Protocol, TypeVar, cast

import structlog
from aiohttp import web

from flows.engine import UssdEngine, UssdHop, UssdReply
from flows.ports import FollowUp
from gateway.logging import get_logger
from gateway.phone import InvalidPhoneNumber, Msisdn, parse_msisdn

log = get_logger()

T = TypeVar("T")

_MAX_FIELD: Final = 64
_MAX_TEXT: Final = 512  # a whole session's answers; AT's own screens cap input far below this


class BadUssdRequest(ValueError):
    """An aggregator request we cannot read (missing or malformed field); ``field`` names it."""

    def __init__(self, problem: str, *, field: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class FollowUps:
    """Owns the slow work started after a reply (payment prompts, SMS replies).

    Each follow-up runs as a task bounded by ``timeout_s``; failures are logged, never raised
    into a request. :meth:`drain` waits for what is running (tests, shutdown).
    """

    def __init__(self, *, timeout_s: float = 60.0) -> None:
        self._timeout_s = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, follow_up: FollowUp, *, what: str) -> None:
        """Start ``follow_up`` in the background; ``what`` names it in logs."""
        task = asyncio.get_running_loop().create_task(self._run(follow_up, what))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, follow_up: FollowUp, what: str) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await follow_up()
        except Exception:
            log.exception("follow_up_failed", what=what)

    @property
    def pending(self) -> int:
        """How many follow-ups are still running."""
        return len(self._tasks)

    async def drain(self) -> None:
        """Wait until every follow-up started so far (and any they start) has finished."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self, timeout_s: float = 10.0) -> None:
        """Give running follow-ups ``timeout_s`` to finish, then cancel the rest."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.drain()
        except TimeoutError:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]:  # noqa: ARG002
        """For ``app.cleanup_ctx``: nothing to open; drain (then cancel) on shutdown."""
        yield
        await self.close()


class HopDeadlines:
    """Cuts USSD hops that overrun their deadline, with one timer for all of them.

    ``asyncio.timeout`` per hop arms and cancels a timer (a heap push, a handle) on every
    request; here a hop only enters and leaves a dict, and one timer, armed while hops are in
    flight, looks every ``deadline_s / 8`` at the oldest: a hop is cut between ``deadline_s``
    and ``deadline_s * 9 / 8`` after it started (4 to 4.5 s by default), well inside Africa's
    Talking's 10 s. A cut hop's task is cancelled; :meth:`leave` tells it that the cancel was
    ours (and withdraws it), so that it can answer "busy" instead of dying.
    """

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self._tick_s = max(deadline_s / 8, 0.005)
        self._started: dict[asyncio.Task[object], float] = {}  # in start order
        self._cut: set[asyncio.Task[object]] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def run(self, hop: Awaitable[T]) -> T | None:
        """``hop``'s result, or None when it was cut at the deadline."""
        task = cast("asyncio.Task[object]", asyncio.current_task())
        self.enter(task)
        cut = False
        try:
            try:
                return await hop
            finally:
                cut = self.leave(task)
        except asyncio.CancelledError:
            if cut:
                return None
            raise

    def enter(self, task: asyncio.Task[object]) -> None:
        """``task`` starts a hop now."""
        loop = task.get_loop()
        self._started.pop(task, None)  # keep start order: a task reused for the next request
        self._started[task] = loop.time()
        if self._timer is None:
            self._timer = loop.call_later(self._tick_s, self._check, loop)

    def leave(self, task: asyncio.Task[object]) -> bool:
        """``task``'s hop is over; True when it was cut (its cancellation is withdrawn)."""
        self._started.pop(task, None)
        if task not in self._cut:
            return False
        self._cut.discard(task)
        task.uncancel()
        return True

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        started = self._started
        oldest_allowed = loop.time() - self.deadline_s
        while started:
            task, at = next(iter(started.items()))
            if at > oldest_allowed:
                break
            del started[task]
            self._cut.add(task)
            task.cancel("USSD hop deadline")
        if started:
            self._timer = loop.call_later(self._tick_s, self._check, loop)


class UssdDialect(Protocol):
    """How one aggregator speaks USSD over HTTP."""

    name: str

    async def read(self, request: web.Request) -> UssdHop:
        """The hop in ``request``. Raises BadUssdRequest when it cannot be read."""
        ...

    def respond(self, reply: UssdReply) -> web.Response:
        """The aggregator's HTTP answer for ``reply``."""
        ...


def _field(form: Mapping[str, str], name: str, *, limit: int = _MAX_FIELD) -> str:
    value = form.get(name)
    if not isinstance(value, str):
        raise BadUssdRequest("missing", field=name)
    if len(value) > limit or not value.isprintable():
        raise BadUssdRequest("malformed", field=name)
    return value


class AfricasTalkingUssd:
    """Africa's Talking: a form POST in, ``CON``/``END`` text out (docs/protocols.md §1.1)."""

    name = "africastalking"

    def __init__(self, *, default_region: str = "KE") -> None:
        self._region = default_region

    async def read(self, request: web.Request) -> UssdHop:
        """Parse AT's form; ``text`` is the cumulative ``*``-joined path."""
        form = await _read_form(request)
        session_id = _field(form, "sessionId")
        if not session_id:
            raise BadUssdRequest("empty", field="sessionId")
        try:
            phone = _phone(_field(form, "phoneNumber"), self._region)
        except InvalidPhoneNumber as exc:
            raise BadUssdRequest("not a phone number", field="phoneNumber") from exc
        return UssdHop(
            session_id=f"at:{session_id}",
            phone=phone,
            service_code=form.get("serviceCode", "")[:_MAX_FIELD],
            text=_field(form, "text", limit=_MAX_TEXT) if "text" in form else "",
            cumulative=True,
            network_code=form.get("networkCode", "")[:8],
        )

    def respond(self, reply: UssdReply) -> web.Response:
        """``CON …`` or ``END …`` as plain text, HTTP 200."""
        return web.Response(text=reply.render_at(), content_type="text/plain")


async def _read_form(request: web.Request) -> Mapping[str, str]:
    try:
        form = await request.post()
    except ValueError as exc:  # undecodable body
        raise BadUssdRequest("unreadable body", field="body") from exc
    if all(isinstance(value, str) for value in form.values()):
        return cast("Mapping[str, str]", form)
    return {k: v for k, v in form.items() if isinstance(v, str)}  # multipart file parts dropped


@lru_cache(maxsize=65_536)
def _phone(text: str, region: str) -> Msisdn:
    """``parse_msisdn`` remembered: libphonenumber costs tens of microseconds per call."""
    return parse_msisdn(text, region)


def ussd_routes(
    engine: UssdEngine,
    follow_ups: FollowUps,
    *,
    dialect: UssdDialect | None = None,
    path: str = "/ussd/africastalking",
    events_path: str | None = "/ussd/africastalking/events",
    reply_deadline_s: float = 4.0,
) -> list[web.RouteDef]:
    """Routes for one USSD dialect (Africa's Talking by default).

    Args:
        engine: the conversation engine (its session store included).
        follow_ups: runs each END screen's follow-up after the reply has been written.
        dialect: the aggregator's wire format.
        path: the USSD callback route.
        events_path: AT's end-of-session notification route (None: not mounted).
        reply_deadline_s: a hop that takes longer is answered ``END`` "busy"; the session stays
            resumable.
    """
    speaker: UssdDialect = dialect or AfricasTalkingUssd()
    deadlines = HopDeadlines(reply_deadline_s)

    async def callback(request: web.Request) -> web.StreamResponse:
        try:
            hop = await speaker.read(request)
        except BadUssdRequest as exc:
            log.warning("ussd_request_unreadable", dialect=speaker.name, field=exc.field)
            return speaker.respond(engine.error_reply(None, "error_bad_request"))
        structlog.contextvars.bind_contextvars(channel="ussd", session_id=hop.session_id)
        try:
            answered = await deadlines.run(engine.handle(hop))
            if answered is None:
                log.warning("ussd_hop_too_slow", deadline_s=reply_deadline_s)
            reply = answered if answered is not None else engine.error_reply(None, "error_busy")
        except Exception:
            log.exception("ussd_hop_failed")
            reply = engine.error_reply(None)
        response = speaker.respond(reply)
        if reply.follow_up is not None:
            # Write the reply before the slow work starts: the aggregator has it, whatever
            # the follow-up does next.
            await response.prepare(request)
            await response.write_eof()
            follow_ups.spawn(reply.follow_up, what="ussd_follow_up")
        return response

    async def session_event(request: web.Request) -> web.StreamResponse:
        try:
            form = await _read_form(request)
        except BadUssdRequest:
            return web.Response(status=400, text="unreadable body\n")
        session_id = form.get("sessionId")
        status = form.get("status")
        if not session_id or len(session_id) > _MAX_FIELD:
            return web.Response(status=400, text="sessionId missing\n")
        log.info(
            "ussd_session_ended",
            session_id=f"at:{session_id}",
            status=(status or "")[:16],
            hops=form.get("hopsCount", "")[:8],
        )
        await engine.session_ended(f"at:{session_id}", completed=status == "Success")
        return web.Response(text="")

    routes = [web.post(path, callback)]
    if events_path is not None:
        routes.append(web.post(events_path, session_event))
    return routes
