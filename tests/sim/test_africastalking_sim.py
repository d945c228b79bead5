import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from flows.messages.gsm7 import sms_segments
from gateway.phone import Msisdn
from gateway.sim.africastalking import AtSimulator, UssdSessionClosedError
from gateway.sms.africastalking import AfricasTalkingSdkSender
from tests.support.clock import SecondsClock

PHONE = "+254711000001"


class App:
    """A stand-in USSD application recording what AT's simulator posts to it."""

    def __init__(self) -> None:
        self.hops: list[dict[str, str]] = []
        self.events: list[dict[str, str]] = []
        self.reply: Callable[[dict[str, str]], web.Response] = lambda form: web.Response(
            text=f"CON you said {form['text']!r}"
        )
        self.gate: asyncio.Event | None = None

    async def ussd(self, request: web.Request) -> web.Response:
        """Record the hop and answer with ``reply``."""
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        self.hops.append(form)
        if self.gate is not None:
            await self.gate.wait()
        return self.reply(form)

    async def event(self, request: web.Request) -> web.Response:
        """Record the end-of-session notification."""
        self.events.append({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
        return web.Response(text="")


@pytest.fixture
async def world() -> AsyncIterator[tuple[AtSimulator, App, SecondsClock]]:
    """The simulator pointed at a stand-in app on loopback, with a fake clock."""
    app = App()
    web_app = web.Application()
    web_app.add_routes([web.post("/ussd", app.ussd), web.post("/events", app.event)])
    runner = web.AppRunner(web_app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    clock = SecondsClock(0.0)
    sim = AtSimulator(
        ussd_url=f"{base}/ussd", ussd_events_url=f"{base}/events", clock=clock, app_timeout_s=0.3
    )
    yield sim, app, clock
    if app.gate is not None:
        app.gate.set()
    await sim.close()
    await runner.cleanup()


async def test_text_accumulates_answers_joined_by_star(
    world: tuple[AtSimulator, App, SecondsClock],
) -> None:
    """The first hop has empty text; each later one carries every answer joined by '*'."""
    sim, app, _ = world
    session, _ = await sim.dial(PHONE, "*384*123#")
    await session.answer("1")
    await session.answer("37012345676")
    assert [hop["text"] for hop in app.hops] == ["", "1", "1*37012345676"]
    assert {hop["sessionId"] for hop in app.hops} == {session.session_id}
    assert session.session_id.startswith("ATUid_")
    assert len(session.session_id) == len("ATUid_") + 32
    assert app.hops[0]["serviceCode"] == "*384*123#"
    assert app.hops[0]["phoneNumber"] == PHONE
    assert app.hops[0]["networkCode"] == "63902"


async def test_extra_code_segments_prefill_the_text(
    world: tuple[AtSimulator, App, SecondsClock],
) -> None:
    """Dialling *384*123*1*2# sends serviceCode *384*123# and text '1*2' on the first hop."""
    sim, app, _ = world
    await sim.dial(PHONE, "*384*123*1*2#")
    assert (app.hops[0]["serviceCode"], app.hops[0]["text"]) == ("*384*123#", "1*2")


async def test_end_closes_the_session_and_reports_success(
    world: tuple[AtSimulator, App, SecondsClock],
) -> None:
    """An END reply ends the session; AT then posts status Success with the input path."""
    sim, app, _ = world
    app.reply = lambda form: web.Response(text="END bye" if form["text"] else "CON hi")
    session, _ = await sim.dial(PHONE)
    screen = await session.answer("3")
    assert screen.ended
    assert screen.text == "bye"
    (event,) = app.events
    assert (event["status"], event["input"], event["hopsCount"]) == ("Success", "3", "2")
    assert event["lastAppResponse"] == "END bye"
    with pytest.raises(UssdSessionClosedError):
        await session.answer("1")


async def test_a_slow_app_loses_the_session(world: tuple[AtSimulator, App, SecondsClock]) -> None:
    """A reply slower than AT's deadline ends the session as Failed."""
    sim, app, _ = world
    app.gate = asyncio.Event()
    session, screen = await sim.dial(PHONE)
    assert screen.ended
    assert session.status == "Failed"
    assert app.events[-1]["errorMessage"] == "application response timeout"


@pytest.mark.parametrize(
    "reply",
    [
        lambda _form: web.Response(text=" CON leading space"),
        lambda _form: web.Response(text=""),
        lambda _form: web.Response(status=500, text="CON boom"),
    ],
)
async def test_a_malformed_reply_fails_the_session(
    world: tuple[AtSimulator, App, SecondsClock], reply: Callable[[dict[str, str]], web.Response]
) -> None:
    """No CON/END prefix, an empty body or an HTTP error ends the session as Failed."""
    sim, app, _ = world
    app.reply = reply
    session, screen = await sim.dial(PHONE)
    assert screen.ended
    assert session.status == "Failed"


async def test_long_or_non_gsm_replies_are_flagged(
    world: tuple[AtSimulator, App, SecondsClock],
) -> None:
    """A reply over 182 characters is cut and flagged; a non-GSM-7 character is flagged."""
    sim, app, _ = world
    app.reply = lambda _form: web.Response(text="CON " + "x" * 200 + "\u2019")
    session, screen = await sim.dial(PHONE)
    assert len(screen.text) == 178
    assert len(session.violations) == 2


async def test_an_idle_customer_times_out_as_incomplete(
    world: tuple[AtSimulator, App, SecondsClock],
) -> None:
    """Answering after the customer's 60 s budget ends the session as Incomplete instead."""
    sim, app, clock = world
    session, _ = await sim.dial(PHONE)
    clock.now += 61
    with pytest.raises(UssdSessionClosedError):
        await session.answer("1")
    assert len(app.hops) == 1
    assert app.events[-1]["status"] == "Incomplete"


async def test_a_new_dial_ends_the_old_session(
    world: tuple[AtSimulator, App, SecondsClock],
) -> None:
    """A handset has one session: dialling again reports the old one Incomplete."""
    sim, app, _ = world
    first, _ = await sim.dial(PHONE)
    second, _ = await sim.dial(PHONE)
    assert first.status == "Incomplete"
    assert second.is_open
    assert second.session_id != first.session_id
    assert app.events[-1]["sessionId"] == first.session_id


async def test_hang_up_reports_incomplete(world: tuple[AtSimulator, App, SecondsClock]) -> None:
    """Cancelling on the handset sends no hop and reports Incomplete."""
    sim, app, _ = world
    session, _ = await sim.dial(PHONE)
    await session.hang_up()
    assert len(app.hops) == 1
    assert app.events[-1]["status"] == "Incomplete"


def test_segments_follow_gsm7_and_ucs2_rules() -> None:
    """160 GSM-7 chars are one segment, 161 two; one curly quote makes it UCS-2 (70/67)."""
    assert sms_segments("a" * 160) == ("GSM-7", 1)
    assert sms_segments("a" * 161) == ("GSM-7", 2)
    assert sms_segments("[" * 80) == ("GSM-7", 1)  # extension characters count twice
    assert sms_segments("[" * 81) == ("GSM-7", 2)
    assert sms_segments("\u2019" + "a" * 69) == ("UCS-2", 1)
    assert sms_segments("\u2019" + "a" * 70) == ("UCS-2", 2)


@pytest.fixture
async def api() -> AsyncIterator[tuple[AtSimulator, str]]:
    """The simulator's SMS API on loopback."""
    sim = AtSimulator(api_key="k")
    async with sim.running() as base:
        yield sim, base


async def _send(base: str, form: dict[str, str], key: str = "k") -> tuple[int, str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base}/version1/messaging",
            data=form,
            headers={"apiKey": key, "Accept": "application/json"},
        ) as response,
    ):
        body = await response.read()
        return response.status, response.headers["Content-Type"], body


async def test_send_answers_exactly_like_at(api: tuple[AtSimulator, str]) -> None:
    """201, Content-Type exactly application/json, SMSMessageData with one recipient each."""
    sim, base = api
    form = {"username": "sandbox", "to": f"{PHONE},+254711000002", "message": "hi"}
    status, content_type, body = await _send(base, form)
    assert (status, content_type) == (201, "application/json")
    data = json.loads(body)["SMSMessageData"]
    assert data["Message"] == "Sent to 2/2 Total Cost: KES 1.6000"
    assert [r["statusCode"] for r in data["Recipients"]] == [101, 101]
    assert data["Recipients"][0]["status"] == "Success"
    assert [m.text for m in sim.inbox(PHONE)] == ["hi"]


async def test_a_wrong_api_key_is_401_plain_text(api: tuple[AtSimulator, str]) -> None:
    """A bad apiKey header is refused the way AT refuses it, and nothing is sent."""
    sim, base = api
    status, content_type, _ = await _send(base, {"username": "sandbox", "to": PHONE}, key="bad")
    assert status == 401
    assert content_type.startswith("text/plain")
    assert sim.sent == []


async def test_magic_numbers_get_at_failure_codes(api: tuple[AtSimulator, str]) -> None:
    """A configured recipient status comes back with AT's name, messageId None and cost 0."""
    sim, base = api
    sim.recipient_status[PHONE] = 409
    form = {"username": "sandbox", "to": PHONE, "message": "hi"}
    _, _, body = await _send(base, form)
    (recipient,) = json.loads(body)["SMSMessageData"]["Recipients"]
    assert recipient == {
        "statusCode": 409,
        "number": PHONE,
        "status": "DoNotDisturbRejection",
        "cost": "0",
        "messageId": "None",
    }


async def test_the_simulator_mounts_under_a_prefix_for_the_sdk(
    aiohttp_client: Callable[..., Any],
) -> None:
    """Mounted as a sub-app (``/sim/africastalking``), the SDK's base URL is prefix + /version1."""
    sim = AtSimulator(api_key="k")
    app = web.Application()
    app.add_subapp("/sim/africastalking", sim.app)
    client = await aiohttp_client(app)
    base = str(client.make_url("/sim/africastalking/version1"))
    sent = await AfricasTalkingSdkSender("sandbox", "k", base_url=base).send(Msisdn(PHONE), "hi")
    inbox = await client.get("/sim/africastalking/sim/inbox", params={"phone": PHONE})
    assert [m["messageId"] for m in await inbox.json()] == [sent.provider_message_id]
    await sim.close()
