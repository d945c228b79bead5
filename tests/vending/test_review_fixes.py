"""Fixes found in review: receipts, held tokens, early delivery reports, C2B refusal codes."""

from __future__ import annotations

import json
from datetime import timedelta

import aiohttp

from gateway.ledger import OutboxState, PurchaseState
from gateway.money import Money
from gateway.payments import PaymentNotice, PaymentState, ProviderReference
from gateway.payments.daraja import DarajaProvider
from gateway.phone import Msisdn
from gateway.sms import DeliveryReport, DeliveryState, SentMessage
from gateway.sms.outbox import OutboxPolicy, OutboxWorker
from tests.vending.vending_support import AMOUNT_FOR_TESTS, PHONE, FakeSender, Settlement, World


async def test_the_callbacks_receipt_reaches_the_sms_when_the_status_has_none(
    world: World,
) -> None:
    """An STK callback carries the M-Pesa receipt, the status query none: the SMS shows it.

    Once the provider's own record of that receipt (``verify_receipt``) proves it is this
    payment (issue 17, 6: a callback's receipt is a claim).
    """
    purchase = await world.vending.start_purchase(
        channel="ussd",
        phone=PHONE,
        meter=world.drns[0],
        amount=AMOUNT_FOR_TESTS,
        idempotency_key="stk",
    )
    purchase = await world.vending.request_payment(purchase.purchase_id)
    reference = purchase.provider_reference
    assert reference is not None
    world.provider.settlements[reference] = Settlement(
        PaymentState.SUCCEEDED, AMOUNT_FOR_TESTS, PHONE, None
    )
    # The provider's record of the receipt (Daraja: Transaction Status).
    world.provider.settlements["SKL5ABC123"] = Settlement(
        PaymentState.SUCCEEDED, AMOUNT_FOR_TESTS, PHONE, "SKL5ABC123"
    )
    await world.vending.on_payment_notice(
        PaymentNotice(
            provider=world.provider.name,
            reference=ProviderReference(reference),
            claimed_state=PaymentState.SUCCEEDED,
            amount=AMOUNT_FOR_TESTS,
            payer=PHONE,
            receipt="SKL5ABC123",
            raw=b'{"MpesaReceiptNumber":"SKL5ABC123"}',
        )
    )
    (message,) = await world.ledger.outbox_for(purchase.purchase_id)
    assert "SKL5ABC123" in message.body
    assert purchase.purchase_id not in message.body
    vend = await world.ledger.get_vend(purchase.purchase_id)
    assert vend is not None
    assert vend.receipt == "SKL5ABC123"


async def test_a_receipt_the_provider_does_not_prove_never_reaches_the_sms(
    world: World,
) -> None:
    """A callback's receipt with no (or another) payment behind it: our purchase id instead."""
    # A real receipt, but of another amount: not this payment's.
    world.provider.settlements["OTHER12345"] = Settlement(
        PaymentState.SUCCEEDED, Money(AMOUNT_FOR_TESTS.amount_minor + 100, "KES"), PHONE, None
    )
    for receipt in ("FAKE123456", "OTHER12345"):
        purchase = await world.vending.start_purchase(
            channel="ussd",
            phone=PHONE,
            meter=world.drns[0],
            amount=AMOUNT_FOR_TESTS,
            idempotency_key=f"stk-{receipt}",
        )
        purchase = await world.vending.request_payment(purchase.purchase_id)
        reference = purchase.provider_reference
        assert reference is not None
        world.provider.settlements[reference] = Settlement(
            PaymentState.SUCCEEDED, AMOUNT_FOR_TESTS, PHONE, None
        )
        await world.vending.on_payment_notice(
            PaymentNotice(
                provider=world.provider.name,
                reference=ProviderReference(reference),
                claimed_state=PaymentState.SUCCEEDED,
                amount=AMOUNT_FOR_TESTS,
                payer=PHONE,
                receipt=receipt,
                raw=json.dumps({"MpesaReceiptNumber": receipt}).encode(),
            )
        )
        (message,) = await world.ledger.outbox_for(purchase.purchase_id)
        assert receipt not in message.body
        assert purchase.purchase_id in message.body
        vend = await world.ledger.get_vend(purchase.purchase_id)
        assert vend is not None
        assert vend.receipt == purchase.purchase_id


async def test_a_token_without_recipient_is_held_for_an_operator(world: World) -> None:
    """A C2B payment with a masked MSISDN vends; its SMS is HELD, never claimed; reprint kept."""
    notice = PaymentNotice(
        provider=world.provider.name,
        reference=ProviderReference("RKTMASKED1"),
        claimed_state=PaymentState.SUCCEEDED,
        amount=AMOUNT_FOR_TESTS,
        payer=None,  # Daraja v2 masks the MSISDN: 25470****149
        account_reference=world.drns[1],
        is_customer_initiated=True,
        raw=b'{"TransID":"RKTMASKED1","MSISDN":"25470****149"}',
    )
    world.provider.settle("RKTMASKED1", amount=AMOUNT_FOR_TESTS, payer=None)
    await world.vending.on_payment_notice(notice)
    (purchase,) = await world.ledger.find_purchases(meter=world.drns[1])
    assert purchase.state is PurchaseState.VENDED
    (message,) = await world.ledger.outbox_for(purchase.purchase_id)
    assert message.state is OutboxState.HELD
    kinds = [event.kind for event in await world.ledger.timeline(purchase.purchase_id)]
    assert "token_held_no_recipient" in kinds
    later = world.clock() + timedelta(days=1)
    assert await world.ledger.claim_outbox(later, lease_until=later) == []
    assert (await world.ledger.outbox_stats(world.clock())).held == 1
    vend = await world.ledger.get_vend(purchase.purchase_id)
    assert vend is not None
    reprint = await world.vending.reprint(purchase.purchase_id)
    assert vend.token[-4:] in reprint.body.replace("-", "")


class ReportingFirstSender(FakeSender):
    """A sender whose provider posts the delivery report before ``send`` returns (AT's sim)."""

    def __init__(self, world: World) -> None:
        super().__init__()
        self.world = world
        self.early: list[object] = []

    async def send(self, to: Msisdn, text: str) -> SentMessage:
        """Send, and have the report arrive before the caller records the message id."""
        sent = await super().send(to, text)
        report = DeliveryReport(
            provider_message_id=sent.provider_message_id, state=DeliveryState.DELIVERED
        )
        self.early.append(await self.world.ledger.apply_delivery_report(report))
        return sent


async def test_a_report_before_the_send_is_recorded_still_delivers(world: World) -> None:
    """The report beats the worker's record of the message id: the purchase still ends DELIVERED."""
    purchase = await world.vending.start_purchase(
        channel="sms",
        phone=PHONE,
        meter=world.drns[0],
        amount=AMOUNT_FOR_TESTS,
        idempotency_key="dlr",
    )
    purchase = await world.vending.request_payment(purchase.purchase_id)
    assert purchase.provider_reference is not None
    world.provider.settle(purchase.provider_reference, amount=AMOUNT_FOR_TESTS)
    await world.vending.confirm(purchase.purchase_id)
    sender = ReportingFirstSender(world)
    worker = OutboxWorker(
        ledger=world.ledger,
        sender=sender,
        clock=world.clock,
        jitter=lambda: 0.5,
        policy=OutboxPolicy(),
    )
    assert (await worker.run_once()).sent == 1
    assert sender.early == [None]  # unknown when it came: kept, not lost
    assert (await world.ledger.get_purchase(purchase.purchase_id)).state is (
        PurchaseState.DELIVERED
    )


async def test_daraja_answers_its_own_codes_for_the_sagas_refusals(world: World) -> None:
    """An unknown meter is C2B00012 and an amount out of range C2B00013, not the generic one."""
    async with aiohttp.ClientSession() as session:
        daraja = DarajaProvider(
            session,
            base_url="http://127.0.0.1:9",
            consumer_key="k",
            consumer_secret="s",
            shortcode="600000",
            passkey="p",
            callback_url="http://127.0.0.1:9/cb",
        )
        check = world.vending.validate_customer_payment
        unknown = await check("daraja", "99999999999", AMOUNT_FOR_TESTS, None)
        too_small = await check("daraja", world.drns[0], Money(100, "KES"), None)
        answers = [
            json.loads(daraja.customer_validation_answer(refusal).body)["ResultCode"]
            for refusal in (unknown, too_small, None)
        ]
    assert answers == ["C2B00012", "C2B00013", "0"]
