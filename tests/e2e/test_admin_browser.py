"""The admin page in headless Chromium: log in, find a purchase by phone, reprint its token.

Debian's ``chromium`` is driven by Playwright (``executable_path``; Playwright's own browser
downloads are not used). Without chromium or playwright the test is skipped with a message, except
in CI (``CI`` set), where it must run and so fails instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from aiohttp import web

from gateway.config import Secret
from gateway.ledger import MessageKind, MeterNumber, MeterRecord, Purchase, open_sqlite_ledger
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
from gateway.phone import Msisdn
from gateway.sts import LocalTokenEngine, VendingKey
from gateway.sts.pan import luhn_check_digit
from gateway.tariff import Tariff
from gateway.vending import Vending
from gateway.web.admin import admin_routes, setup_admin
from gateway.web.middleware import context_middleware

if TYPE_CHECKING:
    from playwright.async_api import Browser

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN_TOKEN = "browser-test-admin-token-0123"
PHONE = Msisdn("+254712345678")
VENDING_KEY = VendingKey(
    sgc="123457", krn=1, dkga=4, base_date=2014, key=bytes.fromhex("0abc" * 10)
)
TARIFF = Tariff(
    tariff_id="domestic",
    name="Domestic",
    currency="KES",
    price_per_kwh_minor=2500,
    vat_basis_points=1600,
    min_purchase_minor=1000,
    max_purchase_minor=3_500_000,
)


def _chromium() -> str | None:
    """Debian's chromium, or another ``chromium`` on PATH, or None."""
    return CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")


def _missing_browser() -> str | None:
    """Why the browser test cannot run here, or None when it can."""
    try:
        import playwright.async_api  # noqa: F401, PLC0415 - only to see whether it is installed
    except ImportError:
        return "the python package playwright is not installed (pip install playwright)"
    if _chromium() is None:
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


class PaidProvider:
    """A payment provider that accepts every collection and reports it paid."""

    idempotent_requests = False  # the saga guards unknown outcomes (as for STK)

    name = "fakepay"

    async def request_collection(self, request: CollectionRequest) -> CollectionStarted:
        """Accept; the reference derives from the purchase id."""
        return CollectionStarted(
            provider=self.name, reference=ProviderReference(f"REF-{request.purchase_id}")
        )

    def parse_callback(self, body: bytes, headers: Mapping[str, str]) -> PaymentNotice:
        """Not used here."""
        raise NotImplementedError

    async def query_status(self, reference: ProviderReference) -> PaymentStatus:
        """Paid by ``PHONE``."""
        return PaymentStatus(
            provider=self.name,
            reference=reference,
            state=PaymentState.SUCCEEDED,
            payer=PHONE,
            receipt="RCPTBROWSER",
        )

    def acknowledgement(self) -> CallbackAck:
        """An empty 200."""
        return CallbackAck()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless Debian chromium through Playwright (skipped only outside CI when missing)."""
    missing = _missing_browser()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test, but {missing}")
        pytest.skip(f"browser test skipped: {missing}")
    from playwright.async_api import async_playwright  # noqa: PLC0415 - optional dependency

    executable = _chromium()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            await launched.close()


async def test_operator_finds_a_purchase_by_phone_and_reprints_its_token(
    browser: Browser, tmp_path: Path
) -> None:
    """In Chromium: log in, search a phone typed locally, open the purchase, resend its token."""
    async with open_sqlite_ledger(tmp_path / "ledger.db") as ledger:
        await ledger.put_tariff(TARIFF)
        body = "0000004711"
        drn = body + luhn_check_digit(body)
        await ledger.put_meter(
            MeterRecord(
                drn=MeterNumber(drn),
                customer_name="Amina Odhiambo",
                sgc=VENDING_KEY.sgc,
                tariff_index="01",
                krn=VENDING_KEY.krn,
                tariff_id=TARIFF.tariff_id,
            )
        )
        provider = PaidProvider()
        vending = Vending(
            ledger=ledger,
            engine=LocalTokenEngine([VENDING_KEY]),
            providers={provider.name: provider},
            default_provider=provider.name,
        )
        purchase: Purchase = await vending.start_purchase(
            channel="ussd",
            phone=PHONE,
            meter=drn,
            amount=Money(11600, "KES"),
            idempotency_key="browser-1",
        )
        await vending.request_payment(purchase.purchase_id)
        await vending.confirm(purchase.purchase_id)
        vend = await ledger.get_vend(purchase.purchase_id)
        assert vend is not None

        app = web.Application(middlewares=[context_middleware])
        setup_admin(app, ledger=ledger, vending=vending, admin_token=Secret(ADMIN_TOKEN))
        app.add_routes(admin_routes())
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            host, port = runner.addresses[0][:2]
            base = f"http://{host}:{port}"
            context = await browser.new_context()
            page = await context.new_page()

            await page.goto(f"{base}/admin")
            assert "/admin/login" in page.url
            await page.get_by_label("Admin token").fill(ADMIN_TOKEN)
            await page.get_by_role("button", name="Log in").click()
            await page.wait_for_url(f"{base}/admin")

            await page.get_by_label("Phone (any format), meter number or purchase id").fill(
                "0712 345 678"
            )
            await page.get_by_role("button", name="Search").click()
            await page.get_by_role("link", name=purchase.purchase_id).click()
            await page.wait_for_url(f"{base}/admin/purchases/{purchase.purchase_id}")
            assert vend.token not in (await page.content()).replace("-", "")
            assert vend.token[-4:] in await page.locator("#token ~ dl code").inner_text()

            await page.get_by_role("button", name="Resend this token by SMS").click()
            await page.get_by_role("heading", name="Token resent").wait_for()
            shown = (await page.locator(".token code").inner_text()).replace("-", "")
            assert shown == vend.token
            await context.close()
        finally:
            await runner.cleanup()

        messages = await ledger.outbox_for(purchase.purchase_id)
        assert [m.kind for m in messages] == [MessageKind.TOKEN, MessageKind.REPRINT]
        grouped = "-".join(vend.token[i : i + 4] for i in range(0, 20, 4))
        assert grouped in messages[1].body
        assert messages[1].recipient == PHONE
