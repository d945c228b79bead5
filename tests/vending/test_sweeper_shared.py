"""Background work shared among instances: two sweepers on one PostgreSQL ledger split the work.

Each "instance" here is what a worker process holds: its own ledger pool on the one schema, its
own saga and its own MTN MoMo adapter, all talking to one MoMo simulator on loopback, which
counts the status queries it answers per reference. A round of both sweepers at once asks about
each due purchase exactly once, and vends each paid-not-vended purchase once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.ledger import Ledger, PurchaseState, open_postgres_ledger
from gateway.money import Money
from gateway.payments.momo import MomoProvider
from gateway.phone import Msisdn
from gateway.sim.momo import MomoSimulator, PayerAction
from gateway.sts import LocalTokenEngine
from gateway.sweeper import Sweeper
from gateway.vending import SagaPolicy, Vending
from tests.ledger.ledger_support import POSTGRES_URL
from tests.vending.vending_support import VENDING_KEY, FakeClock, make_drn, seed

pytestmark = pytest.mark.postgres

PURCHASES = 24
STATUS_PATH = "/collection/v1_0/requesttopay/"


class CountingMomo:
    """The MoMo simulator on loopback, counting the status queries it answers per reference."""

    def __init__(self) -> None:
        self.sim = MomoSimulator(currency="KES")
        self.status_queries: Counter[str] = Counter()
        self.url = ""

        @web.middleware
        async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.method == "GET" and request.path.startswith(STATUS_PATH):
                self.status_queries[request.path.removeprefix(STATUS_PATH)] += 1
            return await handler(request)

        self.sim.app.middlewares.append(count)

    def provider(self, session: aiohttp.ClientSession) -> MomoProvider:
        """An adapter of one instance."""
        return MomoProvider(
            session,
            base_url=self.url,
            subscription_key=self.sim.subscription_key,
            api_user=self.sim.api_user,
            api_key=self.sim.api_key,
            target_environment=self.sim.target_environment,
            currency="KES",
            callback_url="http://127.0.0.1:9/unused",  # the sweeper's queries are the point
        )


@contextlib.asynccontextmanager
async def instances(
    schema: str, clock: FakeClock, momo: CountingMomo, count: int
) -> AsyncIterator[list[tuple[Ledger, Vending]]]:
    """``count`` instances on one schema: each its own pool, saga and MoMo adapter."""
    async with contextlib.AsyncExitStack() as stack:
        runner = web.AppRunner(momo.sim.app, access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        momo.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        made: list[tuple[Ledger, Vending]] = []
        for _ in range(count):
            ledger = await stack.enter_async_context(
                open_postgres_ledger(POSTGRES_URL, clock=clock, schema=schema, max_size=4)
            )
            session = await stack.enter_async_context(aiohttp.ClientSession())
            vending = Vending(
                ledger=ledger,
                engine=LocalTokenEngine([VENDING_KEY]),
                providers={"momo": momo.provider(session)},
                default_provider="momo",
                clock=clock,
                policy=SagaPolicy(first_check_after_s=20, check_interval_s=30),
            )
            made.append((ledger, vending))
        yield made


def sweeper_of(vending: Vending, clock: FakeClock) -> Sweeper:
    """An instance's sweeper (no outbox: the SMS are not the point here)."""
    return Sweeper(vending=vending, outbox=None, clock=clock, check_concurrency=8)


async def test_two_sweepers_ask_about_each_due_purchase_once_per_round(schema: str) -> None:
    """N due purchases, two sweepers in one round at once: N status queries, one per purchase."""
    clock = FakeClock()
    momo = CountingMomo()
    drns = [make_drn(300 + i) for i in range(4)]
    async with instances(schema, clock, momo, 2) as both:
        (ledger, first), (_, second) = both
        await seed(ledger, drns)
        phones = [Msisdn(f"+2547{24000000 + i:08d}") for i in range(PURCHASES)]
        for phone in phones:
            momo.sim.set_payer(phone, PayerAction.PENDING)  # they never answer the prompt
        references: set[str] = set()
        for index, phone in enumerate(phones):
            purchase = await first.start_purchase(
                channel="ussd",
                phone=phone,
                meter=drns[index % len(drns)],
                amount=Money(11600, "KES"),
                idempotency_key=f"k{index}",
            )
            purchase = await first.request_payment(purchase.purchase_id)
            assert purchase.state is PurchaseState.AWAITING_PAYMENT
            assert purchase.provider_reference is not None
            references.add(purchase.provider_reference)
        assert momo.status_queries == Counter()

        sweepers = [sweeper_of(first, clock), sweeper_of(second, clock)]
        for round_ in (1, 2):
            clock.advance(31)  # every purchase's check is due
            reports = await asyncio.gather(*(s.sweep_once() for s in sweepers))
            assert sum(report.checked for report in reports) == PURCHASES
            assert set(momo.status_queries) == references
            assert set(momo.status_queries.values()) == {round_}  # once per purchase per round


async def test_two_checkers_running_together_never_query_one_purchase_twice(
    schema: str,
) -> None:
    """Both continuous checkers at once over the due purchases: each queried exactly once."""
    clock = FakeClock()
    momo = CountingMomo()
    drns = [make_drn(400 + i) for i in range(3)]
    async with instances(schema, clock, momo, 2) as both:
        (ledger, first), (_, second) = both
        await seed(ledger, drns)
        references: set[str] = set()
        for index in range(PURCHASES):
            phone = Msisdn(f"+2547{25000000 + index:08d}")
            momo.sim.set_payer(phone, PayerAction.PENDING)
            purchase = await first.start_purchase(
                channel="ussd",
                phone=phone,
                meter=drns[index % len(drns)],
                amount=Money(11600, "KES"),
                idempotency_key=f"c{index}",
            )
            purchase = await first.request_payment(purchase.purchase_id)
            assert purchase.provider_reference is not None
            references.add(purchase.provider_reference)
        clock.advance(21)
        stop = asyncio.Event()
        checkers = [
            asyncio.create_task(
                Sweeper(
                    vending=vending,
                    outbox=None,
                    clock=clock,
                    check_concurrency=4,
                    check_poll_s=0.02,
                ).check_continuously(stop)
            )
            for vending in (first, second)
        ]
        async with asyncio.timeout(30):
            while set(momo.status_queries) != references:  # noqa: ASYNC110 - a count to reach
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # room for a duplicate to show, were claims not exclusive
        stop.set()
        await asyncio.gather(*checkers)
        # Each check scheduled the next one (which ended its lease): none is due now.
        assert await ledger.due_for_check(clock()) == []
    assert set(momo.status_queries.values()) == {1}
