"""``gateway demo``: three scripted purchases through every real layer, over HTTP on loopback.

A gateway is built on the embedded defaults (``build_app``) and served on a free loopback port,
with its simulators. Then, as a customer would:

1. USSD: the phone dials the service code and buys; the Daraja customer approves the STK
   prompt; the token SMS arrives at the Africa's Talking simulator; the meter accepts it.
2. SMS: the phone texts ``BUY <meter> <amount>`` to the shortcode; the same follows.
3. C2B paybill: the customer pays from the SIM menu with the meter number as the account; the
   gateway validates, confirms, vends and texts the token.
4. C2B paybill to an unknown meter: refused at validation, before money moves.
5. Sales point (the vendor API's sandbox, ``demo-shop``): a shop terminal confirms the meter,
   quotes, sells with an idempotency key, times out (the sandbox's slow meter), asks for the
   last response, gets the token, sends the sale again and gets the same bytes (one debit).

Each party's view is printed; a step that does not happen within its deadline fails the run.
The meter is ``gateway.sts.MeterEmulator``, keyed from the same vending key the engine uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO, TypeVar

from aiohttp import web

from gateway.app import RUNTIME, Runtime, build_app
from gateway.config import Config
from gateway.demo_data import DEMO_SGC, demo_master_key
from gateway.ledger.keys import open_vending_key
from gateway.sim.africastalking import AtSimulator, SimSms
from gateway.sim.daraja import DarajaSimulator
from gateway.sts import MeterEmulator, MeterProfile, VendingKey, Verdict
from gateway.vendor.sandbox import (
    SANDBOX_KEY_ID,
    SANDBOX_SECRET,
    SANDBOX_TERMINAL,
    SANDBOX_VENDOR,
    SLOW_METER,
)
from gateway.vendor_client import VendorClient, VendorReply

_TOKEN_RE = re.compile(r"(\d{4})[- ](\d{4})[- ](\d{4})[- ](\d{4})[- ](\d{4})")
STEP_DEADLINE_S = 15.0


class DemoFailedError(RuntimeError):
    """A step of the demo did not happen; the message says which and what was seen."""


@dataclass(slots=True, kw_only=True)
class ScenarioResult:
    """What one scenario ended with."""

    name: str
    token: str
    kwh: str
    credit_kwh: str
    sms_text: str


@dataclass(slots=True)
class DemoReport:
    """All scenarios' results, in order."""

    results: list[ScenarioResult] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


T = TypeVar("T")


async def _eventually(
    what: str, probe: Callable[[], Awaitable[T | None]], deadline_s: float = STEP_DEADLINE_S
) -> T:
    """Poll ``probe`` until it returns a value; ``DemoFailedError`` naming ``what`` on timeout."""
    end = time.monotonic() + deadline_s
    while True:
        value = await probe()
        if value is not None:
            return value
        if time.monotonic() > end:
            raise DemoFailedError(f"{what}: nothing after {deadline_s:.0f} s")
        await asyncio.sleep(0.05)


class Demo:
    """Drives the scenarios against one running gateway."""

    def __init__(self, runtime: Runtime, out: TextIO) -> None:
        sims = runtime.simulators
        if sims is None:
            raise DemoFailedError("the demo needs the simulators (payments = sms = 'sim')")
        assert isinstance(sims.at, AtSimulator)  # noqa: S101 - narrowing for mypy
        assert isinstance(sims.daraja, DarajaSimulator)  # noqa: S101
        self.runtime = runtime
        self.at: AtSimulator = sims.at
        self.daraja: DarajaSimulator = sims.daraja
        self.out = out
        self._meters: dict[str, MeterEmulator] = {}

    def say(self, party: str, text: str) -> None:
        """Print one line of what ``party`` saw."""
        for number, line in enumerate(text.splitlines() or [""]):
            label = f"{party:>10} | " if number == 0 else f"{'':>10} | "
            print(label + line, file=self.out)
        self.out.flush()

    async def meter(self, drn: str) -> MeterEmulator:
        """The meter with number ``drn``, keyed as installed (one emulator per meter)."""
        if drn in self._meters:
            return self._meters[drn]
        ledger = self.runtime.ledger
        record = await ledger.get_meter(drn)
        config = self.runtime.config
        master = config.master_key_bytes() or demo_master_key(config.data_dir)
        sealed = next(
            k for k in await ledger.vending_keys() if k.sgc == record.sgc and k.krn == record.krn
        )
        material = open_vending_key(sealed, master)
        emulator = MeterEmulator.for_profile(
            MeterProfile(
                drn=record.drn,
                iin=record.iin,
                sgc=record.sgc,
                tariff_index=record.tariff_index,
                krn=record.krn,
                key_type=record.key_type,
                base_date=record.base_date,
                ea=record.ea,
                dkga=record.dkga,
                ken=record.ken,
            ),
            VendingKey(
                sgc=material.sgc,
                krn=material.krn,
                dkga=material.dkga,
                base_date=material.base_date,
                key=material.key,
            ),
        )
        self._meters[drn] = emulator
        return emulator

    async def token_sms(self, phone: str, seen: int) -> SimSms:
        """Wait for a token SMS to ``phone`` beyond the first ``seen`` messages."""

        async def probe() -> SimSms | None:
            for sms in self.at.inbox(phone)[seen:]:
                if _TOKEN_RE.search(sms.text):
                    return sms
            return None

        return await _eventually(f"token SMS to {phone}", probe)

    async def key_in(self, name: str, drn: str, sms: SimSms) -> ScenarioResult:
        """Key the token from ``sms`` into meter ``drn``; fail unless it is accepted."""
        self.say("SMS", sms.text)
        match = _TOKEN_RE.search(sms.text)
        if match is None:
            raise DemoFailedError(f"{name}: no token in the SMS {sms.text!r}")
        digits = "".join(match.groups())
        meter = await self.meter(drn)
        before = meter.credit.get(0, 0)
        response = meter.enter(digits)
        if response.verdict is not Verdict.ACCEPTED:
            raise DemoFailedError(f"{name}: meter {drn} refused the token: {response.reason}")
        after = meter.credit.get(0, 0)
        kwh = f"{(after - before) / 10:.1f}"
        self.say("meter", f"{drn}: token accepted, +{kwh} kWh, credit now {after / 10:.1f} kWh")
        return ScenarioResult(
            name=name, token=digits, kwh=kwh, credit_kwh=f"{after / 10:.1f}", sms_text=sms.text
        )

    async def ussd(self, phone: str, drn: str, amount: str) -> ScenarioResult:
        """A USSD purchase: dial, buy, approve the STK prompt, key the token in."""
        print("\n== 1. USSD: dial, buy, approve the M-Pesa prompt", file=self.out)
        seen = len(self.at.inbox(phone))
        session, screen = await self.at.dial(phone, self.runtime.config.service_code)
        self.say("phone", screen.text)
        for answer in ("1", drn, amount, "1"):
            if screen.ended:
                raise DemoFailedError(f"USSD ended early: {screen.text!r}")
            self.say("customer", f"types {answer}")
            screen = await session.answer(answer)
            self.say("phone", screen.text)
        if not screen.ended:
            raise DemoFailedError(f"USSD did not end after confirming: {screen.text!r}")
        await self._show_payment(phone)
        return await self.key_in("ussd", drn, await self.token_sms(phone, seen))

    async def sms(self, phone: str, drn: str, amount: str) -> ScenarioResult:
        """An SMS purchase: ``BUY <meter> <amount>`` to the shortcode."""
        print("\n== 2. SMS: BUY to the shortcode, approve the M-Pesa prompt", file=self.out)
        seen = len(self.at.inbox(phone))
        text = f"BUY {drn} {amount}"
        self.say("customer", f"texts {text!r} to {self.at.shortcode}")
        await self.at.send_inbound(phone, text)
        await self._show_payment(phone)
        return await self.key_in("sms", drn, await self.token_sms(phone, seen))

    async def paybill(self, phone: str, drn: str, amount_kes: int) -> ScenarioResult:
        """A C2B paybill payment from the SIM menu, account = meter number."""
        print("\n== 3. C2B paybill: pay from the SIM menu, account = meter number", file=self.out)
        seen = len(self.at.inbox(phone))
        self.say(
            "customer",
            f"pays KES {amount_kes} to paybill {self.daraja.shortcode}, account {drn}",
        )
        outcome = await self.daraja.pay_bill(phone, drn, amount_kes)
        self.say("M-Pesa", f"accepted={outcome.accepted} TransID={outcome.trans_id}")
        await self._show_payment(phone)
        return await self.key_in("c2b", drn, await self.token_sms(phone, seen))

    async def _show_payment(self, phone: str) -> None:
        digits = phone.removeprefix("+")

        async def charged() -> str | None:
            for charge in self.daraja.ledger():
                if charge.msisdn == digits:
                    amount = f"{charge.currency} {charge.amount_minor / 100:.2f}"
                    return f"took {amount} from {phone}, receipt {charge.receipt}"
            return None

        self.say("M-Pesa", await _eventually(f"M-Pesa charge to {phone}", charged))

    async def unknown_meter(self, phone: str) -> None:
        """A paybill payment to an unregistered meter is refused before money moves."""
        print("\n== 4. C2B paybill to an unknown meter: refused at validation", file=self.out)
        before = len(self.daraja.ledger())
        outcome = await self.daraja.pay_bill(phone, "12345678903", 100)
        self.say("M-Pesa", f"accepted={outcome.accepted} result={outcome.result_code}")
        if outcome.accepted:
            raise DemoFailedError("the paybill payment to an unknown meter was accepted")
        if len(self.daraja.ledger()) != before:
            raise DemoFailedError("money was taken for an unknown meter")

    async def sales_point(self, drn: str, amount_minor: int) -> ScenarioResult:
        """A shop terminal sells over the vendor API, times out, asks for the last response."""
        print(
            "\n== 5. Sales point: a shop terminal sells a token over the vendor API", file=self.out
        )
        base, key = self.runtime.base_url, "till-1-sale-0001"
        vendors = self.runtime.vendor.vendors
        before = (await vendors.get_vendor(SANDBOX_VENDOR)).balance_minor
        async with VendorClient(
            base, SANDBOX_KEY_ID, SANDBOX_SECRET, terminal=SANDBOX_TERMINAL, timeout_s=1.0
        ) as terminal:
            meter = (await terminal.confirm_meter(drn)).json()
            self.say("terminal", f"meter {drn}: {meter['name']}, {meter['area']}, "
                     f"can sell: {meter['can_sell']}")  # fmt: skip
            quote = (await terminal.quote(drn, amount_minor)).json()
            self.say("terminal", f"quote KES {amount_minor // 100}: {quote['units']} kWh, "
                     f"float pays KES {quote['float_debit_minor'] / 100:.2f}")  # fmt: skip
            try:
                await terminal.vend(drn, amount_minor, idempotency_key=key)
                raise DemoFailedError("the sandbox's slow meter answered within 1 s")
            except TimeoutError:
                self.say("terminal", f"vend (Idempotency-Key {key}): no answer after 1 s")

            async def answered() -> VendorReply | None:
                reply = await terminal.last_response(idempotency_key=key)
                return reply if reply.status == 201 else None

            last = await _eventually("the vend's last response", answered)
            again = await terminal.vend(drn, amount_minor, idempotency_key=key)
        sold = last.json()
        token = sold["tokens"][-1]["token"]
        if again.body != last.body:
            raise DemoFailedError("the same sale sent again did not return the stored answer")
        debited = before - (await vendors.get_vendor(SANDBOX_VENDOR)).balance_minor
        if debited != sold["float_debit_minor"]:
            raise DemoFailedError(f"the float moved by {debited}, not one debit")
        grouped = "-".join(token[i : i + 4] for i in range(0, 20, 4))
        receipt = f"Token {grouped}. {sold['units']} kWh. Meter {drn}. Receipt {sold['receipt']}."
        self.say("terminal", f"last response: {sold['status']}, prints: {receipt}")
        self.say("terminal", "sends the sale again: the same answer, the float debited once")
        emulator = await self.meter(drn)
        response = emulator.enter(token)
        if response.verdict is not Verdict.ACCEPTED:
            raise DemoFailedError(f"meter {drn} refused the vendor's token: {response.reason}")
        credit = emulator.credit.get(0, 0)
        self.say("meter", f"{drn}: token accepted, credit now {credit / 10:.1f} kWh")
        return ScenarioResult(
            name="vendor", token=token, kwh=sold["units"], credit_kwh=f"{credit / 10:.1f}",
            sms_text=receipt,
        )  # fmt: skip


@contextlib.asynccontextmanager
async def serving(data_dir: Path | None = None) -> AsyncIterator[Runtime]:
    """A demo gateway (embedded defaults) served on a free loopback port while the block runs."""
    with tempfile.TemporaryDirectory(prefix="sts-gateway-demo-") as scratch:
        port = _free_port()
        config = Config.load(
            env={},
            overrides={"port": port, "data_dir": data_dir or Path(scratch), "log_level": "warning"},
        )
        app = await build_app(config)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", port).start()
            yield app[RUNTIME]
        finally:
            await runner.cleanup()


async def run_demo(out: TextIO, *, data_dir: Path | None = None) -> DemoReport:
    """Serve a demo gateway on loopback and run the scenarios; raises ``DemoFailedError``."""
    async with serving(data_dir) as runtime:
        print(f"gateway on {runtime.base_url} (simulators, SQLite in a scratch dir)", file=out)
        demo = Demo(runtime, out)
        report = DemoReport()
        report.results.append(await demo.ussd("+254712345678", "04000000010", "100"))
        report.results.append(await demo.sms("+254722000111", "04000000028", "200"))
        report.results.append(await demo.paybill("+254733000222", "04000000036", 150))
        await demo.unknown_meter("+254733000222")
        report.results.append(await demo.sales_point(SLOW_METER, 10_000))
        print(f"\nAll scenarios passed (supply group {DEMO_SGC}).", file=out)
        return report
