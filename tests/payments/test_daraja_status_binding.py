"""Transaction Status results bound to our own request, across instances (issue 17, 2; issue 14).

Two ``DarajaProvider`` instances (two gateway processes) share one ledger as their status store;
Daraja's result for one instance's query is posted to the other one's route. Forged results,
with the right shape and the right ``TransactionID`` but ids Daraja never gave us, prove nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.ledger import Ledger, open_sqlite_ledger
from gateway.payments import PaymentState, ProviderReference, StatusResultOutcome
from gateway.payments.daraja import DarajaProvider
from gateway.sim.daraja import DarajaSimulator
from tests.ledger.conftest import postgres_test_ledger
from tests.ledger.ledger_support import FakeClock
from tests.payments.payfakes import CallbackReceiver

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


@pytest.fixture(params=["sqlite", "postgres"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    """One ledger both instances use: a SQLite file, or a PostgreSQL schema (a pool each side)."""
    if request.param == "sqlite":
        async with open_sqlite_ledger(tmp_path / "ledger.db") as opened:
            yield opened
        return
    async with postgres_test_ledger(FakeClock()) as opened:
        yield opened


async def _instances(
    aiohttp_server: ServerFactory, session: aiohttp.ClientSession, ledger: Ledger
) -> tuple[DarajaSimulator, DarajaProvider, DarajaProvider, CallbackReceiver]:
    sim = DarajaSimulator(seed=11, prompt_timeout_s=None, shortcode="600638")
    base_url = str((await aiohttp_server(sim.app)).make_url("")).rstrip("/")
    receiver = CallbackReceiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", receiver.handle)
    receiver.base_url = str((await aiohttp_server(app)).make_url("")).rstrip("/")

    def provider() -> DarajaProvider:
        return DarajaProvider(
            session,
            base_url=base_url,
            consumer_key=sim.consumer_key,
            consumer_secret=sim.consumer_secret,
            shortcode=sim.shortcode,
            passkey=sim.passkey,
            callback_url=receiver.url("/stk"),
            initiator=sim.initiator,
            security_credential=sim.security_credential,
            status_result_url=receiver.url("/status/result"),
            status_timeout_url=receiver.url("/status/timeout"),
            status_result_wait_s=5.0,
            status_store=ledger,
            status_poll_s=0.05,
            status_hold_s=0.3,
        )

    asking, other = provider(), provider()
    sim.register_urls(validation_url="", confirmation_url=receiver.url("/c2b/confirmation"))
    return sim, asking, other, receiver


def _forged(trans_id: str, conversation: str = "AG_20261204_0000000000000001") -> bytes:
    result = {
        "ConversationID": conversation,
        "OriginatorConversationID": "12345-1234567-1",
        "ResultCode": 0,
        "ResultDesc": "The service request is processed successfully.",
        "ResultType": 0,
        "TransactionID": trans_id,
        "ResultParameters": {
            "ResultParameter": [
                {"Key": "DebitPartyName", "Value": "254712345678 - Mallory"},
                {"Key": "TransactionStatus", "Value": "Completed"},
                {"Key": "Amount", "Value": 100},
                {"Key": "ReceiptNo", "Value": trans_id},
            ]
        },
    }
    return json.dumps({"Result": result}).encode()


async def test_a_result_posted_to_another_instance_reaches_the_waiting_one(
    aiohttp_server: ServerFactory, ledger: Ledger
) -> None:
    """Daraja's result lands on instance B; A, which asked, gets it through the ledger."""
    async with aiohttp.ClientSession() as session:
        sim, asking, other, receiver = await _instances(aiohttp_server, session, ledger)
        outcomes: list[StatusResultOutcome] = []

        async def to_the_other_instance(body: bytes) -> tuple[int, bytes]:
            outcomes.append(await other.deliver_status_result(body))
            return 200, b"{}"

        receiver.hooks["/status/result"] = to_the_other_instance
        paid = await sim.pay_bill("254712345678", "37012345678", 100)
        status = await asking.query_status(ProviderReference(paid.trans_id))
        assert status.state is PaymentState.SUCCEEDED
        assert status.receipt == paid.trans_id
        assert outcomes == [StatusResultOutcome.DELIVERED]
        # The same result again (Daraja retries, or a replay): one use only.
        [body] = receiver.bodies("/status/result")
        assert await other.deliver_status_result(body) is StatusResultOutcome.UNMATCHED


async def test_forged_results_never_answer_a_query(
    aiohttp_server: ServerFactory, ledger: Ledger
) -> None:
    """Forged "Completed" results for a receipt M-Pesa never issued, while the query waits."""
    async with aiohttp.ClientSession() as session:
        sim, asking, other, receiver = await _instances(aiohttp_server, session, ledger)
        sim.faults.callbacks.hold = True  # Daraja's own answer waits behind the forgeries
        query = asyncio.create_task(asking.query_status(ProviderReference("QZX1FAKE99")))
        async with asyncio.timeout(5):
            while not sim.courier.held:  # noqa: ASYNC110 - the simulator has no event for it
                await asyncio.sleep(0.01)
        for instance in (asking, other):
            assert await instance.deliver_status_result(_forged("QZX1FAKE99")) is (
                StatusResultOutcome.UNMATCHED
            )
        [genuine] = [json.loads(d[2]) for d in sim.courier._held]  # the held result
        ids = genuine["Result"]
        # Our query's ids, another transaction: contradicted, not proof.
        contradicting = _forged("QOTHER1234", conversation=ids["ConversationID"]).replace(
            b"12345-1234567-1", ids["OriginatorConversationID"].encode()
        )
        assert await other.deliver_status_result(contradicting) is (
            StatusResultOutcome.CONTRADICTED
        )

        async def to_the_other_instance(body: bytes) -> tuple[int, bytes]:
            await other.deliver_status_result(body)
            return 200, b"{}"

        receiver.hooks["/status/result"] = to_the_other_instance
        await sim.release_callbacks()
        status = await query
        assert status.state is PaymentState.FAILED  # M-Pesa's word: no such transaction


class _SlowStore:
    """The ledger, with a slow write of the query (a busy database): the result comes first."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def record_status_query(
        self, *, provider: str, conversation_id: str, originator_id: str, transaction_id: str
    ) -> str | None:
        await asyncio.sleep(0.2)
        return await self.ledger.record_status_query(
            provider=provider,
            conversation_id=conversation_id,
            originator_id=originator_id,
            transaction_id=transaction_id,
        )

    async def answer_status_query(self, **fields: object) -> str:
        return await self.ledger.answer_status_query(**fields)  # type: ignore[arg-type]

    async def status_query_result(self, conversation_id: str) -> bytes | None:
        return await self.ledger.status_query_result(conversation_id)

    async def held_status_outcome(self, conversation_id: str) -> str | None:
        return await self.ledger.held_status_outcome(conversation_id)


@pytest.mark.parametrize("receiving", ["asking", "other"])
async def test_a_result_arriving_before_its_query_is_stored_still_answers_it(
    aiohttp_server: ServerFactory, ledger: Ledger, receiving: str
) -> None:
    """Daraja answers while we still write the query: held in the ledger, bound when recorded.

    Whichever instance receives it (the asking one, or another with no query of its own in
    flight), the result is held, judged when the query is recorded, and answers the query.
    """
    async with aiohttp.ClientSession() as session:
        sim, asking, other, receiver = await _instances(aiohttp_server, session, ledger)
        asking.status_store = _SlowStore(ledger)
        receiver_instance = asking if receiving == "asking" else other
        outcomes: list[StatusResultOutcome] = []

        async def deliver(body: bytes) -> tuple[int, bytes]:
            outcomes.append(await receiver_instance.deliver_status_result(body))
            return 200, b"{}"

        receiver.hooks["/status/result"] = deliver
        paid = await sim.pay_bill("254712345678", "37012345678", 100)
        status = await asking.query_status(ProviderReference(paid.trans_id))
        assert status.state is PaymentState.SUCCEEDED
        assert status.receipt == paid.trans_id
        await sim.settle()
        assert outcomes == [StatusResultOutcome.DELIVERED]
