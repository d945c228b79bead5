"""The product's promise under load, faults and SIGKILLs, checked by an auditor that trusts nothing.

``bench/load.py`` runs ``gateway sim`` and ``gateway serve`` as separate processes, buys by USSD,
SMS and C2B with every fault switch on while the gateway is SIGKILLed and restarted, waits for
the tokens, and hands the simulators' records to ``bench/audit.py``'s auditor (money taken, SMS
carried, every token keyed into a meter emulator).

A bug this harness found is pinned by a directed test below (``xfail(strict=True)``): an STK
push that Daraja accepted just before the gateway died is pushed again after the restart, so the
customer pays twice for one token. Until it is fixed the audited run reports those second charges
as ``charged_twice`` and is marked xfail when any occurred; every other count must be zero.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.demo_data import seed_demo
from gateway.ledger import open_ledger
from gateway.money import Money
from gateway.payments import CollectionRequest
from gateway.payments.daraja import DarajaProvider
from gateway.phone import Msisdn
from gateway.sim.daraja import DarajaSimulator
from gateway.vending import Vending, load_token_engine

BENCH = Path(__file__).resolve().parents[2] / "bench"
STRICT_COUNTS = (
    "double_vends",
    "token_without_payment",
    "undelivered_tokens",
    "meter_rejected",
    "wrong_credit",
)
DOUBLE_PUSH_BUG = (
    "known bug: a Daraja STK push accepted just before a crash is pushed again by the sweeper"
    " after the restart (Vending.check_payment → request_payment with no provider reference"
    " recorded), charging the customer twice for one token"
)


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
    """Under every fault switch and several SIGKILLs, the auditor's counts are all zero.

    The one exception is the known double charge (pinned by the strict xfail below): second
    charges for one purchase are allowed, and only they, and the test is then marked xfail.
    """
    load = _bench("load")
    faults = dataclasses.replace(load.Faults.all_on(), query_timeouts=0.005)
    settings = load.LoadSettings(
        purchases=None,
        duration_s=20.0,
        concurrency=32,
        meters=300,
        faults=faults,
        kills=4,
        kill_every_s=(2.0, 4.0),
        drain_timeout_s=200.0,  # a kill mid-send leaves SMS leased for the outbox's 120 s
        seed=8,
        workdir=tmp_path,
        show_progress=False,
    )
    result = await load.run_load(settings)
    audit: dict[str, Any] = result.audit
    summary = "\n".join(result.lines)
    assert result.figures["kills"] >= 4, summary
    assert audit["charges"] >= 300, summary
    assert result.chaos["counts"]["lost"] > 0, summary
    assert result.chaos["counts"]["duplicated"] > 0, summary
    assert result.chaos["counts"]["sms_errors"] > 0, summary
    for name in STRICT_COUNTS:
        assert audit[name] == 0, summary
    assert audit["paid_without_token"] == audit["charged_twice"], summary
    if audit["charged_twice"]:
        pytest.xfail(f"{DOUBLE_PUSH_BUG}: {audit['charged_twice']} second charge(s) in this run")


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


@pytest.mark.xfail(strict=True, reason=DOUBLE_PUSH_BUG)
async def test_stk_push_accepted_before_a_crash_charges_the_customer_once(
    daraja: tuple[DarajaSimulator, str], tmp_path: Path
) -> None:
    """A push Daraja accepted just before the gateway died is not pushed (and charged) again.

    The gateway sends the STK push and is killed before it records the provider's reference; the
    restarted process (fresh memory) runs the sweeper's step for the purchase.
    """
    sim, base_url = daraja
    master_key = secrets.token_bytes(32)
    phone = Msisdn("+254711000001")
    async with (
        open_ledger(f"sqlite:///{tmp_path / 'gateway.db'}") as ledger,
        aiohttp.ClientSession() as session,
    ):
        await seed_demo(ledger, master_key)
        engine = await load_token_engine(ledger, master_key)

        def process() -> tuple[DarajaProvider, Vending]:
            provider = DarajaProvider(
                session,
                base_url=base_url,
                consumer_key=sim.consumer_key,
                consumer_secret=sim.consumer_secret,
                shortcode=sim.shortcode,
                passkey=sim.passkey,
                callback_url="http://127.0.0.1:9/lost",  # the callback is lost with the process
            )
            return provider, Vending(
                ledger=ledger,
                engine=engine,
                providers={"daraja": provider},
                default_provider="daraja",
            )

        provider, before = process()
        purchase = await before.start_purchase(
            channel="ussd",
            phone=phone,
            meter="04000000010",
            amount=Money(10_000, "KES"),
            idempotency_key="ussd:crash-after-push",
        )
        # What Vending.request_payment does first; the SIGKILL lands before attach_payment.
        await provider.request_collection(
            CollectionRequest(
                purchase_id=purchase.purchase_id,
                payer=phone,
                amount=purchase.amount,
                account_reference=purchase.meter,
                description=f"Electricity {purchase.meter}",
            )
        )
        _, after = process()
        await after.check_payment(purchase.purchase_id)  # the restarted sweeper's step
        await sim.settle()
    charges = [c for c in sim.ledger() if c.msisdn == "254711000001"]
    assert len(charges) == 1
