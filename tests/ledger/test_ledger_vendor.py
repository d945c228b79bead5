"""The vendor part of the ledger contract (migration 0008), on every backend.

Floats move only with a movement row, a vend's debit is in the vend's transaction, an
idempotency key is claimed once per vendor, and the float always equals top-ups minus debits
plus refunds (a hypothesis state machine of sales, refusals, reversals and top-ups).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from datetime import timedelta
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.ledger import (
    DuplicateError,
    FloatDebit,
    Ledger,
    LedgerError,
    MeterNumber,
    NotFound,
    Purchase,
    PurchaseDraft,
    PurchaseState,
    VendDraft,
    new_purchase_id,
)
from gateway.ledger.vendor import (
    ClaimOutcome,
    FloatMovement,
    InsufficientFloat,
    MovementKind,
    TokenAlreadyIssued,
    VendorDraft,
    VendorKey,
    VendorLedger,
    VendorStatus,
    VendorSuspended,
)
from gateway.money import Money
from tests.ledger.ledger_support import FakeClock

METER = MeterNumber("01234567890")


def vendors_of(ledger: Ledger) -> VendorLedger:
    """The same ledger seen through its vendor port."""
    return cast("VendorLedger", ledger)


async def shop(ledger: Ledger, *, credit: int = 0, float_minor: int = 0) -> VendorLedger:
    """A vendor ``shop`` (KES, 2 % commission) with ``float_minor`` topped up."""
    vendors = vendors_of(ledger)
    await vendors.add_vendor(
        VendorDraft(
            vendor_id="shop",
            name="Corner shop",
            currency="KES",
            credit_limit_minor=credit,
            commission_bp=200,
        ),
        actor="test",
    )
    if float_minor:
        await vendors.top_up_float("shop", float_minor, reference="T0", actor="test")
    return vendors


async def sale(
    ledger: Ledger, key: str, *, amount: int = 10_000, tid: int | None = None
) -> Purchase:
    """A vendor purchase opened for ``key`` (the claim is the caller's)."""
    purchase = await ledger.open_purchase(
        PurchaseDraft(
            purchase_id=new_purchase_id(),
            channel="vendor",
            phone=None,
            meter=METER,
            amount=Money(amount, "KES"),
            units=34,
            tariff_id="domestic",
            idempotency_key=f"vendor:shop:{key}",
            provider="float",
        ),
        actor="test",
    )
    await vendors_of(ledger).attach_vendor_purchase("shop", key, purchase.purchase_id)
    return purchase


def float_vend(purchase: Purchase, *, tid: int, expected: int | None, debit: int) -> VendDraft:
    """The vend of a vendor sale, paid by ``debit`` off the float."""
    return VendDraft(
        purchase_id=purchase.purchase_id,
        meter=purchase.meter,
        tid=tid,
        expected_last_tid=expected,
        token=f"{tid:020d}",
        units=purchase.units,
        receipt=purchase.purchase_id,
        recipient=None,
        message="",
        float_debit=FloatDebit(
            vendor_id="shop",
            amount_minor=debit,
            commission_minor=purchase.amount.amount_minor - debit,
        ),
    )


async def test_vendor_registry_terminals_keys(ledger: Ledger) -> None:
    """Vendors, terminals and keys are registered once; a revoked key stays, inactive."""
    vendors = await shop(ledger)
    with pytest.raises(DuplicateError):
        await vendors.add_vendor(VendorDraft(vendor_id="shop", name="x", currency="KES"), actor="t")
    terminal = await vendors.add_terminal("shop", "till-1", label="Till 1")
    assert terminal.status is VendorStatus.ACTIVE
    with pytest.raises(DuplicateError):
        await vendors.add_terminal("shop", "till-1")
    with pytest.raises(NotFound):
        await vendors.add_terminal("nobody", "till-1")
    key = VendorKey(
        key_id="vk_1",
        vendor_id="shop",
        sealed_key=b"\x01" * 60,
        key_hash="cd" * 32,
        scopes=frozenset({"vend"}),
        terminal_id="till-1",
    )
    await vendors.add_vendor_key(key, actor="test")
    stored = await vendors.get_vendor_key("vk_1")
    assert stored is not None
    assert stored.active
    assert stored.scopes == {"vend"}
    assert stored.terminal_id == "till-1"
    assert (stored.sealed_key, stored.key_hash) == (b"\x01" * 60, "cd" * 32)
    assert stored.legacy_signing_key is None
    await vendors.revoke_vendor_key("vk_1", actor="test")
    revoked = await vendors.get_vendor_key("vk_1")
    assert revoked is not None
    assert not revoked.active
    assert await vendors.get_vendor_key("vk_2") is None
    suspended = await vendors.set_vendor_status("shop", VendorStatus.SUSPENDED, actor="test")
    assert suspended.status is VendorStatus.SUSPENDED
    assert [v.vendor_id for v in await vendors.list_vendors()] == ["shop"]


async def test_top_up_counts_once_per_reference(ledger: Ledger) -> None:
    """A top-up reference moves the float once; reused for another amount it is refused."""
    vendors = await shop(ledger)
    first = await vendors.top_up_float("shop", 50_000, reference="BANK-1", actor="ops")
    again = await vendors.top_up_float("shop", 50_000, reference="BANK-1", actor="ops")
    assert again.movement_id == first.movement_id
    with pytest.raises(DuplicateError):
        await vendors.top_up_float("shop", 60_000, reference="BANK-1", actor="ops")
    with pytest.raises(ValueError, match="positive"):
        await vendors.top_up_float("shop", 0, reference="BANK-2", actor="ops")
    assert (await vendors.get_vendor("shop")).balance_minor == 50_000


async def test_vend_debits_the_float_in_its_transaction(ledger: Ledger) -> None:
    """The vend takes its debit with it; a replay neither vends nor debits again."""
    vendors = await shop(ledger, float_minor=20_000)
    purchase = await sale(ledger, "k1")
    outcome = await ledger.record_vend(
        float_vend(purchase, tid=100, expected=None, debit=9_800), actor="vendor"
    )
    assert outcome.purchase.state is PurchaseState.VENDED
    assert (await vendors.get_vendor("shop")).balance_minor == 10_200
    # No customer phone: the vendor prints the token, no SMS is queued.
    assert await ledger.outbox_for(purchase.purchase_id) == []
    # A replay is the same vend, and no second debit.
    replay = await ledger.record_vend(
        float_vend(purchase, tid=101, expected=100, debit=9_800), actor="vendor"
    )
    assert replay.replayed
    assert replay.vend.token == outcome.vend.token
    assert (await vendors.get_vendor("shop")).balance_minor == 10_200
    kinds = [e.kind for e in await ledger.timeline(purchase.purchase_id)]
    assert "float_debit" in kinds
    assert "paid_from_float" in kinds
    assert "token_vended" in kinds


async def test_a_vend_the_float_cannot_pay_leaves_nothing(ledger: Ledger) -> None:
    """Below the credit limit the whole vend is refused: no vend, no debit, no TID spent."""
    vendors = await shop(ledger, credit=1_000, float_minor=5_000)
    purchase = await sale(ledger, "k1")
    with pytest.raises(InsufficientFloat) as refused:
        await ledger.record_vend(
            float_vend(purchase, tid=100, expected=None, debit=6_001), actor="vendor"
        )
    assert refused.value.available_minor == 6_000
    assert await ledger.get_vend(purchase.purchase_id) is None
    assert (await ledger.get_purchase(purchase.purchase_id)).state is PurchaseState.CREATED
    assert (await ledger.get_meter(METER)).last_tid is None  # the TID was not spent
    # Down to the credit limit exactly is allowed.
    await ledger.record_vend(
        float_vend(purchase, tid=100, expected=None, debit=6_000), actor="vendor"
    )
    assert (await vendors.get_vendor("shop")).balance_minor == -1_000


async def test_a_suspended_vendor_sells_nothing(ledger: Ledger) -> None:
    """A suspended vendor's vend is refused and its float untouched."""
    vendors = await shop(ledger, float_minor=50_000)
    await vendors.set_vendor_status("shop", VendorStatus.SUSPENDED, actor="ops")
    purchase = await sale(ledger, "k1")
    with pytest.raises(VendorSuspended):
        await ledger.record_vend(
            float_vend(purchase, tid=100, expected=None, debit=9_800), actor="vendor"
        )
    assert (await vendors.get_vendor("shop")).balance_minor == 50_000


async def test_the_float_pays_the_purchase_amount_only(ledger: Ledger) -> None:
    """A debit that does not pay the purchase's amount (less commission) is refused."""
    vendors = await shop(ledger, float_minor=50_000)
    purchase = await sale(ledger, "k1")
    draft = float_vend(purchase, tid=100, expected=None, debit=1)
    assert draft.float_debit is not None
    short = dataclasses.replace(
        draft, float_debit=dataclasses.replace(draft.float_debit, commission_minor=0)
    )
    with pytest.raises(LedgerError, match="does not pay it"):
        await ledger.record_vend(short, actor="vendor")
    assert await ledger.get_vend(purchase.purchase_id) is None
    assert (await vendors.get_vendor("shop")).balance_minor == 50_000


async def test_claims_are_once_per_vendor_and_key(ledger: Ledger, clock: FakeClock) -> None:
    """One run per (vendor, key): running, other body, answered, lease ended."""
    vendors = await shop(ledger)
    await vendors.add_vendor(VendorDraft(vendor_id="bank", name="Bank", currency="KES"), actor="t")
    first = await vendors.claim_vendor_request(
        "shop", "K", request_hash="h1", terminal_id="till-1", lease_s=30
    )
    assert first.outcome is ClaimOutcome.NEW
    running = await vendors.claim_vendor_request(
        "shop", "K", request_hash="h1", terminal_id="till-1", lease_s=30
    )
    assert running.outcome is ClaimOutcome.RUNNING
    other_body = await vendors.claim_vendor_request(
        "shop", "K", request_hash="h2", terminal_id="till-1", lease_s=30
    )
    assert other_body.outcome is ClaimOutcome.CONFLICT
    # The key is scoped by vendor.
    bank = await vendors.claim_vendor_request(
        "bank", "K", request_hash="h9", terminal_id=None, lease_s=30
    )
    assert bank.outcome is ClaimOutcome.NEW
    # A run whose process died: its lease ends, the next claim resumes it.
    clock.advance(31)
    resumed = await vendors.claim_vendor_request(
        "shop", "K", request_hash="h1", terminal_id="till-1", lease_s=30
    )
    assert resumed.outcome is ClaimOutcome.NEW
    body = b'{"vend_id":"P1","token":"x"}\n'
    done = await vendors.finish_vendor_request("shop", "K", status_code=201, response=body)
    assert done.response == body
    # The first answer stays.
    again = await vendors.finish_vendor_request("shop", "K", status_code=500, response=b"{}")
    assert (again.status_code, again.response) == (201, body)
    replay = await vendors.claim_vendor_request(
        "shop", "K", request_hash="h1", terminal_id="till-1", lease_s=30
    )
    assert replay.outcome is ClaimOutcome.DONE
    assert replay.request.response == body
    assert await vendors.get_vendor_request("shop", idempotency_key="nope") is None


async def test_concurrent_claims_of_one_key_give_one_run(ledger: Ledger) -> None:
    """Twenty concurrent claims of one key: exactly one run."""
    vendors = await shop(ledger)
    claims = await asyncio.gather(
        *(
            vendors.claim_vendor_request(
                "shop", "same", request_hash="h", terminal_id=None, lease_s=30
            )
            for _ in range(20)
        )
    )
    outcomes = [claim.outcome for claim in claims]
    assert outcomes.count(ClaimOutcome.NEW) == 1
    assert outcomes.count(ClaimOutcome.RUNNING) == 19


async def test_reversal_refunds_only_without_a_token(ledger: Ledger) -> None:
    """A sale with a token is not refunded; one without is closed, refunding its debit if any."""
    vendors = await shop(ledger, float_minor=30_000)
    await vendors.claim_vendor_request("shop", "k1", request_hash="h", terminal_id=None, lease_s=30)
    vended = await sale(ledger, "k1")
    await ledger.record_vend(float_vend(vended, tid=100, expected=None, debit=9_800), actor="v")
    with pytest.raises(TokenAlreadyIssued):
        await vendors.refund_float("shop", vended.purchase_id, actor="v")
    assert (await vendors.get_vendor("shop")).balance_minor == 20_200
    # A sale that never reached its vend: nothing debited, nothing refunded, closed.
    await vendors.claim_vendor_request("shop", "k2", request_hash="h", terminal_id=None, lease_s=30)
    never = await sale(ledger, "k2")
    assert await vendors.refund_float("shop", never.purchase_id, actor="v") is None
    assert (await ledger.get_purchase(never.purchase_id)).state is PurchaseState.EXPIRED
    with pytest.raises(NotFound):
        await vendors.refund_float("bank", vended.purchase_id, actor="v")


async def test_statement_balances(ledger: Ledger, clock: FakeClock) -> None:
    """Movements in a window, with the balance before and after it."""
    vendors = await shop(ledger)
    start = clock.now
    clock.advance(60)
    await vendors.top_up_float("shop", 40_000, reference="T1", actor="ops")
    clock.advance(60)
    await vendors.claim_vendor_request("shop", "k1", request_hash="h", terminal_id=None, lease_s=30)
    purchase = await sale(ledger, "k1")
    await ledger.record_vend(float_vend(purchase, tid=100, expected=None, debit=9_800), actor="v")
    clock.advance(60)
    middle = clock.now
    clock.advance(60)
    await vendors.top_up_float("shop", 1_000, reference="T2", actor="ops")
    moves = await vendors.float_movements("shop", since=start, until=middle)
    assert [(m.kind, m.amount_minor) for m in moves] == [
        (MovementKind.TOP_UP, 40_000),
        (MovementKind.DEBIT, -9_800),
    ]
    assert moves[1].purchase_id == purchase.purchase_id
    assert moves[1].commission_minor == 200  # 2 % of 10,000
    assert await vendors.float_balance_at("shop", start) == 0
    assert await vendors.float_balance_at("shop", middle) == 30_200
    assert await vendors.float_balance_at("shop", clock.now + timedelta(seconds=1)) == 31_200


async def test_nonces_are_remembered_for_the_window(ledger: Ledger, clock: FakeClock) -> None:
    """A nonce is refused again within the window, accepted once it is forgotten."""
    vendors = await shop(ledger)
    window = timedelta(seconds=300)
    assert await vendors.remember_nonce("shop", "n1", forget_before=clock.now - window)
    assert not await vendors.remember_nonce("shop", "n1", forget_before=clock.now - window)
    assert await vendors.remember_nonce("other", "n1", forget_before=clock.now - window)
    clock.advance(301)
    assert await vendors.remember_nonce("shop", "n1", forget_before=clock.now - window)


# -- the float invariant ------------------------------------------------------------------------

_ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("top_up"), st.integers(1, 30_000)),
        st.tuples(st.just("sale"), st.integers(1_000, 40_000)),
        st.tuples(st.just("reverse"), st.integers(0, 30)),
        st.tuples(st.just("replay"), st.integers(0, 30)),
    ),
    min_size=1,
    max_size=25,
)


async def _open_sale(ledger: Ledger, vendor_id: str, key: str, amount: int) -> Purchase:
    vendors = vendors_of(ledger)
    await vendors.claim_vendor_request(
        vendor_id, key, request_hash="h", terminal_id=None, lease_s=30
    )
    purchase = await ledger.open_purchase(
        PurchaseDraft(
            purchase_id=new_purchase_id(),
            channel="vendor",
            phone=None,
            meter=METER,
            amount=Money(amount, "KES"),
            units=10,
            tariff_id="domestic",
            idempotency_key=f"vendor:{key}",
            provider="float",
        ),
        actor="prop",
    )
    await vendors.attach_vendor_purchase(vendor_id, key, purchase.purchase_id)
    return purchase


async def _try_vend(ledger: Ledger, vendor_id: str, purchase: Purchase) -> None:
    """Vend the sale from the float; a refusal (float short, sale reversed) writes nothing."""
    meter = await ledger.get_meter(METER)
    tid = (meter.last_tid or 0) + 1
    draft = VendDraft(
        purchase_id=purchase.purchase_id,
        meter=METER,
        tid=tid,
        expected_last_tid=meter.last_tid,
        token=f"{tid:020d}",
        units=10,
        receipt=None,
        recipient=None,
        message="",
        float_debit=FloatDebit(
            vendor_id=vendor_id, amount_minor=purchase.amount.amount_minor, commission_minor=0
        ),
    )
    with contextlib.suppress(LedgerError):
        await ledger.record_vend(draft, actor="prop")


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(actions=_ACTIONS, credit=st.integers(0, 20_000))
async def test_the_float_is_top_ups_minus_debits_plus_refunds(
    ledger: Ledger, actions: list[tuple[str, int]], credit: int
) -> None:
    """Any sequence of sales, refusals, reversals and replays keeps the float's books."""
    vendors = vendors_of(ledger)
    vendor_id = f"v{new_purchase_id()}".lower()
    await vendors.add_vendor(
        VendorDraft(vendor_id=vendor_id, name="V", currency="KES", credit_limit_minor=credit),
        actor="prop",
    )
    sales: list[Purchase] = []
    for step, (action, value) in enumerate(actions):
        if action == "top_up":
            await vendors.top_up_float(vendor_id, value, reference=f"T{step}", actor="prop")
        elif action == "sale":
            sales.append(await _open_sale(ledger, vendor_id, f"{vendor_id}-{step}", value))
            await _try_vend(ledger, vendor_id, sales[-1])
        elif sales and action == "reverse":
            with contextlib.suppress(TokenAlreadyIssued):
                await vendors.refund_float(
                    vendor_id, sales[value % len(sales)].purchase_id, actor="p"
                )
        elif sales:  # a replayed vend never debits twice, nor vends a reversed sale
            await _try_vend(ledger, vendor_id, sales[value % len(sales)])
    vendor = await vendors.get_vendor(vendor_id)
    far = vendor.created_at + timedelta(days=1)
    moves = await vendors.float_movements(vendor_id, since=vendor.created_at, until=far)
    top_ups = sum(m.amount_minor for m in moves if m.kind is MovementKind.TOP_UP)
    debits = -sum(m.amount_minor for m in moves if m.kind is MovementKind.DEBIT)
    refunds = sum(m.amount_minor for m in moves if m.kind is MovementKind.REFUND)
    assert vendor.balance_minor == top_ups - debits + refunds
    assert vendor.balance_minor >= -credit
    for purchase in sales:
        vend = await ledger.get_vend(purchase.purchase_id)
        mine = [m for m in moves if m.purchase_id == purchase.purchase_id]
        kinds = sorted(m.kind for m in mine)
        if vend is not None:  # no vend without a debit, and never refunded
            assert kinds == [MovementKind.DEBIT]
            assert -mine[0].amount_minor == purchase.amount.amount_minor
        else:  # no debit without a vend or a refund
            assert kinds in ([], [MovementKind.DEBIT, MovementKind.REFUND])
            assert sum(m.amount_minor for m in mine) == 0


async def test_a_failing_write_in_the_same_batch_leaves_the_others_whole(ledger: Ledger) -> None:
    """Writes batched with one that fails are run again afresh: each gets its own answer."""
    vendors = await shop(ledger)
    clock_window = (await vendors.get_vendor("shop")).created_at - timedelta(seconds=300)
    results = await asyncio.gather(
        vendors.add_vendor(VendorDraft(vendor_id="shop", name="x", currency="KES"), actor="t"),
        *(vendors.remember_nonce("shop", f"n{i}", forget_before=clock_window) for i in range(10)),
        *(vendors.top_up_float("shop", 100, reference=f"R{i}", actor="t") for i in range(10)),
        return_exceptions=True,
    )
    assert isinstance(results[0], DuplicateError)
    assert results[1:11] == [True] * 10
    top_ups = [r for r in results[11:] if isinstance(r, FloatMovement)]
    assert sorted(m.reference for m in top_ups) == sorted(f"R{i}" for i in range(10))
    assert (await vendors.get_vendor("shop")).balance_minor == 1_000
