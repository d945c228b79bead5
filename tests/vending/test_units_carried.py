"""docs/architecture.md invariant 8 end to end, over the whole STS units range (issue 16, point 1).

The customer confirms a quote on the USSD screen, pays, and gets a token by SMS: the units on
the confirm screen, the units the ledger records, the units in the SMS and the units the meter
credits are one number, and that number never costs more than the customer paid. Above 16,383
units a token carries only every 10th, 100th or 1000th unit, so this is where they used to differ.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flows.engine import UssdEngine
from flows.journeys import build_screens
from flows.sessions import MemorySessionStore
from flows.testing import UssdTester
from gateway.customer_services import SagaCustomerServices
from gateway.ledger import MeterNumber, PurchaseDraft, new_purchase_id
from gateway.money import Money
from gateway.phone import Msisdn
from gateway.sts import CreditAdded, MeterEmulator, Verdict
from gateway.tariff import Tariff
from gateway.web.ussd import FollowUps, ussd_routes
from tests.vending.vending_support import VENDING_KEY, World, make_drn, meter_record, profile_of

AiohttpClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
PHONE = "+254711000001"
#: KES 0.01 per kWh + 16 % VAT: KES 1 buys 86.2 kWh, KES 21,110 about 1.82 million kWh, so the
#: purchase range spans every exponent of the STS amount (steps of 1, 10, 100 and 1000 units).
BULK = Tariff(
    tariff_id="bulk",
    name="Bulk",
    currency="KES",
    price_per_kwh_minor=1,
    vat_basis_points=1600,
    min_purchase_minor=100,
    max_purchase_minor=2_111_000,
)
METER = make_drn(77)
KWH = re.compile(r"(\d+)\.(\d) kWh")


def _units(text: str) -> int:
    """The tenths of a kWh a screen or an SMS states (exactly one ``N.N kWh`` in it)."""
    (match,) = KWH.findall(text.replace(",", ""))
    return int(match[0]) * 10 + int(match[1])


def _cost_minor(units: int) -> Decimal:
    """What ``units`` cost under ``BULK``, VAT included, in minor units (exact)."""
    return (
        Decimal(units)
        * BULK.price_per_kwh_minor
        / 10
        * (1 + Decimal(BULK.vat_basis_points) / 10_000)
    )


@pytest.fixture
async def ussd(world: World, aiohttp_client: AiohttpClient) -> UssdTester:
    """The real USSD route over the real saga, one meter on the bulk tariff."""
    await world.ledger.put_tariff(BULK)
    await world.ledger.put_meter(meter_record(METER, tariff_id=BULK.tariff_id))
    follow_ups = FollowUps()
    engine = UssdEngine(
        SagaCustomerServices(world.vending, world.ledger), MemorySessionStore(), build_screens()
    )
    app = web.Application()
    app.add_routes(ussd_routes(engine, follow_ups))
    client = await aiohttp_client(app)

    async def post(form: Mapping[str, str]) -> tuple[int, str]:
        response = await client.post("/ussd/africastalking", data=form)
        body = await response.text()
        await follow_ups.drain()
        return response.status, body

    return UssdTester(post, phone=PHONE)


@settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None, max_examples=30
)
@given(shillings=st.integers(1, 21_110))
@example(shillings=1)  # 862 units: every amount encodable
@example(shillings=19)  # 16,379 units paid for: the last exponent-0 amounts
@example(shillings=20)  # 17,241 units paid for: steps of 10
@example(shillings=35)  # 30,172 units paid for, as issue 16's KES 35,000 at KES 10/kWh
@example(shillings=210)  # 181,034 units: just above the 180,224 boundary, steps of 100
@example(shillings=21_110)  # 18,198,275 units: steps of 1000 near the maximum
async def test_screen_ledger_sms_and_meter_state_one_number_never_more_than_paid(
    world: World, ussd: UssdTester, shillings: int
) -> None:
    """Quote screen == ledger == SMS == meter credit, and it costs no more than was paid."""
    await ussd.dial()
    await ussd.answer("1")
    await ussd.answer(METER)
    confirm = await ussd.answer(str(shillings))
    screen_units = _units(confirm)
    done = await ussd.answer("1")
    assert "payment prompt" in done

    request = world.provider.requests[-1]
    paid = Money(shillings * 100, "KES")
    assert request.amount == paid
    reference = world.provider.reference_for(request.purchase_id)
    world.provider.settle(reference, amount=paid, payer=Msisdn(PHONE))
    await world.vending.on_payment_notice(world.provider.notice(reference))
    purchase = await world.ledger.get_purchase(request.purchase_id)

    vend = await world.ledger.get_vend(purchase.purchase_id)
    assert vend is not None
    (message,) = await world.ledger.outbox_for(purchase.purchase_id)
    meter = MeterEmulator.for_profile(profile_of(meter_record(METER)), VENDING_KEY)
    response = meter.enter(vend.token)
    assert response.verdict is Verdict.ACCEPTED
    assert isinstance(response.change, CreditAdded)

    assert screen_units == purchase.units == vend.units == _units(message.body)
    assert response.change.amount == vend.units
    assert _cost_minor(vend.units) <= paid.amount_minor


@pytest.mark.usefixtures("ussd")  # registers the bulk meter
async def test_a_purchase_quoted_before_the_fix_is_vended_what_its_token_carries(
    world: World,
) -> None:
    """A purchase recorded with 30,172 units (quoted before the fix) is vended 30,164.

    30,164 is the largest amount a token carries below it: the vend, the SMS and the meter
    agree, and the meter never gets more than was paid for.
    """
    paid = Money(35 * 100, "KES")
    purchase = await world.ledger.open_purchase(
        PurchaseDraft(
            purchase_id=new_purchase_id(),
            channel="ussd",
            phone=Msisdn(PHONE),
            meter=MeterNumber(METER),
            amount=paid,
            units=30_172,
            tariff_id=BULK.tariff_id,
            idempotency_key="before-issue-16",
            provider=world.provider.name,
        ),
        actor="ussd",
    )
    await world.vending.request_payment(purchase.purchase_id)
    reference = world.provider.reference_for(purchase.purchase_id)
    world.provider.settle(reference, amount=paid, payer=Msisdn(PHONE))
    await world.vending.on_payment_notice(world.provider.notice(reference))

    vend = await world.ledger.get_vend(purchase.purchase_id)
    assert vend is not None
    (message,) = await world.ledger.outbox_for(purchase.purchase_id)
    response = MeterEmulator.for_profile(profile_of(meter_record(METER)), VENDING_KEY).enter(
        vend.token
    )
    assert isinstance(response.change, CreditAdded)
    carried = 16_384 + (30_172 - 16_384) // 10 * 10  # docs/sts.md §3.1: steps of 10 from 16,384
    assert vend.units == _units(message.body) == response.change.amount == carried
