"""The USSD route over HTTP with a fake behind the port, for the journey tests."""

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web
from aiohttp.test_utils import TestClient

from flows.engine import UssdEngine
from flows.testing import FakeCustomerServices, UssdTester, make_meter_number
from gateway.web.ussd import FollowUps
from tests.support.clock import SecondsClock

FakeClock = SecondsClock  # the suite's one fake clock (tests/support/clock.py)

PHONE = "+254711000001"
METER = make_meter_number("3701234567")
METER_13 = make_meter_number("012345678901")
UNKNOWN_METER = make_meter_number("9999999999")

AiohttpClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


@dataclass
class UssdWorld:
    """The gateway's USSD face over HTTP with a fake behind the port."""

    services: FakeCustomerServices
    engine: UssdEngine
    follow_ups: FollowUps
    client: TestClient[web.Request, web.Application]
    clock: FakeClock

    async def post(self, form: Mapping[str, str]) -> tuple[int, str]:
        """Post one AT USSD form; status and body."""
        response = await self.client.post("/ussd/africastalking", data=dict(form))
        return response.status, await response.text()

    def phone(self, number: str = PHONE) -> UssdTester:
        """A tester phone speaking AT's format to the route."""
        return UssdTester(self.post, phone=number)

    async def session_event(self, session_id: str, status: str) -> int:
        """Post AT's end-of-session notification; the HTTP status."""
        response = await self.client.post(
            "/ussd/africastalking/events",
            data={"sessionId": session_id, "status": status, "phoneNumber": PHONE},
        )
        return response.status
