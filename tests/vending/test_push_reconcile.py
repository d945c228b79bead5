"""A push of unknown outcome (crash before its reference was stored) whose callback is lost too.

Nothing of ours names the payment, so the saga asks the provider's own list of payments (Daraja's
Pull Transactions) for the purchase's payer and exact amount around the push, once the prompt's
lifetime has passed: exactly one unclaimed payment vends; several wait for an operator; none
lets the purchase expire.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from gateway.ledger import PurchaseState, open_sqlite_ledger
from gateway.money import Money
from gateway.payments import (
    CollectionRequest,
    CollectionStarted,
    PaymentState,
    PaymentStatus,
    ProviderReference,
    ProviderUnavailable,
)
from gateway.phone import Msisdn
from gateway.sts import LocalTokenEngine
from gateway.vending import UNKNOWN_COLLECTION_AMBIGUOUS
from tests.vending.vending_support import (
    PHONE,
    VENDING_KEY,
    FakeClock,
    FakeProvider,
    World,
    build_vending,
    make_drn,
    seed,
)

AMOUNT = Money(11600, "KES")


class ProcessDied(BaseException):
    """Raised where the real process would have been killed."""


class PullingProvider(FakeProvider):
    """The fake provider plus a list of completed payments it can be asked for (Pull)."""

    def __init__(self) -> None:
        super().__init__()
        self.completed: list[tuple[datetime, PaymentStatus]] = []
        self.lookups = 0
        self.accounts: list[str | None] = []
        self.unavailable_lookups = 0

    def pay(
        self, at: datetime, receipt: str, *, payer: Msisdn = PHONE, amount: Money = AMOUNT
    ) -> None:
        """Record a completed payment as the provider's own list shows it."""
        self.completed.append(
            (
                at,
                PaymentStatus(
                    provider=self.name,
                    reference=ProviderReference(receipt),
                    state=PaymentState.SUCCEEDED,
                    amount=amount,
                    payer=payer,
                    receipt=receipt,
                ),
            )
        )

    async def find_payments(
        self,
        payer: Msisdn,
        amount: Money,
        since: datetime,
        until: datetime,
        *,
        account_reference: str | None = None,
    ) -> list[PaymentStatus]:
        """The recorded payments of ``payer`` and exactly ``amount`` in the window."""
        self.lookups += 1
        self.accounts.append(account_reference)
        if self.unavailable_lookups:
            self.unavailable_lookups -= 1
            raise ProviderUnavailable("fake outage", provider=self.name)
        return [
            status
            for at, status in self.completed
            if since <= at <= until and status.payer == payer and status.amount == amount
        ]


@pytest.fixture
async def pulling(tmp_path: Path) -> AsyncIterator[World]:
    """A saga on a fresh ledger whose provider can list its payments."""
    clock = FakeClock()
    provider = PullingProvider()
    drns = [make_drn(i) for i in range(1, 4)]
    async with open_sqlite_ledger(tmp_path / "ledger.db", clock=clock) as ledger:
        await seed(ledger, drns)
        vending = build_vending(ledger, provider, clock)
        yield World(ledger, vending, provider, clock, LocalTokenEngine([VENDING_KEY]), drns)


def _provider(world: World) -> PullingProvider:
    assert isinstance(world.provider, PullingProvider)
    return world.provider


async def _pushed_then_crashed(world: World, key: str = "k1") -> str:
    """A purchase whose push the provider accepted as the process died (callback lost)."""
    purchase = await world.vending.start_purchase(
        channel="ussd", phone=PHONE, meter=world.drns[0], amount=AMOUNT, idempotency_key=key
    )
    provider = world.provider
    accept = provider.request_collection

    async def accept_then_die(request: CollectionRequest) -> CollectionStarted:
        await accept(request)
        raise ProcessDied

    provider.request_collection = accept_then_die  # type: ignore[method-assign]
    with contextlib.suppress(ProcessDied):
        await world.vending.request_payment(purchase.purchase_id)
    provider.request_collection = accept  # type: ignore[method-assign]
    return purchase.purchase_id


async def test_the_one_payment_found_by_payer_and_amount_vends(pulling: World) -> None:
    """After the prompt's lifetime, the single matching payment pays and vends the purchase."""
    purchase_id = await _pushed_then_crashed(pulling)
    _provider(pulling).pay(pulling.clock() + timedelta(seconds=20), "RKTQDM7W6S")
    pulling.clock.advance(120)
    purchase = await pulling.vending.check_payment(purchase_id)
    assert purchase.state in {PurchaseState.VENDED, PurchaseState.DELIVERED}
    assert purchase.provider_reference == "RKTQDM7W6S"
    vend = await pulling.ledger.get_vend(purchase_id)
    assert vend is not None
    payment = await pulling.ledger.get_payment(pulling.provider.name, "RKTQDM7W6S")
    assert payment is not None
    assert payment.purchase_id == purchase_id
    assert len(pulling.provider.requests) == 1
    assert _provider(pulling).accounts == [pulling.drns[0]]


async def test_no_lookup_before_the_prompt_could_have_been_answered(pulling: World) -> None:
    """Within the prompt's lifetime the saga waits for the callback and asks nothing."""
    purchase_id = await _pushed_then_crashed(pulling)
    _provider(pulling).pay(pulling.clock(), "RKTQDM7W6S")
    pulling.clock.advance(30)
    purchase = await pulling.vending.check_payment(purchase_id)
    assert purchase.state is PurchaseState.CREATED
    assert _provider(pulling).lookups == 0


async def test_two_unclaimed_payments_wait_for_an_operator(pulling: World) -> None:
    """Two candidates: nothing vends, an ambiguity event is logged, it does not expire."""
    purchase_id = await _pushed_then_crashed(pulling)
    now = pulling.clock()
    _provider(pulling).pay(now, "RKTQDM7W6S")
    _provider(pulling).pay(now, "RKTQDM7W6T")
    pulling.clock.advance(120)
    waiting = await pulling.vending.check_payment(purchase_id)
    # Looked up again after ambiguous_recheck_s (300 s), not at the 30 s check interval.
    assert waiting.next_check_at == pulling.clock() + timedelta(seconds=300)
    pulling.clock.advance(3600)  # long past the payment deadline
    purchase = await pulling.vending.check_payment(purchase_id)
    assert purchase.state is PurchaseState.CREATED
    assert await pulling.ledger.get_vend(purchase_id) is None
    kinds = [e.kind for e in await pulling.ledger.timeline(purchase_id)]
    assert kinds.count(UNKNOWN_COLLECTION_AMBIGUOUS) == 1


async def test_a_payment_already_tied_to_another_purchase_is_not_taken(pulling: World) -> None:
    """The receipt of the payer's earlier, paid purchase never pays this one; it expires."""
    earlier = await pulling.vending.start_purchase(
        channel="ussd", phone=PHONE, meter=pulling.drns[1], amount=AMOUNT, idempotency_key="k0"
    )
    await pulling.vending.request_payment(earlier.purchase_id)
    reference = pulling.provider.reference_for(earlier.purchase_id)
    pulling.provider.settle(reference, amount=AMOUNT, receipt="RKTQDM7W6S")
    paid = await pulling.vending.confirm(earlier.purchase_id)
    assert paid.state in {PurchaseState.VENDED, PurchaseState.DELIVERED}
    purchase_id = await _pushed_then_crashed(pulling)
    _provider(pulling).pay(pulling.clock(), "RKTQDM7W6S")  # the earlier purchase's money
    pulling.clock.advance(700)  # past the payment deadline (600 s)
    purchase = await pulling.vending.check_payment(purchase_id)
    assert purchase.state is PurchaseState.EXPIRED
    assert await pulling.ledger.get_vend(purchase_id) is None


async def test_nothing_found_expires_at_the_deadline(pulling: World) -> None:
    """No payment in the provider's list: the purchase expires (no money moved)."""
    purchase_id = await _pushed_then_crashed(pulling)
    pulling.clock.advance(120)
    assert (await pulling.vending.check_payment(purchase_id)).state is PurchaseState.CREATED
    pulling.clock.advance(600)
    assert (await pulling.vending.check_payment(purchase_id)).state is PurchaseState.EXPIRED
    assert _provider(pulling).lookups == 2


async def test_a_failed_lookup_never_expires_the_purchase(pulling: World) -> None:
    """The provider could not answer: the purchase stays CREATED past its deadline, asked again."""
    purchase_id = await _pushed_then_crashed(pulling)
    _provider(pulling).unavailable_lookups = 1
    pulling.clock.advance(700)
    purchase = await pulling.vending.check_payment(purchase_id)
    assert purchase.state is PurchaseState.CREATED
    assert purchase.next_check_at is not None
    assert purchase.next_check_at > pulling.clock()
