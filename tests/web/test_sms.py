import itertools
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.messages import text
from flows.ports import Language
from flows.sessions import MemorySessionStore
from flows.sms_commands import SmsCommands
from flows.testing import FakeCustomerServices, make_meter_number
from gateway.phone import Msisdn
from gateway.sim.africastalking import AtSimulator
from gateway.web.sms import sms_routes
from gateway.web.ussd import FollowUps

METER = make_meter_number("3701234567")
PHONE = Msisdn("+254711000001")
AiohttpClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
_IDS = itertools.count()
SERVICES = web.AppKey("services", FakeCustomerServices)
FOLLOW_UPS = web.AppKey("follow_ups", FollowUps)


class World:
    """The inbound-SMS route with a fake behind the port."""

    def __init__(self, client: TestClient[web.Request, web.Application]) -> None:
        self.client = client
        self.services = client.app[SERVICES]
        self.follow_ups = client.app[FOLLOW_UPS]

    async def text(self, body: str, *, sender: str = PHONE, message_id: str | None = None) -> int:
        """Post AT's incoming-message form and wait for the reply; the HTTP status."""
        form = {
            "from": sender,
            "to": "20880",
            "text": body,
            "id": message_id or f"id-{next(_IDS)}",
            "date": "2026-11-24 08:00:00",
            "networkCode": "63902",
        }
        response = await self.client.post("/sms/africastalking/inbound", data=form)
        await self.follow_ups.drain()
        return response.status

    def replies(self) -> list[str]:
        """SMS texts queued for the phone, oldest first."""
        return [body for to, body in self.services.sms if to == PHONE]


def _app() -> web.Application:
    services = FakeCustomerServices()
    services.add_meter(METER)
    follow_ups = FollowUps()
    app = web.Application()
    app[SERVICES] = services
    app[FOLLOW_UPS] = follow_ups
    app.add_routes(sms_routes(SmsCommands(services), follow_ups, MemorySessionStore()))
    return app


@pytest.fixture
async def world(aiohttp_client: AiohttpClient) -> World:
    """The inbound-SMS route over HTTP."""
    return World(await aiohttp_client(_app()))


async def test_buy_by_sms_replies_then_prompts(world: World) -> None:
    """BUY <meter> <amount> queues the reply, then requests the payment prompt, once."""
    assert await world.text(f"buy {METER} 500", message_id="m1") == 200
    (reply,) = world.replies()
    assert reply.startswith("You will get a payment prompt for KES 500")
    assert "16.8 kWh" in reply
    assert world.services.prompts == ["sms:m1"]
    calls = world.services.calls
    assert calls.index("send_sms") < calls.index("request_prompt")  # reply first, then prompt


async def test_a_negative_amount_by_sms_is_refused_and_charges_nothing(world: World) -> None:
    """``BUY <meter> -100`` gets the negative-amount answer; no purchase, no prompt."""
    assert await world.text(f"BUY {METER} -100", message_id="neg") == 200
    assert world.replies() == [text(Language.EN, "sms_amount_negative")]
    assert world.services.purchases == {}
    assert world.services.prompts == []


async def test_a_redelivered_sms_buys_once(world: World) -> None:
    """The same AT message id twice starts one purchase and sends one reply."""
    await world.text(f"BUY {METER} 500", message_id="dup")
    await world.text(f"BUY {METER} 500", message_id="dup")
    assert len(world.services.purchases) == 1
    assert len(world.replies()) == 1


@pytest.mark.parametrize("language", list(Language))
async def test_unknown_text_gets_the_help_in_the_phone_language(
    world: World, language: Language
) -> None:
    """Anything not understood is answered with the help text, in the phone's language."""
    world.services.languages[PHONE] = language
    await world.text("hello there")
    assert world.replies() == [text(language, "sms_help")]


async def test_lang_switches_and_confirms_in_the_new_language(world: World) -> None:
    """LANG SW stores Kiswahili and confirms in Kiswahili."""
    await world.text("lang sw")
    assert world.services.languages[PHONE] is Language.SW
    assert world.replies() == [text(Language.SW, "language_set")]


async def test_a_bad_sender_is_acknowledged_and_ignored(world: World) -> None:
    """A message from something that is not a phone number gets 200 and no reply."""
    assert await world.text("HELP", sender="not-a-number") == 200
    assert world.services.sms == []


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    fields=st.dictionaries(
        st.sampled_from(["from", "to", "text", "id", "date", "linkId", "networkCode"]),
        st.text(max_size=300),
    )
)
async def test_any_inbound_form_gets_no_5xx(world: World, fields: dict[str, str]) -> None:
    """Whatever AT (or anyone) posts, the route answers below 500 and nothing crashes."""
    response = await world.client.post("/sms/africastalking/inbound", data=fields)
    await world.follow_ups.drain()
    assert response.status < 500


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(body=st.text(max_size=400))
async def test_any_sms_text_gets_an_answer_within_two_segments(world: World, body: str) -> None:
    """Any text from a phone gets a reply (or the token SMS) of at most 306 characters."""
    before = len(world.services.sms)
    await world.text(body)
    new = world.services.sms[before:]
    assert len(new) <= 1
    assert all(len(reply) <= 306 for _, reply in new)


@pytest.fixture
async def sim_and_world(aiohttp_client: AiohttpClient) -> AsyncIterator[tuple[AtSimulator, World]]:
    """The AT simulator posting incoming messages to the route on loopback."""
    client = await aiohttp_client(_app())
    url = str(client.make_url("/sms/africastalking/inbound"))
    sim = AtSimulator(inbound_url=url)
    yield sim, World(client)
    await sim.close()


async def test_the_simulator_posts_inbound_sms_like_at(
    sim_and_world: tuple[AtSimulator, World],
) -> None:
    """An SMS a phone sends through the AT simulator reaches the command and is answered."""
    sim, world = sim_and_world
    message = await sim.send_inbound(PHONE, f"  {METER}*500 ")
    await world.follow_ups.drain()
    assert message.callback_status == 200
    assert world.services.prompts == [f"sms:{message.id}"]
