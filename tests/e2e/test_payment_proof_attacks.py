"""Issue 17, tried as an attacker would: a served gateway, the Daraja simulator as the provider.

The attacker knows the callback secret (a secret in a URL leaks through proxies, logs and staff)
and posts to the real routes over HTTP. Each test checks what the money and the meters saw: the
simulator's own ledger of charges, the purchases' states and tokens, the security-event counter.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import pytest
from aiohttp import web

from gateway.app import RUNTIME, Runtime, build_app
from gateway.config import Config
from gateway.demo import serving
from gateway.ledger import ConfirmedPayment, PaymentRecordState, Purchase, PurchaseState
from gateway.ledger.postgres import create_schema, drop_schema
from gateway.money import Money
from gateway.phone import Msisdn
from gateway.sim.daraja import DarajaSimulator

T = TypeVar("T")

STK_METER = "04000000010"
VICTIM_METER = "04000000028"
PHONE = "+254712345678"


POSTGRES = "postgresql://127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgres"])
async def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Runtime]:
    """A demo gateway (every simulator) on SQLite or PostgreSQL, served on a loopback port."""
    if request.param == "sqlite":
        async with serving(tmp_path) as runtime:
            yield runtime
        return
    schema = f"attacks_{secrets.token_hex(6)}"
    try:
        await create_schema(POSTGRES, schema)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"no PostgreSQL at {POSTGRES}: {exc}")
    port = _free_port()
    config = Config.load(
        env={},
        overrides={
            "port": port,
            "data_dir": tmp_path,
            "log_level": "warning",
            # asyncpg passes unknown URL parameters on as server settings
            "database_url": f"{POSTGRES}?search_path={schema}",
        },
    )
    runner = web.AppRunner(await build_app(config), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield runner.app[RUNTIME]
    finally:
        await runner.cleanup()
        await drop_schema(POSTGRES, schema)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _daraja(runtime: Runtime) -> DarajaSimulator:
    assert runtime.simulators is not None
    sim = runtime.simulators.daraja
    assert isinstance(sim, DarajaSimulator)
    return sim


async def _eventually(probe: Callable[[], Awaitable[T | None]], deadline_s: float = 20.0) -> T:
    end = time.monotonic() + deadline_s
    while True:
        value = await probe()
        if value is not None:
            return value
        assert time.monotonic() < end, "nothing happened in time"
        await asyncio.sleep(0.05)


async def _post(runtime: Runtime, tail: str, body: bytes) -> int:
    """Post to a Daraja route; a C2B confirmation's background check and vend are waited for."""
    url = runtime.callback_url("daraja", tail)
    async with aiohttp.ClientSession() as session, session.post(url, data=body) as response:
        await response.read()
        status = response.status
    if tail == "c2b/confirmation":
        await runtime.follow_ups.drain()  # the route answered once the claim was recorded
    return status


async def _security_events(runtime: Runtime) -> dict[str, float]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(runtime.base_url + "/metrics") as response,
    ):
        text = await response.text()
    pattern = r'^gateway_security_events_total\{kind="([a-z_]+)"\} ([0-9.]+)$'
    return {kind: float(n) for kind, n in re.findall(pattern, text, flags=re.MULTILINE)}


async def _settled(runtime: Runtime, meter: str) -> Purchase | None:
    """The meter's one purchase once it left the payment states (None while it is in them)."""
    purchases = await runtime.ledger.find_purchases(meter=meter, limit=10)
    if not purchases:
        return None
    [purchase] = purchases
    waiting = {PurchaseState.CREATED, PurchaseState.AWAITING_PAYMENT, PurchaseState.PAID}
    return None if purchase.state in waiting else purchase


def _c2b(sim: DarajaSimulator, trans_id: str, meter: str, amount_kes: int) -> bytes:
    return json.dumps(
        {
            "TransactionType": "Pay Bill",
            "TransID": trans_id,
            "TransTime": "20261204120000",
            "TransAmount": str(amount_kes),
            "BusinessShortCode": sim.shortcode,
            "BillRefNumber": meter,
            "InvoiceNumber": "",
            "OrgAccountBalance": "",
            "ThirdPartyTransID": "",
            "MSISDN": "25471****678",
            "FirstName": "Mallory",
            "MiddleName": "",
            "LastName": "",
        }
    ).encode()


def _status_result(trans_id: str, *, completed: bool, amount_kes: int) -> bytes:
    """A Transaction Status result as an attacker writes it: right shape, made-up request ids."""
    result: dict[str, object] = {
        "ConversationID": "AG_20261204_00000000000000000001",
        "OriginatorConversationID": "12345-1234567-1",
        "ResultType": 0,
        "TransactionID": trans_id,
    }
    if completed:
        result |= {"ResultCode": 0, "ResultDesc": "The service request is processed successfully."}
        result["ResultParameters"] = {
            "ResultParameter": [
                {"Key": "DebitPartyName", "Value": "254712345678 - Mallory"},
                {"Key": "TransactionStatus", "Value": "Completed"},
                {"Key": "Amount", "Value": amount_kes},
                {"Key": "ReceiptNo", "Value": trans_id},
            ]
        }
    else:
        result |= {"ResultCode": 2032, "ResultDesc": "The transaction does not exist."}
    return json.dumps({"Result": result}).encode()


async def _stk_purchase_vended(runtime: Runtime) -> str:
    """A genuine USSD purchase paid by STK push and vended; its M-Pesa receipt."""
    purchase = await runtime.vending.start_purchase(
        channel="ussd",
        phone=Msisdn(PHONE),
        meter=STK_METER,
        amount=Money.of("100", "KES"),
        idempotency_key="attack-1-genuine",
    )
    await runtime.vending.request_payment(purchase.purchase_id)

    async def receipt() -> str | None:
        context = await runtime.ledger.vend_context(purchase.purchase_id)
        return context.vend.receipt if context.vend is not None else None

    return await _eventually(receipt)


async def test_a_vended_stk_receipt_reposted_as_c2b_never_vends_again(gateway: Runtime) -> None:
    """(1) One payment, one token: the receipt re-posted as a C2B TransID is a security event.

    Daraja's record of the receipt (Transaction Status ``ReasonType`` "Pay Bill Online") says it
    is an STK push's, not a paybill payment: the claim is refused before it opens a purchase.
    """
    sim = _daraja(gateway)
    receipt = await _stk_purchase_vended(gateway)
    assert [c.receipt for c in sim.ledger()] == [receipt]

    assert await _post(gateway, "c2b/confirmation", _c2b(sim, receipt, VICTIM_METER, 100)) == 200

    await _claim_took_nothing(gateway, receipt)
    assert len(sim.ledger()) == 1  # one charge, one token


async def _claim_took_nothing(runtime: Runtime, receipt: str) -> None:
    """A C2B claim on ``receipt`` for VICTIM_METER was refused and holds no receipt.

    Refused before it opened a purchase; or, when Daraja's record could not be had then (a
    Transaction Status result that did not arrive in time), at its confirmation: PAYMENT_FAILED
    for an operator, its payment row never settled.
    """
    [event] = await runtime.ledger.events(kind="payment_claim_contradicted")
    assert event.data["reference"] == receipt
    assert (await _security_events(runtime)).get("payment_claim_contradicted") == 1.0
    opened = await runtime.ledger.find_purchases(meter=VICTIM_METER, limit=10)
    for purchase in opened:
        assert purchase.state is PurchaseState.PAYMENT_FAILED
        assert await runtime.ledger.get_vend(purchase.purchase_id) is None
        assert purchase.purchase_id in await _needs_operator(runtime)
        record = await runtime.ledger.get_payment("daraja", receipt)
        assert record is not None
        assert record.state is PaymentRecordState.PENDING


async def test_forged_status_results_do_not_pay_a_forged_confirmation(gateway: Runtime) -> None:
    """(2) A made-up TransID with forged "Completed" results posted while the query waits."""
    sim = _daraja(gateway)
    sim.faults.callbacks.hold = True  # the genuine result waits: the forgeries come first
    trans_id = "QZX1FAKE99"
    confirmation = asyncio.create_task(
        _post(gateway, "c2b/confirmation", _c2b(sim, trans_id, VICTIM_METER, 100))
    )

    async def result_held() -> bool | None:
        return True if sim.courier.held else None

    await _eventually(result_held)  # our query was sent; Daraja's result is on its way
    forged = _status_result(trans_id, completed=True, amount_kes=100)
    statuses = await asyncio.gather(*(_post(gateway, "status/result", forged) for _ in range(5)))
    assert statuses == [200] * 5
    await sim.release_callbacks()
    sim.faults.callbacks.hold = False
    assert await confirmation == 200

    purchase = await _eventually(lambda: _settled(gateway, VICTIM_METER))
    assert purchase.state is PurchaseState.PAYMENT_FAILED
    assert await gateway.ledger.get_vend(purchase.purchase_id) is None
    assert sim.ledger() == []  # no money ever moved
    events = await _security_events(gateway)
    assert events.get("transaction_status_result_unmatched") == 5.0
    assert events.get("payment_callback_contradicted") == 1.0
    assert purchase.purchase_id in await _needs_operator(gateway)  # a paybill payment unproven


async def _needs_operator(runtime: Runtime) -> str:
    headers = {"Authorization": f"Bearer {runtime.admin_token.reveal()}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(runtime.base_url + "/admin/stuck/needs_operator", headers=headers) as page,
    ):
        assert page.status == 200
        return await page.text()


async def test_a_forged_failure_does_not_fail_a_paid_c2b_purchase(gateway: Runtime) -> None:
    """(3) A forged "failed" result while a real paybill payment is being confirmed."""
    sim = _daraja(gateway)
    sim.faults.callbacks.hold = True
    outcome = await sim.pay_bill("254712345678", VICTIM_METER, 100)
    assert outcome.accepted
    assert sim.courier.held == 1  # the confirmation
    delivering = asyncio.create_task(sim.release_callbacks())  # delivered: the gateway queries
    await asyncio.sleep(0)  # the release took the confirmation
    assert sim.courier.held == 0

    async def result_held() -> bool | None:
        return True if sim.courier.held else None

    await _eventually(result_held)  # Daraja's result to our query, held
    forged = _status_result(outcome.trans_id, completed=False, amount_kes=100)
    assert await _post(gateway, "status/result", forged) == 200
    await sim.release_callbacks()  # Daraja's own result
    sim.faults.callbacks.hold = False
    await delivering

    purchase = await _eventually(lambda: _settled(gateway, VICTIM_METER))
    assert purchase.state in {PurchaseState.VENDED, PurchaseState.DELIVERED}
    vend = await gateway.ledger.get_vend(purchase.purchase_id)
    assert vend is not None
    assert vend.receipt == outcome.trans_id
    assert (await _security_events(gateway)).get("transaction_status_result_unmatched") == 1.0


async def test_unknown_references_and_conflicts_are_counted_and_capped(
    gateway: Runtime, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """(8) Unknown-reference bodies are security events and stored only up to a cap."""
    padding = "x" * 900_000
    bodies = []
    for n in range(3):
        callback = {
            "Body": {
                "stkCallback": {
                    "MerchantRequestID": f"1-{n}",
                    "CheckoutRequestID": "ws_CO_000000000000000000001",
                    "ResultCode": 1032,
                    "ResultDesc": "Request cancelled by user",
                    "Padding": padding,
                }
            }
        }
        bodies.append(json.dumps(callback).encode())
    for body in bodies:
        assert await _post(gateway, "stk", body) == 200
    events = await _security_events(gateway)
    assert events.get("payment_notice_unknown") == 3.0
    assert events.get("payment_notice_payload_conflict") == 2.0
    reference = "ws_CO_000000000000000000001"
    if "sqlite" in request.node.callspec.id:
        with sqlite3.connect(tmp_path / "gateway.db") as conn:
            [(stored,)] = conn.execute(
                "SELECT length(payload) FROM payments WHERE reference = ?", (reference,)
            ).fetchall()
    else:
        base, schema = gateway.config.effective_database_url.split("?search_path=")
        conn = await asyncpg.connect(base, server_settings={"search_path": schema})
        try:
            stored = await conn.fetchval(
                "SELECT length(payload) FROM payments WHERE reference = $1", reference
            )
        finally:
            await conn.close()
    assert stored <= 8192


async def test_a_forged_stk_receipt_never_reaches_the_token(gateway: Runtime) -> None:
    """(6) A forged STK success, posted before the real callback, names a made-up receipt."""
    sim = _daraja(gateway)
    sim.faults.callbacks.hold = True  # the real STK callback waits behind the forgery
    purchase = await gateway.vending.start_purchase(
        channel="ussd",
        phone=Msisdn(PHONE),
        meter=STK_METER,
        amount=Money.of("100", "KES"),
        idempotency_key="attack-6-genuine",
    )
    purchase = await gateway.vending.request_payment(purchase.purchase_id)
    assert purchase.provider_reference is not None

    async def charged() -> bool | None:
        return True if sim.ledger() and sim.courier.held else None

    await _eventually(charged)  # the customer paid; M-Pesa's callback is held
    [charge] = sim.ledger()
    forged = {
        "Body": {
            "stkCallback": {
                "MerchantRequestID": "29115-34620561-1",
                "CheckoutRequestID": purchase.provider_reference,
                "ResultCode": 0,
                "ResultDesc": "The service request is processed successfully.",
                "CallbackMetadata": {
                    "Item": [
                        {"Name": "Amount", "Value": 100},
                        {"Name": "MpesaReceiptNumber", "Value": "FAKE123456"},
                        {"Name": "TransactionDate", "Value": 20261204120000},
                        {"Name": "PhoneNumber", "Value": 254712345678},
                    ]
                },
            }
        }
    }
    sim.faults.callbacks.hold = False  # Daraja's answers to our lookups flow
    assert await _post(gateway, "stk", json.dumps(forged).encode()) == 200
    await sim.release_callbacks()  # the real callback

    async def vended() -> str | None:
        context = await gateway.ledger.vend_context(purchase.purchase_id)
        return context.vend.receipt if context.vend is not None else None

    receipt = await _eventually(vended)
    assert receipt in {charge.receipt, purchase.purchase_id}
    [message] = await gateway.ledger.outbox_for(purchase.purchase_id)
    assert "FAKE123456" not in message.body
    assert len(sim.ledger()) == 1

    # The real receipt, proven by the late real callback, still pays for nothing else (1 + 6).
    await sim.settle()
    c2b = _c2b(sim, charge.receipt, VICTIM_METER, 100)
    assert await _post(gateway, "c2b/confirmation", c2b) == 200
    await _claim_took_nothing(gateway, charge.receipt)


async def _stk_purchase_charged(runtime: Runtime, key: str) -> tuple[Purchase, str]:
    """A USSD purchase the payer paid by STK push, its callback held; (purchase, receipt)."""
    sim = _daraja(runtime)
    sim.faults.callbacks.hold = True
    purchase = await runtime.vending.start_purchase(
        channel="ussd",
        phone=Msisdn(PHONE),
        meter=STK_METER,
        amount=Money.of("100", "KES"),
        idempotency_key=key,
    )
    purchase = await runtime.vending.request_payment(purchase.purchase_id)

    async def charged() -> str | None:
        charges = [c for c in sim.ledger() if c.reference == purchase.provider_reference]
        return charges[0].receipt if charges and sim.courier.held else None

    receipt = await _eventually(charged)
    sim.faults.callbacks.hold = False  # Daraja's answers to our lookups flow
    return purchase, receipt


async def _vended_receipt(runtime: Runtime, purchase_id: str) -> str:
    async def vended() -> str | None:
        context = await runtime.ledger.vend_context(purchase_id)
        return context.vend.receipt if context.vend is not None else None

    return await _eventually(vended)


async def test_an_stk_receipt_replayed_as_c2b_by_its_payer_and_amount_takes_nothing(
    gateway: Runtime,
) -> None:
    """The exact copy of the STK front-run: same amount, Daraja's masked payer, another meter.

    Only the kind of payment tells it apart: Daraja's record of the receipt says "Pay Bill
    Online" (an STK push), and a paybill confirmation must name a paybill payment. Before: the
    replay vended the attacker's meter with the payer's money and the payer's own purchase went
    to refund (two purchases, one charge).
    """
    sim = _daraja(gateway)
    purchase, receipt = await _stk_purchase_charged(gateway, "copy-stk")

    assert await _post(gateway, "c2b/confirmation", _c2b(sim, receipt, VICTIM_METER, 100)) == 200
    await sim.release_callbacks()  # the genuine STK callback

    # Daraja's record of the receipt answers in time on both dialects (issue 14: its result is
    # held in the ledger when it comes before the query is recorded, never dropped).
    assert await _vended_receipt(gateway, purchase.purchase_id) == receipt
    await _claim_took_nothing(gateway, receipt)
    assert len(sim.ledger()) == 1


async def test_a_paybill_receipt_named_by_a_forged_stk_callback_stays_the_payers(
    gateway: Runtime,
) -> None:
    """A forged STK success naming the payer's own paybill receipt (same payer and amount).

    Daraja's record of that receipt is a paybill payment ("Pay Bill"), not a push: it does not
    prove the push's receipt. Before: the push took the paybill receipt, and the paybill
    payment's own confirmation was refused as a reused receipt (money taken, no token).
    """
    sim = _daraja(gateway)
    purchase, receipt = await _stk_purchase_charged(gateway, "forged-stk")
    sim.faults.callbacks.hold = True
    paybill = await sim.pay_bill("254712345678", VICTIM_METER, 100)
    assert paybill.accepted
    sim.faults.callbacks.hold = False
    forged = {
        "Body": {
            "stkCallback": {
                "MerchantRequestID": "29115-34620561-1",
                "CheckoutRequestID": purchase.provider_reference,
                "ResultCode": 0,
                "ResultDesc": "The service request is processed successfully.",
                "CallbackMetadata": {
                    "Item": [
                        {"Name": "Amount", "Value": 100},
                        {"Name": "MpesaReceiptNumber", "Value": paybill.trans_id},
                        {"Name": "TransactionDate", "Value": 20261204120000},
                        {"Name": "PhoneNumber", "Value": 254712345678},
                    ]
                },
            }
        }
    }
    assert await _post(gateway, "stk", json.dumps(forged).encode()) == 200
    await sim.release_callbacks()  # the STK callback and the paybill confirmation

    # Never the paybill receipt (``payment_receipt_unproven``, or unverified if the lookup is slow).
    assert await _vended_receipt(gateway, purchase.purchase_id) in {receipt, purchase.purchase_id}

    async def paybill_vended() -> Purchase | None:
        found = await gateway.ledger.find_purchases(meter=VICTIM_METER, limit=5)
        return found[0] if found and await gateway.ledger.get_vend(found[0].purchase_id) else None

    paid = await _eventually(paybill_vended)
    assert await _vended_receipt(gateway, paid.purchase_id) == paybill.trans_id
    assert len(sim.ledger()) == 2


async def test_a_push_its_own_query_proves_paid_vends_whatever_became_of_its_receipt(
    gateway: Runtime,
) -> None:
    """STK Query says our push was paid; its receipt already proves another payment row.

    However the receipt got there, the push's own query is the proof of this payment: it vends
    without the disputed receipt (``payment_receipt_reused``), never refunds or prompts again.
    """
    sim = _daraja(gateway)
    purchase, receipt = await _stk_purchase_charged(gateway, "disputed-receipt")
    other = await gateway.vending.start_purchase(
        channel="ussd",
        phone=Msisdn("+254790000001"),
        meter=VICTIM_METER,
        amount=Money.of("100", "KES"),
        idempotency_key="disputed-other",
    )
    await gateway.ledger.attach_payment(
        other.purchase_id, provider="daraja", reference="ws_CO_OTHER", actor="test"
    )
    await gateway.ledger.mark_paid(
        other.purchase_id,
        ConfirmedPayment(
            provider="daraja",
            reference="ws_CO_OTHER",
            amount=Money.of("100", "KES"),
            payer=Msisdn("+254790000001"),
            receipt=receipt,
        ),
        actor="test",
    )
    await sim.release_callbacks()  # the genuine STK callback

    assert await _vended_receipt(gateway, purchase.purchase_id) == purchase.purchase_id
    after = await gateway.ledger.get_purchase(purchase.purchase_id)
    assert after.state in {PurchaseState.VENDED, PurchaseState.DELIVERED}
    kinds = [e.kind for e in await gateway.ledger.timeline(purchase.purchase_id)]
    assert "payment_receipt_reused" in kinds  # the receipt's lookup answered (issue 14)
    assert len(sim.push_requests) == 1
    assert len(sim.ledger()) == 1


async def test_an_exact_copy_of_a_paybill_confirmation_naming_another_meter_takes_nothing(
    gateway: Runtime,
) -> None:
    """Issue 14: the C2B front-run, an exact copy (payer, amount, TransID) for another meter.

    Posted before Daraja's genuine confirmation, the copy passes every check Daraja's record of
    the receipt allows (a paybill payment, that amount, that payer). Only the validation Daraja
    asked before money moved says which meter the customer typed: the copy is refused
    (``payment_claim_contradicted``) and takes nothing; the genuine confirmation vends the
    customer's meter with its receipt. Before: the copy vended the attacker's meter with the
    customer's money, and the genuine confirmation found the receipt taken.
    """
    sim = _daraja(gateway)
    sim.faults.callbacks.hold = True  # Daraja's genuine confirmation waits behind the copy
    paid = await sim.pay_bill("254712345678", VICTIM_METER, 100)
    assert paid.accepted
    sim.faults.callbacks.hold = False
    copy = _c2b(sim, paid.trans_id, STK_METER, 100)
    assert await _post(gateway, "c2b/confirmation", copy) == 200
    await sim.release_callbacks()  # the genuine confirmation
    await gateway.follow_ups.drain()

    assert await gateway.ledger.find_purchases(meter=STK_METER, limit=5) == []
    purchase = await _eventually(lambda: _settled(gateway, VICTIM_METER))
    assert await _vended_receipt(gateway, purchase.purchase_id) == paid.trans_id
    [event] = await gateway.ledger.events(kind="payment_claim_contradicted")
    assert event.data["reference"] == paid.trans_id
    assert event.data["account"] == STK_METER
    assert (await _security_events(gateway)).get("payment_claim_contradicted") == 1.0
    assert len(sim.ledger()) == 1


async def test_the_c2b_confirmation_is_answered_once_the_claim_is_recorded(
    gateway: Runtime,
) -> None:
    """Issue 14: Daraja gets its answer before the claim is checked; the check and vend follow.

    Daraja's Transaction Status result is held: before, the confirmation's answer waited for it
    (up to ``status_result_wait_s``, 30 s). Now the route answers at once, the claim pending in
    the ledger, and the background check vends once the result comes.
    """
    sim = _daraja(gateway)
    sim.faults.callbacks.hold = True  # Daraja's confirmation, then its status result, wait
    paid = await sim.pay_bill("254712345678", VICTIM_METER, 100)
    url = gateway.callback_url("daraja", "c2b/confirmation")
    body = _c2b(sim, paid.trans_id, VICTIM_METER, 100)
    async with (
        asyncio.timeout(5),
        aiohttp.ClientSession() as session,
        session.post(url, data=body) as response,
    ):
        assert response.status == 200
        assert json.loads(await response.read()) == {"ResultCode": 0, "ResultDesc": "Success"}

    async def queried() -> bool | None:
        return True if sim.courier.held >= 2 else None  # the confirmation and our query's result

    await _eventually(queried)
    assert await gateway.ledger.find_purchases(meter=VICTIM_METER, limit=5) == []
    sim.faults.callbacks.hold = False
    await sim.release_callbacks()
    await gateway.follow_ups.drain()
    purchase = await _eventually(lambda: _settled(gateway, VICTIM_METER))
    assert await _vended_receipt(gateway, purchase.purchase_id) == paid.trans_id
    assert len(sim.ledger()) == 1
