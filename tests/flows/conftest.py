import pytest
from aiohttp import web

from flows.engine import UssdEngine
from flows.journeys import build_screens
from flows.sessions import MemorySessionStore
from flows.testing import FakeCustomerServices
from gateway.web.ussd import FollowUps, ussd_routes
from tests.flows.journey_world import METER, METER_13, AiohttpClient, FakeClock, UssdWorld


@pytest.fixture
def services() -> FakeCustomerServices:
    """A fake with two registered meters."""
    fake = FakeCustomerServices()
    fake.add_meter(METER, name="J*** O***", area="Kibera")
    fake.add_meter(METER_13, name="A*** W***", area="Westlands", min_minor=10000)
    return fake


@pytest.fixture
async def world(services: FakeCustomerServices, aiohttp_client: AiohttpClient) -> UssdWorld:
    """The USSD route over HTTP with a fake clock and in-memory sessions."""
    clock = FakeClock(1_000_000.0)
    engine = UssdEngine(
        services, MemorySessionStore(clock), build_screens(), resume_window_s=120, clock=clock
    )
    follow_ups = FollowUps()
    app = web.Application()
    app.add_routes(ussd_routes(engine, follow_ups))
    client = await aiohttp_client(app)
    return UssdWorld(services, engine, follow_ups, client, clock)
