from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from flows.engine import UssdEngine
from flows.journeys import build_screens
from flows.sessions import MemorySessionStore
from flows.sms_commands import SmsCommands
from flows.testing import FakeCustomerServices, make_meter_number
from gateway.phone import Msisdn
from gateway.sim.africastalking import AtSimulator
from gateway.sim.phone import PhoneSettings, TerminalPhone
from gateway.sms.africastalking import AfricasTalkingHttpSender
from gateway.web.sms import sms_routes
from gateway.web.ussd import FollowUps, ussd_routes

METER = make_meter_number("3701234567")
NUMBER = "+254711000001"


class SendingServices(FakeCustomerServices):
    """The fake, but SMS replies really go out through the AT simulator."""

    sender: AfricasTalkingHttpSender

    async def send_sms(self, phone: Msisdn, text: str) -> None:
        """Send through AT (the simulator) so the phone's inbox gets it."""
        await super().send_sms(phone, text)
        await self.sender.send(phone, text)


@pytest.fixture
async def gateway_and_sim() -> AsyncIterator[tuple[str, str, FakeCustomerServices, FollowUps]]:
    """A gateway (USSD + SMS routes) and the AT simulator, both on loopback."""
    services = SendingServices()
    services.add_meter(METER)
    store = MemorySessionStore()
    follow_ups = FollowUps()
    app = web.Application()
    app.add_routes(ussd_routes(UssdEngine(services, store, build_screens()), follow_ups))
    app.add_routes(sms_routes(SmsCommands(services), follow_ups, store))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    gateway = f"http://127.0.0.1:{runner.addresses[0][1]}"
    sim = AtSimulator(api_key="k", inbound_url=f"{gateway}/sms/africastalking/inbound")
    async with sim.running() as sim_url:
        services.sender = AfricasTalkingHttpSender.create(
            "sandbox", "k", base_url=f"{sim_url}/version1"
        )
        yield gateway, sim_url, services, follow_ups
        await follow_ups.drain()
        await services.sender.close()
    await follow_ups.close()
    await runner.cleanup()


async def test_the_terminal_phone_buys_and_reads_its_inbox(
    gateway_and_sim: tuple[str, str, FakeCustomerServices, FollowUps],
) -> None:
    """Scripted keypresses dial, buy, text HELP and read the reply from the inbox."""
    gateway, sim_url, services, follow_ups = gateway_and_sim
    lines = iter(["dial", "1", METER, "500", "1", "sms HELP", "inbox", "quit"])
    output: list[str] = []

    async def read(prompt: str) -> str | None:
        line = next(lines, None)
        if line == "inbox":
            await follow_ups.drain()  # the gateway answers SMS after its 200: let it finish
        return line

    phone = TerminalPhone(
        PhoneSettings(gateway_url=gateway, sim_url=sim_url, number=NUMBER), read, output.append
    )
    assert await phone.run() == 0
    transcript = "\n".join(output)
    assert "1 Buy electricity" in transcript
    assert "You will get a payment prompt for KES 500" in transcript
    assert "(session ended)" in transcript
    assert "To buy electricity send BUY" in transcript  # the HELP reply, read from the inbox
    assert len(services.purchases) == 1


async def test_an_unreachable_gateway_exits_non_zero() -> None:
    """Dialling a gateway that is not running ends with status 1 and a clear message."""
    lines = iter(["inbox"])
    output: list[str] = []

    async def read(prompt: str) -> str | None:
        return next(lines, None)

    settings = PhoneSettings(gateway_url="http://127.0.0.1:9", number=NUMBER)
    assert await TerminalPhone(settings, read, output.append).run() == 1
    assert "cannot reach" in output[-1]
