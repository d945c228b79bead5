import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.engine import UssdEngine
from flows.journeys import build_screens
from flows.messages import text
from flows.ports import Language, MeterInfo, MeterNumber
from flows.sessions import MemorySessionStore, SqliteSessionStore
from flows.testing import FakeCustomerServices, make_meter_number
from gateway.phone import Msisdn
from gateway.sim.africastalking import AtSimulator
from gateway.web.ussd import FollowUps, HopDeadlines, ussd_routes

METER = make_meter_number("3701234567")
PHONE = "+254711000001"
AiohttpClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
FIXTURES_OK = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None, max_examples=60
)


@dataclass
class Gateway:
    """The USSD routes in a running app, with a fake behind the port."""

    services: FakeCustomerServices
    engine: UssdEngine
    follow_ups: FollowUps
    client: TestClient[web.Request, web.Application]

    async def post(self, form: dict[str, str]) -> tuple[int, str]:
        """Post one USSD form; status and body."""
        response = await self.client.post("/ussd/africastalking", data=form)
        return response.status, await response.text()


def _app(
    services: FakeCustomerServices, *, deadline_s: float = 4.0
) -> tuple[web.Application, UssdEngine, FollowUps]:
    engine = UssdEngine(services, MemorySessionStore(), build_screens())
    follow_ups = FollowUps()
    app = web.Application()
    app.add_routes(ussd_routes(engine, follow_ups, reply_deadline_s=deadline_s))
    return app, engine, follow_ups


@pytest.fixture
async def gateway(aiohttp_client: AiohttpClient) -> Gateway:
    """The USSD routes over HTTP with one registered meter."""
    services = FakeCustomerServices()
    services.add_meter(METER)
    app, engine, follow_ups = _app(services)
    return Gateway(services, engine, follow_ups, await aiohttp_client(app))


def _assert_ussd(status: int, body: str) -> None:
    assert status == 200, body
    assert body.startswith(("CON ", "END ")), body
    assert len(body) <= 182, body


_SESSIONS = itertools.count()
ANY_TEXT = st.text(max_size=200) | st.sampled_from(["", "0", "00", "98", "1", "*", "1**2", "#"])


@FIXTURES_OK
@given(
    session_id=ANY_TEXT,
    phone=ANY_TEXT | st.just(PHONE),
    service_code=ANY_TEXT,
    network=ANY_TEXT,
    text=ANY_TEXT,
)
async def test_any_request_gets_a_ussd_answer_never_a_5xx(
    gateway: Gateway, session_id: str, phone: str, service_code: str, network: str, text: str
) -> None:
    """Whatever lands in any field, the answer is 200, CON/END and at most 182 characters."""
    status, body = await gateway.post(
        {
            "sessionId": session_id,
            "phoneNumber": phone,
            "serviceCode": service_code,
            "networkCode": network,
            "text": text,
        }
    )
    _assert_ussd(status, body)


@FIXTURES_OK
@given(
    st.lists(
        st.sampled_from(["0", "00", "98", "1", "2", "3", "4", "5", "6", "9", METER, "500", "Ab"])
        | st.text(max_size=20),
        max_size=15,
    )
)
async def test_double_zero_always_brings_the_menu_back(
    gateway: Gateway, answers: list[str]
) -> None:
    """After any sequence of answers the session is never stuck: 00 shows the main menu."""
    session_id = f"ATUid_{next(_SESSIONS):032x}"
    path: list[str] = []
    status, body = await gateway.post(
        {"sessionId": session_id, "phoneNumber": PHONE, "serviceCode": "*384#", "text": ""}
    )
    for answer in answers:
        if body.startswith("END "):
            break
        path.append(answer)
        form = {"sessionId": session_id, "phoneNumber": PHONE, "text": "*".join(path)}
        status, body = await gateway.post(form)
        _assert_ussd(status, body)
    if body.startswith("CON "):
        path.append("00")
        status, body = await gateway.post(
            {"sessionId": session_id, "phoneNumber": PHONE, "text": "*".join(path)}
        )
        _assert_ussd(status, body)
        language = gateway.services.languages.get(Msisdn(PHONE), Language.EN)
        home = f"CON {text(language, 'home_title')}\n1 {text(language, 'menu_buy')}"
        assert body.startswith(home), body


class _StuckServices(FakeCustomerServices):
    """Meter lookups hang until released: a backend slower than the USSD budget."""

    release: asyncio.Event

    async def lookup_meter(self, meter: MeterNumber) -> MeterInfo | None:
        await self.release.wait()
        return await super().lookup_meter(meter)


async def test_a_slow_backend_gets_a_clean_end_within_the_deadline(
    aiohttp_client: AiohttpClient,
) -> None:
    """Past the reply deadline the customer gets END 'busy', not a dead session."""
    services = _StuckServices()
    services.release = asyncio.Event()
    app, _, _ = _app(services, deadline_s=0.1)
    client = await aiohttp_client(app)
    form = {"sessionId": "s", "phoneNumber": PHONE, "text": f"1*{METER}"}
    response = await client.post("/ussd/africastalking", data=form)
    assert await response.text() == "END Service is busy. Please try again in a minute."
    services.release.set()


class _BrokenServices(FakeCustomerServices):
    """Every language lookup fails: a backend bug."""

    async def language(self, phone: object) -> None:  # noqa: ARG002
        raise RuntimeError("database on fire")


async def test_a_crashing_backend_gets_a_clean_end(aiohttp_client: AiohttpClient) -> None:
    """An unexpected error answers END with an apology and HTTP 200."""
    app, _, _ = _app(_BrokenServices())
    client = await aiohttp_client(app)
    response = await client.post(
        "/ussd/africastalking", data={"sessionId": "s", "phoneNumber": PHONE}
    )
    assert response.status == 200
    assert (await response.text()).startswith("END Sorry, something went wrong")


async def test_replies_are_plain_text(gateway: Gateway) -> None:
    """The USSD answer is text/plain, as AT requires."""
    response = await gateway.client.post(
        "/ussd/africastalking", data={"sessionId": "s", "phoneNumber": PHONE, "text": ""}
    )
    assert response.content_type == "text/plain"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[AtSimulator, FakeCustomerServices]]:
    """The real app on a loopback port (SQLite sessions) driven by the AT simulator."""
    services = FakeCustomerServices()
    services.add_meter(METER)
    store = SqliteSessionStore.open(tmp_path / "sessions.db")
    engine = UssdEngine(services, store, build_screens())
    follow_ups = FollowUps()
    app = web.Application()
    app.add_routes(ussd_routes(engine, follow_ups))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base = f"http://127.0.0.1:{port}"
    sim = AtSimulator(
        ussd_url=f"{base}/ussd/africastalking", ussd_events_url=f"{base}/ussd/africastalking/events"
    )
    yield sim, services
    await sim.close()
    await follow_ups.close()
    await runner.cleanup()
    store.close()


async def test_the_at_simulator_buys_through_the_real_route(
    served: tuple[AtSimulator, FakeCustomerServices],
) -> None:
    """AT's wire format end to end: dial, answers, END, then the end-of-session event."""
    sim, services = served
    session, screen = await sim.dial(PHONE, "*384*123#")
    assert session.session_id.startswith("ATUid_")
    assert "1 Buy electricity" in screen.text
    for answer in ["1", METER, "500", "1"]:
        screen = await session.answer(answer)
    assert screen.ended
    assert "payment prompt" in screen.text
    assert session.text == f"1*{METER}*500*1"
    assert session.status == "Success"
    assert session.violations == []
    assert sim.session_events[-1]["status"] == "Success"
    assert len(services.purchases) == 1


async def test_one_timer_cuts_every_slow_hop_and_spares_the_fast_ones() -> None:
    """Slow hops are cut (None), fast ones keep their result; a cancel from elsewhere stays.

    No task is left with a pending cancellation after a cut.
    """
    deadlines = HopDeadlines(0.05)

    async def hop(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return f"done in {seconds}"

    async def timed(seconds: float) -> tuple[str | None, int]:
        result = await deadlines.run(hop(seconds))
        task = asyncio.current_task()
        assert task is not None
        return result, task.cancelling()

    results = await asyncio.gather(*(timed(s) for s in (0.0, 0.01, 1.0, 5.0, 0.0)))
    assert results == [
        ("done in 0.0", 0),
        ("done in 0.01", 0),
        (None, 0),
        (None, 0),
        ("done in 0.0", 0),
    ]
    outside = asyncio.create_task(deadlines.run(hop(5.0)))
    await asyncio.sleep(0)
    outside.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outside
