"""The product's promise under load, faults and SIGKILLs, checked by an auditor that trusts nothing.

``bench/load.py`` runs ``gateway sim`` and ``gateway serve`` as separate processes, buys by USSD,
SMS and C2B with every fault switch on while the gateway is SIGKILLed and restarted, waits for
the tokens, and hands the simulators' records to ``bench/audit.py``'s auditor (money taken, SMS
carried, every token keyed into a meter emulator).

Bugs this harness found are pinned by directed tests below (see docs/performance.md). Three were
fixed during the day (62f5884: a push accepted just before a kill was pushed again, charging
twice; 145be70: two racing payment requests pushed twice; a purchase committed just before a kill
was never prompted, now that its first check is stored with it); their tests now guard the fixes.
The push of unknown outcome whose callback is lost too (the open half of 62f5884) is found in
Daraja's Pull Transactions by payer, amount and time; its former strict xfail guards that. A
paybill purchase caught by a kill before its receipt was attached is never prompted
(tests/vending/test_c2b_crash.py). The front-running replay the ``--attacks`` run found (a receipt
posted as another meter's C2B TransID before its own confirmation or STK callback) is checked
against Daraja's Transaction Status record (payer, amount, ReasonType) before it may take the
receipt; its two former strict xfails guard that. The audited run is strict: its drain must end
``recovered`` and every auditor count must be zero.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import load_token_engine
from gateway.commands.sim import SimWorld, build_world, serve_world
from gateway.demo_data import seed_demo
from gateway.ledger import Ledger, Purchase, PurchaseDraft, new_purchase_id, open_ledger
from gateway.money import Money
from gateway.payments import CollectionRequest, PaymentProvider
from gateway.payments.daraja import DarajaProvider
from gateway.phone import Msisdn
from gateway.sim.daraja import DarajaSimulator
from gateway.sts import LocalTokenEngine, MeterProfile, VendingKey
from gateway.sweeper import Sweeper
from gateway.vending import Vending

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
async def test_audited_run_with_every_fault_and_kills_finds_nothing_wrong(tmp_path: Path) -> None:
    """Under every fault switch and several SIGKILLs, the run recovers and the audit is clean.

    The drain must end ``recovered`` (every payment has its token delivered, nothing is pending
    recovery, no second charge) and every auditor count is zero: nothing is excused.
    """
    load = _bench("load")
    faults = dataclasses.replace(load.Faults.all_on(), query_timeouts=0.005)
    settings = load.LoadSettings(
        # A count, not a duration: on a 2-core machine shared with other work, 30 s of load gave
        # fewer than 1,000 charges. The kills come within the first ~20 s; the drain is bounded by
        # the slowest recovery: a push Daraja accepted just before a kill whose callback the kill
        # lost, found by Pull Transactions once the prompt's lifetime (90 s) has passed, at the
        # next 30 s check. So the run takes about 2 minutes however fast the load goes.
        purchases=1400,
        duration_s=None,
        concurrency=32,
        meters=400,
        faults=faults,
        kills=4,
        kill_every_s=(2.0, 4.0),
        drain_timeout_s=160.0,
        seed=8,
        workdir=tmp_path,
        show_progress=False,
        # bench/attacks.py's forged callbacks, racing the load and the kills (the attacker
        # knows the callback secret): they must change nothing the auditor sees.
        attacks=2,
    )
    result = await load.run_load(settings)
    audit: dict[str, Any] = result.audit
    summary = "\n".join(result.lines)
    assert result.figures["kills"] >= 4, summary
    assert audit["charges"] >= 1000, summary
    assert result.chaos["counts"]["lost"] > 0, summary
    assert result.chaos["counts"]["duplicated"] > 0, summary
    assert result.chaos["counts"]["sms_errors"] > 0, summary
    assert result.figures["drain_end"] == "recovered", summary
    assert result.figures["drain_pending"] == 0, summary
    for name in (*_bench("audit").FAILING_COUNTS, "charged_twice", "paid_unseen_by_operator"):
        assert audit[name] == 0, summary
    attacks = result.figures["attacks"]
    assert all(row["tried"] >= 1 for row in attacks.values()), summary
    assert all(row["succeeded"] == 0 for row in attacks.values()), summary
    assert result.ok, summary


def test_attack_outcomes_are_read_from_the_simulators_records() -> None:
    """A token to an attacker who never paid, or a paid attack purchase without its token."""
    attacks = _bench("attacks")
    tried = [
        attacks.Tried(case="forged_success", phone="254790000001", reference="ws_CO_1"),
        attacks.Tried(case="forged_failure", phone="254790000002", reference="ws_CO_2"),
        attacks.Tried(case="forged_failure", phone="254790000003", reference="ws_CO_3"),
        attacks.Tried(
            case="forged_c2b_status_race", phone="254790000004", meter="1", receipt="MADEUP0001"
        ),
        attacks.Tried(case="receipt_replay", phone="254790000005", receipt="PZ", victim="2547100"),
    ]
    charges = [{"msisdn": "254790000002"}, {"msisdn": "254790000003"}]
    text = "Electricity token 1111-2222-3333-4444-555{}. 3.4 kWh for KES 100.00. Meter 1."
    sms = [
        {"to": "+254790000001", "text": text.format(5) + " Receipt PX."},
        {"to": "+254790000003", "text": text.format(6) + " Receipt PY."},
    ]
    table = attacks.outcomes(tried, charges, sms)
    assert table["forged_success"] == {"tried": 1, "succeeded": 1}
    assert table["forged_failure"] == {"tried": 2, "succeeded": 1}  # 0000002 got no token
    assert table["forged_c2b_status_race"] == {"tried": 1, "succeeded": 0}
    assert table["receipt_replay"] == {"tried": 1, "succeeded": 1}  # the payer got no token


async def test_a_paid_purchase_without_token_in_a_state_no_operator_list_shows_is_unseen(
    tmp_path: Path,
) -> None:
    """Payment failed or expired, or no purchase at all: unseen; awaiting or paid: seen."""
    import sqlite3  # noqa: PLC0415 - only here

    load = _bench("load")
    db = tmp_path / "gateway.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE purchases (purchase_id, state, channel, provider_reference)")
        conn.execute("CREATE TABLE payments (purchase_id, reference)")
        conn.executemany(
            "INSERT INTO purchases VALUES (?, ?, ?, ?)",
            [
                ("P1", "payment_failed", "ussd", "ws_1"),
                ("P2", "paid", "ussd", "ws_2"),
                ("P3", "expired", "sms", None),
                ("P4", "expired", "c2b", "TRANS4"),  # a paybill ended unpaid: on a list
            ],
        )
        conn.execute("INSERT INTO payments VALUES ('P3', 'RCPT3')")
    reader = load.LedgerReader(f"sqlite:///{db}")
    references = ["ws_1", "ws_2", "RCPT3", "TRANS4", "ws_9"]
    unseen = await load.paid_unseen_by_operator(reader, references)
    assert unseen == ["ws_1: payment_failed", "RCPT3: expired", "ws_9: no purchase"]


def test_the_drain_tells_recovered_settled_and_timeout() -> None:
    """Pending: money without a delivered token (second charges aside), paid not vended."""
    load = _bench("load")
    audit = _bench("audit")
    report = audit.AuditReport(paid_without_token=2, charged_twice=1, undelivered_tokens=1)
    assert load.drain_pending(report, 3) == 2 - 1 + 1 + 3
    assert load.drain_end(0, 0) == "recovered"
    assert load.drain_end(0, 1) == "settled"
    assert load.drain_end(1, 0) == "timeout"


@pytest.fixture
async def daraja() -> AsyncIterator[tuple[DarajaSimulator, str]]:
    """A Daraja simulator on loopback and its base URL."""
    sim = DarajaSimulator(seed=5)
    server = TestServer(sim.app)
    await server.start_server()
    try:
        yield sim, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


class _Killed(BaseException):
    """The SIGKILL, as seen from inside the saga: nothing after it runs."""


class _DiesAfterPush:
    """A provider whose process is killed right after the provider accepted the push."""

    idempotent_requests = False  # the saga guards unknown outcomes (as for STK)

    def __init__(self, inner: DarajaProvider) -> None:
        self._inner = inner

    async def request_collection(self, request: CollectionRequest) -> None:
        await self._inner.request_collection(request)
        raise _Killed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def _crash_after_push(
    sim: DarajaSimulator,
    base_url: str,
    tmp_path: Path,
    phone: Msisdn,
    *,
    restart_after_s: float = 0,
) -> tuple[Vending, str, AsyncExitStack]:
    """A purchase whose push Daraja accepted as the gateway died; the restarted saga and it.

    The restarted saga's clock runs ``restart_after_s`` ahead of the wall clock (the restart
    came that much later).
    """
    stack = AsyncExitStack()
    ledger = await stack.enter_async_context(open_ledger(f"sqlite:///{tmp_path / 'g.db'}"))
    session = await stack.enter_async_context(aiohttp.ClientSession())
    master_key = secrets.token_bytes(32)
    await seed_demo(ledger, master_key)
    engine = await load_token_engine(ledger, master_key)

    def process(*, dies: bool, ahead_s: float = 0) -> Vending:
        provider = DarajaProvider(
            session,
            base_url=base_url,
            consumer_key=sim.consumer_key,
            consumer_secret=sim.consumer_secret,
            shortcode=sim.shortcode,
            passkey=sim.passkey,
            callback_url="http://127.0.0.1:9/lost",  # the callback is lost
        )
        chosen = cast("PaymentProvider", _DiesAfterPush(provider) if dies else provider)
        return Vending(
            ledger=ledger,
            engine=engine,
            providers={"daraja": chosen},
            default_provider="daraja",
            clock=lambda: datetime.now(UTC) + timedelta(seconds=ahead_s),
        )

    before = process(dies=True)
    purchase = await before.start_purchase(
        channel="ussd",
        phone=phone,
        meter="04000000010",
        amount=Money(10_000, "KES"),
        idempotency_key=f"ussd:crash-after-push:{phone}",
    )
    with pytest.raises(_Killed):
        await before.request_payment(purchase.purchase_id)
    return process(dies=False, ahead_s=restart_after_s), purchase.purchase_id, stack


async def test_stk_push_accepted_before_a_crash_charges_the_customer_once(
    daraja: tuple[DarajaSimulator, str], tmp_path: Path
) -> None:
    """A push Daraja accepted just before the gateway died is not pushed (and charged) again.

    (Found by the audited run with kills; fixed in 62f5884, this test was its strict xfail.)
    """
    sim, base_url = daraja
    after, purchase_id, stack = await _crash_after_push(
        sim, base_url, tmp_path, Msisdn("+254711000001")
    )
    async with stack:
        await after.check_payment(purchase_id)  # the restarted sweeper's step
        await sim.settle()
    assert len([c for c in sim.ledger() if c.msisdn == "254711000001"]) == 1


async def test_push_accepted_before_a_crash_with_its_callback_lost_still_vends(
    daraja: tuple[DarajaSimulator, str], tmp_path: Path
) -> None:
    """Money Daraja took for a push of unknown outcome becomes a token even with no callback.

    (Was the strict xfail of the open half of bug 1: Pull Transactions now finds the payment by
    payer, amount and time once the prompt's lifetime has passed.)
    """
    sim, base_url = daraja
    after, purchase_id, stack = await _crash_after_push(
        sim, base_url, tmp_path, Msisdn("+254711000004"), restart_after_s=120
    )
    async with stack:
        await sim.settle()  # the customer answered the prompt while the gateway was down
        for _ in range(3):  # the restarted sweeper, several times
            await after.check_payment(purchase_id)
        vend = await cast("Ledger", after.ledger).get_vend(purchase_id)  # the whole ledger
    assert [c.msisdn for c in sim.ledger()] == ["254711000004"]
    assert vend is not None


# --- the auditor itself: each count catches what it names ----------------------------------------

AUDIT_KEY_HEX = "0123456789abcdef0123456789abcdef01234567"
AUDIT_METER = "05000000017"


def _auditor_world() -> tuple[ModuleType, dict[str, Any], Any]:
    """The auditor module, one meter's profile and the vending key (as the harness writes them)."""
    audit = _bench("audit")
    profile = MeterProfile(drn=AUDIT_METER, sgc="600001", tariff_index="01", krn=1)
    key = VendingKey(sgc="600001", krn=1, dkga=4, base_date=2014, key=bytes.fromhex(AUDIT_KEY_HEX))
    return audit, {AUDIT_METER: profile}, key


def _token(meters: dict[str, Any], key: Any, tid: int, units: int = 34) -> str:
    engine = LocalTokenEngine([key])
    digits: str = engine.credit_token_sync(meters[AUDIT_METER], units, tid).digits
    return "-".join(digits[i : i + 4] for i in range(0, 20, 4))


def _charge(audit: ModuleType, reference: str, msisdn: str = "254711000001") -> Any:
    return audit.Charge(
        provider="daraja",
        reference=reference,
        receipt=reference,
        msisdn=msisdn,
        amount_minor=10_000,
        currency="KES",
        account=AUDIT_METER,
    )


def _sms(token: str, receipt: str, to: str = "+254711000001") -> dict[str, Any]:
    text = (
        f"Electricity token {token}. 3.4 kWh for KES 100.00. Meter {AUDIT_METER}."
        f" Receipt {receipt}."
    )
    return {"message_id": f"ATXid_{receipt}{token[-4:]}", "to": to, "text": text,
            "accepted_at": 1.0, "reports": ["Sent", "Success"]}  # fmt: skip


def test_auditor_passes_one_paid_delivered_accepted_token() -> None:
    """A payment whose token reached the payer and that the meter accepts gives all zeros."""
    audit, meters, key = _auditor_world()
    report = audit.audit(
        [_charge(audit, "RCPT000001")], [_sms(_token(meters, key, 100), "RCPT000001")], meters, key
    )
    assert report.ok, report.lines()


def test_auditor_counts_a_second_token_for_one_payment_as_a_double_vend() -> None:
    """Two distinct tokens carrying one payment's receipt are one double vend."""
    audit, meters, key = _auditor_world()
    messages = [_sms(_token(meters, key, t), "RCPT000001") for t in (100, 101)]
    report = audit.audit([_charge(audit, "RCPT000001")], messages, meters, key)
    assert (report.double_vends, report.ok) == (1, False)


def test_auditor_counts_money_taken_without_any_token() -> None:
    """A charge no SMS accounts for is paid without token (not a double charge: no token)."""
    audit, meters, key = _auditor_world()
    report = audit.audit([_charge(audit, "RCPT000001")], [], meters, key)
    assert (report.paid_without_token, report.charged_twice) == (1, 0)


def test_auditor_counts_a_token_nobody_paid_for() -> None:
    """A token whose receipt, payer, meter and amount match no charge has no payment."""
    audit, meters, key = _auditor_world()
    report = audit.audit([], [_sms(_token(meters, key, 100), "PURCHASE123")], meters, key)
    assert report.token_without_payment == 1


def test_auditor_counts_a_token_that_never_reached_the_payer() -> None:
    """A token sent to another phone, or never reported delivered, is undelivered."""
    audit, meters, key = _auditor_world()
    message = _sms(_token(meters, key, 100), "RCPT000001", to="+254799999999")
    report = audit.audit([_charge(audit, "RCPT000001")], [message], meters, key)
    assert report.undelivered_tokens == 1


def test_auditor_counts_tokens_the_meter_refuses() -> None:
    """A token made with another vending key is refused by the meter emulator."""
    audit, meters, key = _auditor_world()
    other = VendingKey(sgc="600001", krn=1, dkga=4, base_date=2014, key=bytes(20))
    report = audit.audit(
        [_charge(audit, "RCPT000001")],
        [_sms(_token(meters, other, 100), "RCPT000001")],
        meters,
        key,
    )
    assert report.meter_rejected == 1


def test_auditor_tells_a_second_charge_for_one_purchase() -> None:
    """A payer charged twice for one meter and amount with one token: one charged twice."""
    audit, meters, key = _auditor_world()
    charges = [_charge(audit, "ws_CO_1"), _charge(audit, "ws_CO_2")]
    report = audit.audit(charges, [_sms(_token(meters, key, 100), "PURCHASE123")], meters, key)
    assert (report.paid_without_token, report.charged_twice, report.double_vends) == (1, 1, 0)


# --- gateway sim's chaos: what the fault switches do ---------------------------------------------


@pytest.fixture
async def chaotic() -> AsyncIterator[tuple[SimWorld, list[str], dict[str, str]]]:
    """``gateway sim``'s world pointed at a recording fake gateway; the paths it was called on."""
    calls: list[str] = []

    async def record(request: web.Request) -> web.Response:
        calls.append(request.path)
        if request.path.endswith("/c2b/validation"):
            return web.json_response({"ResultCode": "0", "ResultDesc": "Accepted"})
        return web.json_response({"ResultCode": 0, "ResultDesc": "Accepted"})

    fake = web.Application()
    fake.router.add_route("*", "/{tail:.*}", record)
    gateway_server = TestServer(fake)
    await gateway_server.start_server()
    world = build_world(
        gateway=str(gateway_server.make_url("")).rstrip("/"), callback_secret="s", seed=3
    )
    world.chaos.retry_pause_s = 0.0
    try:
        async with serve_world(world) as urls:
            yield world, calls, urls
    finally:
        await gateway_server.close()


async def _stk_push(world: SimWorld, urls: dict[str, str], callback_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        provider = DarajaProvider(
            session,
            base_url=urls["daraja"],
            consumer_key=world.daraja.consumer_key,
            consumer_secret=world.daraja.consumer_secret,
            shortcode=world.daraja.shortcode,
            passkey=world.daraja.passkey,
            callback_url=callback_url,
        )
        await provider.request_collection(
            CollectionRequest(
                purchase_id="PCHAOS",
                payer=Msisdn("+254711000009"),
                amount=Money(10_000, "KES"),
                account_reference="04000000010",
                description="chaos",
            )
        )
    await world.daraja.settle()


async def test_sim_chaos_loses_a_callback_but_not_the_money(
    chaotic: tuple[SimWorld, list[str], dict[str, str]],
) -> None:
    """With ``lose`` at 1, an approved push's callback never arrives; the charge is recorded."""
    world, calls, urls = chaotic
    world.chaos.lose = 1.0
    await _stk_push(world, urls, world.at.ussd_url or "")
    assert (calls, len(world.daraja.ledger()), world.counts.lost) == ([], 1, 1)


async def test_sim_chaos_duplicates_a_callback(
    chaotic: tuple[SimWorld, list[str], dict[str, str]],
) -> None:
    """With ``duplicate`` at 1, an approved push's callback arrives twice."""
    world, calls, urls = chaotic
    world.chaos.duplicate = 1.0
    callback = (world.at.ussd_url or "").replace("/ussd/africastalking", "/stk")
    await _stk_push(world, urls, callback)
    assert calls == ["/stk", "/stk"]


async def test_sim_chaos_loses_only_the_first_attempt_of_a_retried_c2b_confirmation(
    chaotic: tuple[SimWorld, list[str], dict[str, str]],
) -> None:
    """With ``lose`` at 1, Daraja's retried C2B confirmation still arrives (one attempt lost)."""
    world, calls, _ = chaotic
    world.chaos.lose = 1.0
    outcome = await world.daraja.pay_bill("254711000009", "04000000010", 100)
    await world.daraja.settle()
    assert outcome.accepted
    assert calls == ["/payments/daraja/s/c2b/validation", "/payments/daraja/s/c2b/confirmation"]


async def test_sim_chaos_fails_sms_sends_and_records_accepted_ones(
    chaotic: tuple[SimWorld, list[str], dict[str, str]],
) -> None:
    """``sms_errors`` at 1 makes AT answer 500; at 0 the send is listed by ``/_sim/sms``."""
    world, _, urls = chaotic
    form = {"username": world.at.username, "to": "+254711000009", "message": "hello"}
    headers = {"apiKey": world.at.api_key, "Accept": "application/json"}
    async with aiohttp.ClientSession() as session:
        world.chaos.sms_errors = 1.0
        async with session.post(
            urls["africastalking"] + "/version1/messaging", data=form, headers=headers
        ) as failed:
            assert failed.status == 500
        world.chaos.sms_errors = 0.0
        async with session.post(
            urls["africastalking"] + "/version1/messaging", data=form, headers=headers
        ) as sent:
            assert sent.status == 201
        async with session.get(urls["africastalking"] + "/_sim/sms") as record:
            messages = await record.json()
    assert [(m["to"], m["text"]) for m in messages] == [("+254711000009", "hello")]
    assert messages[0]["accepted_at"] is not None


async def test_purchase_created_before_a_crash_still_gets_its_payment_prompt(
    daraja: tuple[DarajaSimulator, str], tmp_path: Path
) -> None:
    """A purchase committed just before a crash is prompted by the restarted sweeper."""
    sim, base_url = daraja
    master_key = secrets.token_bytes(32)
    async with (
        open_ledger(f"sqlite:///{tmp_path / 'gateway.db'}") as ledger,
        aiohttp.ClientSession() as session,
    ):
        await seed_demo(ledger, master_key)
        provider = DarajaProvider(
            session,
            base_url=base_url,
            consumer_key=sim.consumer_key,
            consumer_secret=sim.consumer_secret,
            shortcode=sim.shortcode,
            passkey=sim.passkey,
            callback_url="http://127.0.0.1:9/lost",
        )
        vending = Vending(
            ledger=ledger,
            engine=await load_token_engine(ledger, master_key),
            providers={"daraja": provider},
            default_provider="daraja",
        )
        # start_purchase's first transaction commits; the SIGKILL lands before its second.
        meter = await ledger.get_meter("04000000010")
        await ledger.open_purchase(
            PurchaseDraft(
                purchase_id=new_purchase_id(),
                channel="ussd",
                phone=Msisdn("+254711000002"),
                meter=meter.drn,
                amount=Money(10_000, "KES"),
                units=34,
                tariff_id=meter.tariff_id,
                idempotency_key="ussd:crash-before-check",
                provider="daraja",
            ),
            actor="ussd",
        )
        later = datetime.now(UTC) + timedelta(hours=1)
        await Sweeper(vending=vending, outbox=None, clock=lambda: later).sweep_once()
        await sim.settle()
    assert len(sim.push_requests) == 1


async def test_concurrent_payment_requests_for_one_purchase_push_once(
    daraja: tuple[DarajaSimulator, str], tmp_path: Path
) -> None:
    """The follow-up's and the sweeper's payment requests, racing, send one STK push.

    (Found by this harness; fixed in 145be70, this test was its strict xfail.)
    """
    sim, base_url = daraja
    master_key = secrets.token_bytes(32)
    async with (
        open_ledger(f"sqlite:///{tmp_path / 'gateway.db'}") as ledger,
        aiohttp.ClientSession() as session,
    ):
        await seed_demo(ledger, master_key)
        provider = DarajaProvider(
            session,
            base_url=base_url,
            consumer_key=sim.consumer_key,
            consumer_secret=sim.consumer_secret,
            shortcode=sim.shortcode,
            passkey=sim.passkey,
            callback_url="http://127.0.0.1:9/lost",
        )
        vending = Vending(
            ledger=ledger,
            engine=await load_token_engine(ledger, master_key),
            providers={"daraja": provider},
            default_provider="daraja",
        )
        purchase = await vending.start_purchase(
            channel="ussd",
            phone=Msisdn("+254711000003"),
            meter="04000000010",
            amount=Money(10_000, "KES"),
            idempotency_key="ussd:race",
        )
        await asyncio.gather(
            vending.request_payment(purchase.purchase_id),
            vending.check_payment(purchase.purchase_id),
        )
        await sim.settle()
    assert len(sim.push_requests) == 1


def test_auditor_counts_a_token_carried_twice_as_a_duplicate_sms_not_a_failure() -> None:
    """One token in two SMS (a send repeated after a crash): reported, 45 s apart, not failing."""
    audit, meters, key = _auditor_world()
    token = _token(meters, key, 100)
    first, again = _sms(token, "RCPT000001"), _sms(token, "RCPT000001")
    again["accepted_at"] = 46.0
    report = audit.audit([_charge(audit, "RCPT000001")], [first, again], meters, key)
    assert (report.duplicate_token_sms, report.duplicate_gap_max_s, report.ok) == (1, 45.0, True)


@pytest.mark.slow
async def test_a_c2b_receipt_replayed_before_its_own_confirmation_still_vends_for_the_payer(
    tmp_path: Path,
) -> None:
    """The payer's meter gets the token even when an attacker posts the TransID first.

    Found by ``bench/load.py --attacks`` in the strict audited run: the replay became a
    REFUND_PENDING purchase holding the receipt, and the genuine confirmation (delayed by the
    chaos) could not claim it: money taken, no token for the payer (``paid_without_token``).
    (Was a strict xfail: Transaction Status names another payer, so the replay takes nothing.)
    """
    from gateway.demo import serving  # noqa: PLC0415 - only here

    attacks = _bench("attacks")
    async with serving(tmp_path) as runtime:
        assert runtime.simulators is not None
        sim = runtime.simulators.daraja
        assert isinstance(sim, DarajaSimulator)
        sim.faults.callbacks.hold = True  # Daraja's confirmation is late
        paid = await sim.pay_bill("254712345678", "04000000028", 150)
        assert paid.accepted
        sim.faults.callbacks.hold = False  # what follows (the status results) flows
        forged = attacks.c2b_confirmation(
            paid.trans_id,
            amount=150,
            meter="04000000010",
            phone="254790000001",
            shortcode=sim.shortcode,
        )
        url = runtime.callback_url("daraja", "c2b/confirmation")
        async with aiohttp.ClientSession() as session, session.post(url, data=forged) as answer:
            assert answer.status == 200
        await asyncio.sleep(1.0)  # the replay is checked with Daraja (the receipt is real)
        await sim.courier.release()  # Daraja's own confirmation, at last
        deadline = asyncio.get_running_loop().time() + 10
        vended: list[Purchase] = []
        while not vended and asyncio.get_running_loop().time() < deadline:
            purchases = await runtime.ledger.find_purchases(meter="04000000028", limit=5)
            vended = [p for p in purchases if await runtime.ledger.get_vend(p.purchase_id)]
            await asyncio.sleep(0.1)
        assert vended, "the payer's meter got no token"


@pytest.mark.slow
async def test_an_stk_receipt_replayed_before_its_own_callback_still_vends_for_the_payer(
    tmp_path: Path,
) -> None:
    """The payer's purchase gets its token even when an attacker posts the receipt as C2B first.

    Found by ``bench/load.py --attacks`` in the strict audited run: the payer's STK purchase was
    left unpaid, prompted again, and charged a second time. (Was a strict xfail: Transaction
    Status says the receipt is an STK push's, "Pay Bill Online", so the replay takes nothing.)
    """
    from gateway.demo import serving  # noqa: PLC0415 - only here

    attacks = _bench("attacks")
    async with serving(tmp_path) as runtime:
        assert runtime.simulators is not None
        sim = runtime.simulators.daraja
        assert isinstance(sim, DarajaSimulator)
        sim.faults.callbacks.hold = True  # the genuine STK callback is late
        purchase = await runtime.vending.start_purchase(
            channel="ussd",
            phone=Msisdn("+254712345678"),
            meter="04000000010",
            amount=Money.of("100", "KES"),
            idempotency_key="front-run-1",
        )
        await runtime.vending.request_payment(purchase.purchase_id)
        charges: list[Any] = []
        for _ in range(200):  # the simulated customer approves at once
            charges = sim.ledger()
            if charges:
                break
            await asyncio.sleep(0.05)
        [charge] = charges
        sim.faults.callbacks.hold = False  # what follows (the status results) flows
        forged = attacks.c2b_confirmation(
            charge.receipt,
            amount=100,
            meter="04000000028",
            phone="254790000001",
            shortcode=sim.shortcode,
        )
        url = runtime.callback_url("daraja", "c2b/confirmation")
        async with aiohttp.ClientSession() as session, session.post(url, data=forged) as answer:
            assert answer.status == 200
        await asyncio.sleep(1.0)  # the replay is checked with Daraja (the receipt is real)
        await sim.courier.release()  # the genuine STK callback, at last
        deadline = asyncio.get_running_loop().time() + 10
        vend = None
        while vend is None and asyncio.get_running_loop().time() < deadline:
            vend = await runtime.ledger.get_vend(purchase.purchase_id)
            await asyncio.sleep(0.1)
        assert vend is not None, "the payer's purchase got no token"
        assert len(sim.ledger()) == 1
