"""The process the crash test kills: a saga on a file database while confirmations stream in.

Run as ``python -m tests.vending.crash_child DB RUN`` from the repository root. It sweeps once
(recovery), prints ``ready``, then opens purchases ten at a time, each requested, claimed paid by a
callback and confirmed; it prints one line per finished purchase until it is killed. The provider
is deterministic and needs no state (the amount is encoded in the reference), so a restarted
process or the parent's sweep gets the same answers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

import structlog

from gateway.ledger import Ledger, open_sqlite_ledger
from gateway.money import Money
from gateway.payments import (
    CallbackAck,
    CollectionRequest,
    CollectionStarted,
    PaymentNotice,
    PaymentState,
    PaymentStatus,
    ProviderReference,
)
from gateway.sms.outbox import OutboxWorker
from gateway.sts import LocalTokenEngine
from gateway.sweeper import Sweeper
from gateway.vending import SagaPolicy, Vending
from tests.vending.vending_support import (
    PHONE,
    TARIFF,
    VENDING_KEY,
    FakeSender,
    make_drn,
    meter_record,
)

DRNS = [make_drn(900 + i) for i in range(4)]
AMOUNTS = [Money(11600, "KES"), Money(23200, "KES"), Money(5800, "KES")]


class StatelessProvider:
    """Every collection succeeds with the amount requested, encoded in the reference."""

    idempotent_requests = False  # the saga guards unknown outcomes (as for STK)

    name = "fakepay"

    async def request_collection(self, request: CollectionRequest) -> CollectionStarted:
        """Accept; the reference carries the purchase and the amount."""
        reference = (
            f"REF-{request.purchase_id}-{request.amount.amount_minor}-{request.amount.currency}"
        )
        return CollectionStarted(provider=self.name, reference=ProviderReference(reference))

    def parse_callback(self, body: bytes, headers: Mapping[str, str]) -> PaymentNotice:
        """Not used."""
        raise NotImplementedError

    async def query_status(self, reference: ProviderReference) -> PaymentStatus:
        """Succeeded, for the amount in the reference, paid by ``PHONE``."""
        _, _, minor, currency = reference.split("-")
        return PaymentStatus(
            provider=self.name,
            reference=reference,
            state=PaymentState.SUCCEEDED,
            amount=Money(int(minor), currency),
            payer=PHONE,
            receipt="R" + reference[4:12],
        )

    def acknowledgement(self) -> CallbackAck:
        """An empty 200."""
        return CallbackAck()


def build(ledger: Ledger) -> tuple[Vending, Sweeper]:
    """The saga and sweeper the child and the parent both use."""
    vending = Vending(
        ledger=ledger,
        engine=LocalTokenEngine([VENDING_KEY]),
        providers={"fakepay": StatelessProvider()},
        default_provider="fakepay",
        policy=SagaPolicy(first_check_after_s=0),
    )
    outbox = OutboxWorker(ledger=ledger, sender=FakeSender(), jitter=lambda: 0.0)
    return vending, Sweeper(vending=vending, outbox=outbox)


async def seed(ledger: Ledger) -> None:
    """Register the tariff and meters (idempotent: last TIDs are kept)."""
    await ledger.put_tariff(TARIFF)
    for drn in DRNS:
        await ledger.put_meter(meter_record(drn))


async def buy(vending: Vending, run: str, index: int) -> None:
    """One purchase: start, request, callback claim (confirmed by status), vend."""
    purchase = await vending.start_purchase(
        channel="ussd",
        phone=PHONE,
        meter=DRNS[index % len(DRNS)],
        amount=AMOUNTS[index % len(AMOUNTS)],
        idempotency_key=f"{run}-{index}",
    )
    purchase = await vending.request_payment(purchase.purchase_id)
    assert purchase.provider_reference is not None
    notice = PaymentNotice(
        provider="fakepay",
        reference=ProviderReference(purchase.provider_reference),
        claimed_state=PaymentState.SUCCEEDED,
        raw=purchase.provider_reference.encode(),
    )
    await vending.on_payment_notice(notice)
    print("vended", purchase.purchase_id, flush=True)  # noqa: T201 - the parent reads progress


async def main(path: Path, run: str) -> None:
    """Recover, then stream purchases until killed."""
    async with open_sqlite_ledger(path) as ledger:
        await seed(ledger)
        vending, sweeper = build(ledger)
        await sweeper.sweep_once()
        print("ready", flush=True)  # noqa: T201
        counter = itertools.count()
        while True:
            await asyncio.gather(*(buy(vending, run, next(counter)) for _ in range(10)))
            await sweeper.sweep_once()


if __name__ == "__main__":
    # stdout carries only progress lines for the parent; logs would also fill the pipes.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
