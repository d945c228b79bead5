"""A hypothesis state machine drives the saga and checks the invariants after every step.

The steps: purchases, provider outcomes (paid, underpaid, failed), callbacks that lie, arrive
twice, late or never, status polls, vend replays, provider outages, sweeps, restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from gateway.errors import GatewayError
from gateway.ledger import SqliteLedger
from gateway.money import Money
from gateway.payments import PaymentNotice, PaymentState
from gateway.sms.outbox import OutboxWorker
from gateway.sweeper import Sweeper
from gateway.vending import Vending
from tests.vending.vending_support import (
    AMOUNT_FOR_TESTS,
    PHONE,
    FakeClock,
    FakeProvider,
    FakeSender,
    build_vending,
    make_drn,
    seed,
)

T = TypeVar("T")
DRNS = [make_drn(700 + i) for i in range(2)]
AMOUNTS = [AMOUNT_FOR_TESTS, Money(23200, "KES")]


class SagaMachine(RuleBasedStateMachine):
    """The saga under random interleavings; the database is checked after every step."""

    purchases = Bundle("purchases")
    notices = Bundle("notices")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = tempfile.TemporaryDirectory()
        self.path = Path(self.tmp.name) / "ledger.db"
        self.clock = FakeClock()
        self.provider = FakeProvider()
        self.sender = FakeSender()
        self.ledger: SqliteLedger | None = None
        self.vending: Vending | None = None
        self.seen_events: list[tuple[int, str, str]] = []
        self.keys = 0

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the machine's own loop."""
        return self.loop.run_until_complete(coroutine)

    async def _open(self) -> None:
        self.ledger = SqliteLedger(self.path, clock=self.clock)
        await self.ledger.start()
        self.vending = build_vending(self.ledger, self.provider, self.clock)

    @property
    def saga(self) -> Vending:
        """The current saga instance."""
        assert self.vending is not None
        return self.vending

    @initialize()
    def open_ledger(self) -> None:
        """Open a fresh ledger with two meters."""
        self.run(self._open())
        assert self.ledger is not None
        self.run(seed(self.ledger, DRNS))

    def teardown(self) -> None:
        """Close the ledger and the loop."""
        if self.ledger is not None:
            self.run(self.ledger.close())
        self.loop.close()
        self.tmp.cleanup()

    # -- customer and provider actions ----------------------------------------------------------

    @rule(
        target=purchases,
        meter=st.sampled_from(DRNS),
        amount=st.sampled_from(AMOUNTS),
        outcome=st.sampled_from(["paid", "paid", "paid", "underpaid", "failed", "undecided"]),
    )
    def start(self, meter: str, amount: Money, outcome: str) -> str:
        """A customer starts a purchase, the prompt is requested, the customer answers it."""
        self.keys += 1
        purchase = self.run(
            self.saga.start_purchase(
                channel="ussd",
                phone=PHONE,
                meter=meter,
                amount=amount,
                idempotency_key=str(self.keys),
            )
        )
        self.run(self.saga.request_payment(purchase.purchase_id))
        if outcome != "undecided":
            self.provider_settles(purchase.purchase_id, outcome)
        return purchase.purchase_id

    def _reference(self, purchase_id: str) -> str | None:
        assert self.ledger is not None
        return self.run(self.ledger.get_purchase(purchase_id)).provider_reference

    @rule(
        purchase_id=purchases,
        outcome=st.sampled_from(["paid", "underpaid", "failed", "cancelled"]),
    )
    def provider_settles(self, purchase_id: str, outcome: str) -> None:
        """The provider decides (once) what became of the collection."""
        reference = self._reference(purchase_id)
        if reference is None or reference in self.provider.settlements:
            return
        assert self.ledger is not None
        amount = self.run(self.ledger.get_purchase(purchase_id)).amount
        if outcome == "paid":
            self.provider.settle(reference, amount=amount)
        elif outcome == "underpaid":
            self.provider.settle(reference, amount=Money(amount.amount_minor - 100, "KES"))
        elif outcome == "failed":
            self.provider.settle(reference, PaymentState.FAILED)
        else:
            self.provider.settle(reference, PaymentState.CANCELLED)

    @rule(
        target=notices,
        purchase_id=purchases,
        claim=st.sampled_from([PaymentState.SUCCEEDED, PaymentState.FAILED, PaymentState.PENDING]),
        body=st.sampled_from([b"{}", b'{"forged":true}']),
    )
    def callback_arrives(self, purchase_id: str, claim: PaymentState, body: bytes) -> PaymentNotice:
        """A callback (possibly lying about the outcome) arrives."""
        reference = self._reference(purchase_id) or f"UNKNOWN-{purchase_id}"
        notice = self.provider.notice(reference, claim, raw=body)
        self.run(self.saga.on_payment_notice(notice))
        return notice

    @rule(notice=notices)
    def callback_arrives_again(self, notice: PaymentNotice) -> None:
        """An earlier callback is delivered again, late and out of order."""
        self.run(self.saga.on_payment_notice(notice))

    @rule(purchase_id=purchases)
    def status_poll(self, purchase_id: str) -> None:
        """Someone asks the provider directly (a retry of confirm)."""
        with contextlib.suppress(GatewayError):
            self.run(self.saga.confirm(purchase_id))

    @rule(purchase_id=purchases)
    def vend_replay(self, purchase_id: str) -> None:
        """A replayed vend request (operator or a retrying caller)."""
        with contextlib.suppress(GatewayError):
            self.run(self.saga.vend(purchase_id))

    @rule(outages=st.integers(min_value=1, max_value=3))
    def provider_outage(self, outages: int) -> None:
        """The provider's status API fails the next few queries."""
        self.provider.unavailable_queries = outages

    @rule(seconds=st.sampled_from([5, 30, 120, 700]))
    def sweep(self, seconds: int) -> None:
        """Time passes and the sweeper runs (with the outbox)."""
        self.clock.advance(seconds)
        assert self.ledger is not None
        outbox = OutboxWorker(
            ledger=self.ledger, sender=self.sender, clock=self.clock, jitter=lambda: 0.0
        )
        self.run(Sweeper(vending=self.saga, outbox=outbox, clock=self.clock).sweep_once())

    @precondition(lambda self: self.ledger is not None)
    @rule()
    def restart(self) -> None:
        """The process restarts: connections closed, a new saga, locks forgotten."""
        assert self.ledger is not None
        self.run(self.ledger.close())
        self.run(self._open())

    # -- invariants -----------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path)
        conn.row_factory = sqlite3.Row
        return conn

    @invariant()
    def no_token_without_a_proven_payment_of_the_right_amount(self) -> None:
        """Every vend's payment was proven by the provider, for the exact amount and currency."""
        with self._db() as conn:
            rows = conn.execute(
                "SELECT p.purchase_id, p.provider_reference, p.amount_minor, p.currency,"
                " pay.state AS pay_state, pay.amount_minor AS paid, pay.currency AS paid_currency"
                " FROM vends v JOIN purchases p ON p.purchase_id = v.purchase_id"
                " LEFT JOIN payments pay ON pay.provider = p.provider"
                " AND pay.reference = p.provider_reference"
            ).fetchall()
        for row in rows:
            settled = self.provider.settlements.get(row["provider_reference"])
            assert settled is not None, row["purchase_id"]
            assert settled.state is PaymentState.SUCCEEDED
            assert settled.amount == Money(row["amount_minor"], row["currency"])
            assert row["pay_state"] == "succeeded"
            assert (row["paid"], row["paid_currency"]) == (row["amount_minor"], row["currency"])

    @invariant()
    def at_most_one_vend_per_payment_and_tids_increase(self) -> None:
        """One vend per purchase and per payment; (meter, TID) unique and increasing."""
        with self._db() as conn:
            vends = conn.execute(
                "SELECT v.meter, v.tid, p.provider_reference FROM vends v"
                " JOIN purchases p ON p.purchase_id = v.purchase_id ORDER BY v.vend_id"
            ).fetchall()
        references = [row["provider_reference"] for row in vends]
        assert len(references) == len(set(references))
        last: dict[str, int] = {}
        for row in vends:
            assert row["tid"] > last.get(row["meter"], -1)
            last[row["meter"]] = row["tid"]

    @invariant()
    def every_vend_has_exactly_one_token_message(self) -> None:
        """Each vend has one token message in the outbox, and no message lacks its vend."""
        with self._db() as conn:
            counts = conn.execute(
                "SELECT v.purchase_id, count(o.message_id) FROM vends v"
                " LEFT JOIN outbox o ON o.purchase_id = v.purchase_id AND o.kind = 'token'"
                " GROUP BY v.purchase_id"
            ).fetchall()
            orphans = conn.execute(
                "SELECT count(*) FROM outbox o LEFT JOIN vends v ON v.purchase_id = o.purchase_id"
                " WHERE v.vend_id IS NULL"
            ).fetchone()[0]
        assert all(count == 1 for _, count in counts)
        assert orphans == 0

    @invariant()
    def events_are_append_only(self) -> None:
        """Every event seen before is still there, unchanged, in the same order."""
        with self._db() as conn:
            events = [
                (row[0], row[1], row[2])
                for row in conn.execute("SELECT event_id, kind, data FROM events ORDER BY event_id")
            ]
        assert events[: len(self.seen_events)] == self.seen_events
        self.seen_events = events


SagaMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.slow
class TestSagaStateMachine(SagaMachine.TestCase):  # type: ignore[misc,valid-type]
    """Runs the state machine under pytest."""
