"""Daraja's Pull Transactions API, simulated, and ``DarajaProvider.find_payments`` over it.

The saga uses it for a push whose reference a crash lost and whose callback was lost too: the
payment is found by payer, exact amount and time, with the receipt as its reference.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.money import Money
from gateway.payments import ReconcilingProvider
from gateway.payments.base import CollectionRequest, PaymentState
from gateway.payments.daraja import DarajaProvider
from gateway.phone import Msisdn
from gateway.sim.daraja import CustomerAction, DarajaSimulator
from tests.payments.payfakes import CallbackReceiver, FakeClock

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]

PAYER = Msisdn("+254708374149")
OTHER = Msisdn("+254711000002")
KES_50 = Money(5000, "KES")
MINUTE = timedelta(minutes=1)


@pytest.fixture
async def pulled(
    aiohttp_server: ServerFactory,
    session: aiohttp.ClientSession,
    receiver: CallbackReceiver,
    clock: FakeClock,
) -> tuple[DarajaSimulator, DarajaProvider]:
    """A Daraja simulator (callbacks to ``receiver``) and the adapter pointed at it."""
    sim = DarajaSimulator(seed=11, prompt_timeout_s=None, shortcode="600638")
    server = await aiohttp_server(sim.app)
    provider = DarajaProvider(
        session,
        base_url=str(server.make_url("")).rstrip("/"),
        consumer_key=sim.consumer_key,
        consumer_secret=sim.consumer_secret,
        shortcode=sim.shortcode,
        passkey=sim.passkey,
        callback_url=receiver.url("/stk"),
        timeout_s=2.0,
        clock=clock,
    )
    return sim, provider


async def _push(provider: DarajaProvider, purchase: str, payer: Msisdn, amount: Money) -> None:
    await provider.request_collection(
        CollectionRequest(
            purchase_id=purchase,
            payer=payer,
            amount=amount,
            account_reference="37012345678",
            description="Electricity",
        )
    )


def test_daraja_provider_is_a_reconciling_provider(
    pulled: tuple[DarajaSimulator, DarajaProvider],
) -> None:
    """The saga recognises Daraja's adapter as able to list payments."""
    assert isinstance(pulled[1], ReconcilingProvider)


async def test_a_completed_push_is_found_by_payer_amount_and_time(
    pulled: tuple[DarajaSimulator, DarajaProvider],
) -> None:
    """Only the payer's payment of exactly that amount is listed, with its receipt and payer."""
    sim, provider = pulled
    await _push(provider, "p-1", PAYER, KES_50)
    await _push(provider, "p-2", OTHER, KES_50)
    await sim.settle()
    await _push(provider, "p-3", PAYER, Money(5100, "KES"))
    await sim.settle()
    now = datetime.now(UTC)
    [found] = await provider.find_payments(PAYER, KES_50, now - MINUTE, now + MINUTE)
    charge = next(c for c in sim.ledger() if c.msisdn == "254708374149" and c.amount_minor == 5000)
    assert found.state is PaymentState.SUCCEEDED
    assert (found.reference, found.receipt) == (charge.receipt, charge.receipt)
    assert (found.amount, found.payer) == (KES_50, PAYER)


async def test_a_payment_outside_the_window_is_not_listed(
    pulled: tuple[DarajaSimulator, DarajaProvider],
) -> None:
    """A window that ends before the payment lists nothing."""
    sim, provider = pulled
    await _push(provider, "p-1", PAYER, KES_50)
    await sim.settle()
    assert len(sim.ledger()) == 1
    now = datetime.now(UTC)
    assert await provider.find_payments(PAYER, KES_50, now - 10 * MINUTE, now - 2 * MINUTE) == []


async def test_a_refused_push_is_not_a_payment(
    pulled: tuple[DarajaSimulator, DarajaProvider],
) -> None:
    """A prompt the customer cancelled took no money and is not listed."""
    sim, provider = pulled
    sim.set_customer("254708374149", CustomerAction.CANCEL)
    await _push(provider, "p-1", PAYER, KES_50)
    await sim.settle()
    now = datetime.now(UTC)
    assert sim.ledger() == []
    assert await provider.find_payments(PAYER, KES_50, now - MINUTE, now + MINUTE) == []


async def test_a_payment_for_another_account_is_not_listed(
    pulled: tuple[DarajaSimulator, DarajaProvider],
) -> None:
    """Asked for one meter's payments, a payment made for another account is left out."""
    sim, provider = pulled
    await _push(provider, "p-1", PAYER, KES_50)
    await sim.settle()
    now = datetime.now(UTC)
    window = (now - MINUTE, now + MINUTE)
    assert (
        len(await provider.find_payments(PAYER, KES_50, *window, account_reference="37012345678"))
        == 1
    )
    assert (
        await provider.find_payments(PAYER, KES_50, *window, account_reference="04000000010") == []
    )


async def test_lookups_in_the_same_minutes_share_one_pull(
    pulled: tuple[DarajaSimulator, DarajaProvider],
) -> None:
    """Three payers looked up over the same window: one Pull request answers all three."""
    sim, provider = pulled
    payers = [PAYER, OTHER, Msisdn("+254711000003")]
    for n, payer in enumerate(payers):
        await _push(provider, f"p-{n}", payer, KES_50)
    await sim.settle()
    now = datetime.now(UTC)  # the window ends now: its minutes do not depend on when we ask
    for payer in payers:
        [found] = await provider.find_payments(payer, KES_50, now - MINUTE, now)
        assert found.payer == payer
    assert sim.pull_requests == 1


async def test_a_minute_still_open_is_pulled_again_a_minute_later(
    pulled: tuple[DarajaSimulator, DarajaProvider], clock: FakeClock
) -> None:
    """A payment completed after its minute was pulled is found once that minute is pulled again."""
    sim, provider = pulled
    now = datetime.now(UTC)
    if now.second >= 58:  # all three lookups fall in one minute: a new minute would be pulled
        await asyncio.sleep(60.5 - now.second - now.microsecond / 1e6)
        now = datetime.now(UTC)
    window = (now - MINUTE, now + MINUTE)
    assert await provider.find_payments(PAYER, KES_50, *window) == []
    await _push(provider, "p-1", PAYER, KES_50)
    await sim.settle()
    assert await provider.find_payments(PAYER, KES_50, *window) == []  # shared, not re-pulled
    assert sim.pull_requests == 1
    clock.advance(61)
    assert len(await provider.find_payments(PAYER, KES_50, *window)) == 1
    assert sim.pull_requests == 2


async def test_settled_minutes_are_never_pulled_again(
    pulled: tuple[DarajaSimulator, DarajaProvider], clock: FakeClock
) -> None:
    """Minutes that ended well before they were pulled are kept; minutes to come are not asked."""
    sim, provider = pulled
    now = datetime.now(UTC)
    past = (now - 10 * MINUTE, now - 3 * MINUTE)
    assert await provider.find_payments(PAYER, KES_50, *past) == []
    clock.advance(3600)
    assert await provider.find_payments(OTHER, KES_50, *past) == []
    assert sim.pull_requests == 1
    future = (now + 5 * MINUTE, now + 10 * MINUTE)
    assert await provider.find_payments(PAYER, KES_50, *future) == []
    assert sim.pull_requests == 1
