"""Key rotation: the next purchase after ``plan_key_rotation`` delivers the key change first.

Proved with the meter emulator: the SMS's tokens, keyed in in order, move the meter to the new
key (with a rollover from the 1993 base date) and credit it; later tokens are accepted too.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.ledger import (
    KeyChangeState,
    KeyRotation,
    Ledger,
    MeterNumber,
    MeterRecord,
    OutboxState,
    Purchase,
    PurchaseState,
    open_sqlite_ledger,
)
from gateway.sts import (
    CreditAdded,
    KeyChanged,
    LocalTokenEngine,
    MeterEmulator,
    VendingKey,
    Verdict,
)
from gateway.vending import VendFailed, Vending
from tests.vending.vending_support import (
    AMOUNT_FOR_TESTS,
    PHONE,
    VENDING_KEY,
    FakeClock,
    FakeProvider,
    make_drn,
    meter_record,
    profile_of,
    seed,
)

NEW_KEY = VendingKey(sgc="123457", krn=2, dkga=4, base_date=2014, key=bytes.fromhex("5e7a" * 10))
OLD_1993_KEY = VendingKey(
    sgc="123457", krn=1, dkga=4, base_date=1993, key=bytes.fromhex("1993" * 10)
)
TO_KRN_2 = KeyRotation(sgc="123457", from_krn=1, to_krn=2, to_base_date=2014)
_GROUPED = re.compile(r"\b\d{4}(?:-\d{4}){4}\b")


@dataclass
class Rig:
    """A saga whose engine holds the old and the new key, and a meter emulator."""

    ledger: Ledger
    vending: Vending
    provider: FakeProvider
    clock: FakeClock
    drn: str
    observed: list[tuple[str, float]]

    async def buy(self, key: str) -> Purchase:
        """A purchase for the meter, requested, proven and vended."""
        purchase = await self.vending.start_purchase(
            channel="ussd",
            phone=PHONE,
            meter=self.drn,
            amount=AMOUNT_FOR_TESTS,
            idempotency_key=key,
        )
        purchase = await self.vending.request_payment(purchase.purchase_id)
        assert purchase.provider_reference is not None
        self.provider.settle(purchase.provider_reference, amount=AMOUNT_FOR_TESTS)
        return await self.vending.confirm(purchase.purchase_id)

    async def sms_tokens(self, purchase: Purchase) -> list[str]:
        """The 20-digit tokens of the purchase's token SMS, in the order they appear."""
        (message,) = await self.ledger.outbox_for(purchase.purchase_id)
        return [group.replace("-", "") for group in _GROUPED.findall(message.body)]


class Recorder:
    """A ``SagaObserver`` keeping what it was told."""

    def __init__(self, into: list[tuple[str, float]]) -> None:
        self.into = into

    def payment_confirmed(self, seconds: float) -> None:
        """Keep a confirmation latency."""
        self.into.append(("payment_confirmed", seconds))

    def vended(self, seconds: float) -> None:
        """Keep a vend latency."""
        self.into.append(("vended", seconds))

    def security_event(self, kind: str) -> None:
        """Security events are not what these tests keep."""


async def _rig(tmp_path: Path, old_key: VendingKey, keys: list[VendingKey]) -> AsyncIterator[Rig]:
    clock = FakeClock()
    provider = FakeProvider()
    drn = make_drn(7)
    observed: list[tuple[str, float]] = []
    async with open_sqlite_ledger(tmp_path / "ledger.db", clock=clock) as ledger:
        await seed(ledger, [])
        await ledger.put_meter(meter_record(drn, base_date=old_key.base_date))
        vending = Vending(
            ledger=ledger,
            engine=LocalTokenEngine(keys),
            providers={provider.name: provider},
            default_provider=provider.name,
            clock=clock,
            observer=Recorder(observed),
        )
        yield Rig(ledger, vending, provider, clock, drn, observed)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """Meter on the 2014 key KRN 1; the engine holds KRN 1 and KRN 2."""
    async for made in _rig(tmp_path, VENDING_KEY, [VENDING_KEY, NEW_KEY]):
        yield made


@pytest.fixture
async def rig_1993(tmp_path: Path) -> AsyncIterator[Rig]:
    """Meter on a 1993 key KRN 1; the engine holds it and the 2014 key KRN 2."""
    async for made in _rig(tmp_path, OLD_1993_KEY, [OLD_1993_KEY, NEW_KEY]):
        yield made


def emulator_for(meter: MeterRecord, key: VendingKey, depth: int = 8) -> MeterEmulator:
    """A meter emulator keyed like ``meter`` under ``key``."""
    return MeterEmulator.for_profile(profile_of(meter), key, tid_store_depth=depth)


async def test_next_purchase_delivers_the_key_change_then_the_credit(rig: Rig) -> None:
    """KCTs first, then a credit token the meter takes under its new key; later ones too."""
    meter = emulator_for(await rig.ledger.get_meter(rig.drn), VENDING_KEY)
    before = await rig.buy("before")
    (plain,) = await rig.sms_tokens(before)
    assert meter.enter(plain).verdict is Verdict.ACCEPTED
    await rig.ledger.plan_key_rotation(TO_KRN_2, actor="operator")

    rotated = await rig.buy("rotated")
    assert rotated.state is PurchaseState.VENDED
    *kcts, credit = await rig.sms_tokens(rotated)
    assert len(kcts) == 2  # same SGC on EA07: sections 3 and 4
    responses = [meter.enter(token) for token in [*kcts, credit]]
    assert [r.verdict for r in responses] == [
        Verdict.KEY_CHANGE_PENDING,
        Verdict.ACCEPTED,
        Verdict.ACCEPTED,
    ]
    assert isinstance(responses[1].change, KeyChanged)
    assert not responses[1].change.rollover
    assert isinstance(responses[2].change, CreditAdded)
    assert meter.attributes.krn == 2
    stored = await rig.ledger.get_meter(rig.drn)
    assert (stored.krn, stored.base_date) == (2, 2014)
    (change,) = await rig.ledger.key_changes(MeterNumber(rig.drn))
    assert (change.state, change.purchase_id) == (KeyChangeState.APPLIED, rotated.purchase_id)

    later = await rig.buy("later")
    (next_token,) = await rig.sms_tokens(later)
    assert meter.enter(next_token).verdict is Verdict.ACCEPTED


async def test_a_replayed_vend_returns_the_same_tokens(rig: Rig) -> None:
    """Vending the rotated purchase again returns the stored KCTs and token; nothing is queued."""
    await rig.ledger.plan_key_rotation(TO_KRN_2, actor="operator")
    rotated = await rig.buy("rotated")
    first = await rig.vending.vend(rotated.purchase_id)
    again = await rig.vending.vend(rotated.purchase_id)
    await rig.vending.confirm(rotated.purchase_id)
    assert (again.token, again.key_change_tokens) == (first.token, first.key_change_tokens)
    assert len(first.key_change_tokens) == 2
    assert await rig.sms_tokens(rotated) == [*first.key_change_tokens, first.token]
    reprint = await rig.vending.reprint(rotated.purchase_id)
    reprinted = [g.replace("-", "") for g in _GROUPED.findall(reprint.body)]
    assert reprinted == [*first.key_change_tokens, first.token]


async def test_a_1993_meter_fails_visibly_until_rotated_then_rolls_over(rig_1993: Rig) -> None:
    """Past 2024-11-24 a 1993 key fails visibly (VEND_FAILED); rotated, the sweep vends it: RO=1."""
    rig = rig_1993
    meter = emulator_for(await rig.ledger.get_meter(rig.drn), OLD_1993_KEY, depth=1)
    rig.clock.now = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
    early = await rig.buy("2024")
    (old_token,) = await rig.sms_tokens(early)
    assert meter.enter(old_token).verdict is Verdict.ACCEPTED  # the store now holds a high TID

    rig.clock.now = datetime(2026, 3, 14, 9, 0, tzinfo=UTC)
    with pytest.raises(VendFailed, match="TID range"):
        await rig.buy("stuck")
    (stuck,) = await rig.ledger.find_purchases(states=[PurchaseState.VEND_FAILED])

    await rig.ledger.plan_key_rotation(TO_KRN_2, actor="operator")
    assert (await rig.ledger.get_purchase(stuck.purchase_id)).state is PurchaseState.PAID
    assert await rig.vending.finish_paid() == 1  # the sweeper's step
    *kcts, credit = await rig.sms_tokens(stuck)
    responses = [meter.enter(token) for token in [*kcts, credit]]
    assert [r.verdict for r in responses] == [
        Verdict.KEY_CHANGE_PENDING,
        Verdict.ACCEPTED,
        Verdict.ACCEPTED,
    ]
    assert isinstance(responses[1].change, KeyChanged)
    assert responses[1].change.rollover
    assert meter.attributes.base_date == 2014
    stored = await rig.ledger.get_meter(rig.drn)
    assert stored.base_date == 2014
    assert stored.last_tid is not None
    assert stored.last_tid < 2**24 // 2  # counted from 2014 again

    later = await rig.buy("later")
    (next_token,) = await rig.sms_tokens(later)
    assert meter.enter(next_token).verdict is Verdict.ACCEPTED


async def test_a_key_not_loaded_yet_defers_the_change_and_still_vends(tmp_path: Path) -> None:
    """Without the new key in the engine, the credit is made under the old key; still pending."""
    async for rig in _rig(tmp_path, VENDING_KEY, [VENDING_KEY]):
        meter = emulator_for(await rig.ledger.get_meter(rig.drn), VENDING_KEY)
        await rig.ledger.plan_key_rotation(TO_KRN_2, actor="operator")
        purchase = await rig.buy("p")
        (token,) = await rig.sms_tokens(purchase)
        assert meter.enter(token).verdict is Verdict.ACCEPTED
        (change,) = await rig.ledger.key_changes(MeterNumber(rig.drn))
        assert change.state is KeyChangeState.PENDING


async def test_the_observer_hears_each_confirmation_and_vend_once(rig: Rig) -> None:
    """One purchase: one confirmation latency (since the request), one vend latency; no replays."""
    purchase = await rig.vending.start_purchase(
        channel="ussd", phone=PHONE, meter=rig.drn, amount=AMOUNT_FOR_TESTS, idempotency_key="o"
    )
    purchase = await rig.vending.request_payment(purchase.purchase_id)
    assert purchase.provider_reference is not None
    rig.clock.advance(12)
    rig.provider.settle(purchase.provider_reference, amount=AMOUNT_FOR_TESTS)
    await rig.vending.confirm(purchase.purchase_id)
    await rig.vending.confirm(purchase.purchase_id)
    await rig.vending.vend(purchase.purchase_id)
    kinds = [kind for kind, _ in rig.observed]
    assert kinds == ["vended", "payment_confirmed"]
    assert rig.observed[1][1] == pytest.approx(12)
    assert rig.observed[0][1] >= 0


async def test_a_failing_observer_never_breaks_a_purchase(rig: Rig) -> None:
    """An observer that raises is logged; the purchase is vended all the same."""

    class Broken:
        def payment_confirmed(self, seconds: float) -> None:
            raise RuntimeError(seconds)

        def vended(self, seconds: float) -> None:
            raise RuntimeError(seconds)

        def security_event(self, kind: str) -> None:
            raise RuntimeError(kind)

    rig.vending._observer = Broken()
    purchase = await rig.buy("x")
    assert purchase.state is PurchaseState.VENDED
    (message,) = await rig.ledger.outbox_for(purchase.purchase_id)
    assert message.state is OutboxState.PENDING


async def test_a_new_supply_group_and_tariff_index_take_two_tokens(tmp_path: Path) -> None:
    """A rotation to another SGC and TI sends the two-token set (3KCT = 0, as CTSA19.4 does).

    The meter takes the new key (the SGC is part of it): the credit under it is accepted.
    """
    other_group = VendingKey(
        sgc="600123", krn=1, dkga=4, base_date=2014, key=bytes.fromhex("7c3d" * 10)
    )
    async for rig in _rig(tmp_path, VENDING_KEY, [VENDING_KEY, other_group]):
        meter = emulator_for(await rig.ledger.get_meter(rig.drn), VENDING_KEY)
        rotation = KeyRotation(
            sgc="123457",
            from_krn=1,
            to_krn=1,
            to_base_date=2014,
            to_sgc="600123",
            to_tariff_index="07",
        )
        await rig.ledger.plan_key_rotation(rotation, actor="operator")
        purchase = await rig.buy("moved")
        *kcts, credit = await rig.sms_tokens(purchase)
        assert len(kcts) == 2
        verdicts = [meter.enter(token).verdict for token in [*kcts, credit]]
        assert verdicts == [Verdict.KEY_CHANGE_PENDING, Verdict.ACCEPTED, Verdict.ACCEPTED]
        assert meter.attributes.tariff_index == "07"
        stored = await rig.ledger.get_meter(rig.drn)
        assert (stored.sgc, stored.krn, stored.tariff_index) == ("600123", 1, "07")


async def test_fbe_waits_for_the_purchase_after_a_key_change(rig: Rig) -> None:
    """The vend delivering a key change carries no FBE; the next one does, under the new key."""
    await rig.ledger.set_fbe_allowance("domestic", 50, actor="operator")
    meter = emulator_for(await rig.ledger.get_meter(rig.drn), VENDING_KEY)
    await rig.ledger.plan_key_rotation(TO_KRN_2, actor="operator")
    rotated = await rig.buy("rotated")
    assert await rig.ledger.fbe_issues(rig.drn) == []
    for token in await rig.sms_tokens(rotated):
        assert meter.enter(token).verdict in {Verdict.KEY_CHANGE_PENDING, Verdict.ACCEPTED}
    later = await rig.buy("later")
    (issue,) = await rig.ledger.fbe_issues(rig.drn)
    assert issue.purchase_id == later.purchase_id
    vend = await rig.ledger.get_vend(later.purchase_id)
    assert vend is not None
    for token, units in ((vend.token, 40), (issue.token, 50)):
        response = meter.enter(token)
        assert response.verdict is Verdict.ACCEPTED
        assert isinstance(response.change, CreditAdded)
        assert response.change.amount == units


async def test_after_a_rollover_a_tid_equal_to_a_1993_one_is_vended(rig_1993: Rig) -> None:
    """A 2014 TID equal to a TID vended under 1993 (21 years later) is a new token: vended.

    Issue 16: ``UNIQUE (meter, tid)`` across base dates refused it (DuplicateError) and the paid
    purchase waited a minute for the next TID.
    """
    rig = rig_1993
    meter = emulator_for(await rig.ledger.get_meter(rig.drn), OLD_1993_KEY)
    bought_at = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
    rig.clock.now = bought_at
    old = await rig.buy("1993")
    (old_token,) = await rig.sms_tokens(old)
    assert meter.enter(old_token).accepted
    old_vend = await rig.ledger.get_vend(old.purchase_id)
    assert old_vend is not None

    await rig.ledger.plan_key_rotation(TO_KRN_2, actor="operator")
    rig.clock.now = datetime(2026, 3, 14, 9, 0, tzinfo=UTC)
    rolled = await rig.buy("rollover")
    assert [meter.enter(t).accepted for t in await rig.sms_tokens(rolled)] == [True] * 3

    # The same number of minutes from 2014 as the old token's from 1993: the same TID.
    rig.clock.now = datetime(2014, 1, 1, tzinfo=UTC) + (
        bought_at - datetime(1993, 1, 1, tzinfo=UTC)
    )
    clash = await rig.buy("2045")
    assert clash.state is PurchaseState.VENDED
    vend = await rig.ledger.get_vend(clash.purchase_id)
    assert vend is not None
    assert vend.tid == old_vend.tid
    (token,) = await rig.sms_tokens(clash)
    assert meter.enter(token).verdict is Verdict.ACCEPTED
