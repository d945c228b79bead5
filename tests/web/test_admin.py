"""The admin pages through their HTTP face, over a real ledger file and the real saga."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.config import Secret
from gateway.ledger import (
    ConfirmedPayment,
    Ledger,
    MessageKind,
    MeterNumber,
    MeterRecord,
    Purchase,
    PurchaseState,
    Vend,
    open_sqlite_ledger,
)
from gateway.ledger.vendor import VendorLedger, VendorStatus
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
from gateway.vending import SagaPolicy, VendFailed, Vending
from gateway.vendor.sealing import open_signing_key
from gateway.vendor.service import VendorService, register_vendor
from gateway.vendor.signing import derive_signing_key
from gateway.web.admin import (
    COOKIE_NAME,
    AuthThrottle,
    StuckPolicy,
    admin_routes,
    setup_admin,
)
from gateway.web.middleware import context_middleware
from tests.support.clock import UtcClock

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[[web.Application], Awaitable[Client]]

ADMIN_TOKEN = "s3cret-admin-token-for-tests"
PHONE = Msisdn("+254712345678")
OTHER_PHONE = Msisdn("+254722000111")
AMOUNT = Money(11600, "KES")
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
HTML = {"Accept": "text/html,application/xhtml+xml"}
BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def make_drn(number: int) -> str:
    """A valid 11-digit DRN (Luhn check digit) from a serial number."""
    body = f"{number:010d}"
    return body + luhn_check_digit(body)


class FakeProvider:
    """A payment provider whose status answers the test decides (SUCCEEDED once settled)."""

    idempotent_requests = False  # the saga guards unknown outcomes (as for STK)

    name = "fakepay"

    def __init__(self) -> None:
        self.settled: dict[str, Msisdn] = {}

    async def request_collection(self, request: CollectionRequest) -> CollectionStarted:
        """Accept every collection; the reference derives from the purchase id."""
        return CollectionStarted(
            provider=self.name, reference=ProviderReference(f"REF-{request.purchase_id}")
        )

    def parse_callback(self, body: bytes, headers: Mapping[str, str]) -> PaymentNotice:
        """Not used here."""
        raise NotImplementedError

    async def query_status(self, reference: ProviderReference) -> PaymentStatus:
        """SUCCEEDED for settled references, PENDING otherwise."""
        payer = self.settled.get(reference)
        if payer is None:
            return PaymentStatus(
                provider=self.name, reference=reference, state=PaymentState.PENDING
            )
        return PaymentStatus(
            provider=self.name,
            reference=reference,
            state=PaymentState.SUCCEEDED,
            payer=payer,
            receipt=f"RCPT{reference[-6:]}",
        )

    def acknowledgement(self) -> CallbackAck:
        """An empty 200."""
        return CallbackAck()


@dataclass
class Shop:
    """A seeded ledger, the saga over it, and the purchases made."""

    ledger: Ledger
    vending: Vending
    provider: FakeProvider
    clock: UtcClock
    drns: list[str]


async def buy(shop: Shop, key: str, *, phone: Msisdn = PHONE, meter: int = 0) -> Purchase:
    """A purchase paid and vended through the real saga (a few fake seconds per step)."""
    purchase = await shop.vending.start_purchase(
        channel="ussd", phone=phone, meter=shop.drns[meter], amount=AMOUNT, idempotency_key=key
    )
    shop.clock.advance(2)
    purchase = await shop.vending.request_payment(purchase.purchase_id)
    assert purchase.provider_reference is not None
    shop.provider.settled[purchase.provider_reference] = phone
    shop.clock.advance(3)
    return await shop.vending.confirm(purchase.purchase_id)


async def awaiting(shop: Shop, key: str, *, phone: Msisdn = OTHER_PHONE) -> Purchase:
    """A purchase whose collection was requested and never paid."""
    purchase = await shop.vending.start_purchase(
        channel="ussd", phone=phone, meter=shop.drns[1], amount=AMOUNT, idempotency_key=key
    )
    return await shop.vending.request_payment(purchase.purchase_id)


@pytest.fixture
async def shop(tmp_path: Path) -> AsyncIterator[Shop]:
    """A saga over a fresh ledger file with a tariff and two meters."""
    clock = UtcClock()
    provider = FakeProvider()
    drns = [make_drn(7), make_drn(8)]
    async with open_sqlite_ledger(tmp_path / "ledger.db", clock=clock) as ledger:
        await ledger.put_tariff(TARIFF)
        for drn in drns:
            await ledger.put_meter(
                MeterRecord(
                    drn=MeterNumber(drn),
                    customer_name="Wanjiru Kamau",
                    sgc=VENDING_KEY.sgc,
                    tariff_index="01",
                    krn=VENDING_KEY.krn,
                    tariff_id=TARIFF.tariff_id,
                )
            )
        vending = Vending(
            ledger=ledger,
            engine=LocalTokenEngine([VENDING_KEY]),
            providers={provider.name: provider},
            default_provider=provider.name,
            clock=clock,
            policy=SagaPolicy(payment_expiry_s=3600),
        )
        yield Shop(ledger, vending, provider, clock, drns)


@pytest.fixture
async def client(shop: Shop, aiohttp_client: ClientFactory) -> Client:
    """The admin routes over the shop, as the composition root mounts them."""
    app = web.Application(middlewares=[context_middleware])
    setup_admin(
        app,
        ledger=shop.ledger,
        vending=shop.vending,
        admin_token=Secret(ADMIN_TOKEN),
        clock=shop.clock,
        stuck=StuckPolicy(awaiting_payment_s=600, paid_not_vended_s=60, vended_not_delivered_s=600),
    )
    app.add_routes(admin_routes())
    return await aiohttp_client(app)


async def login(client: Client) -> str:
    """Log in through the form; the session cookie is kept by the client's jar."""
    response = await client.post(
        "/admin/login", data={"token": ADMIN_TOKEN, "next": "/admin"}, allow_redirects=False
    )
    assert response.status == 303
    return response.headers["Set-Cookie"]


def csrf_of(html: str) -> str:
    """The CSRF token of the first form on a page."""
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert match is not None, "no CSRF field on the page"
    return match.group(1)


async def vend_of(shop: Shop, purchase: Purchase) -> Vend:
    """The purchase's stored vend."""
    vend = await shop.ledger.get_vend(purchase.purchase_id)
    assert vend is not None
    return vend


# ------------------------------------------------------------------------------------------ auth


async def test_pages_refuse_requests_without_the_token(client: Client) -> None:
    """Without credentials, or with a wrong bearer token, every page answers 401."""
    for path in ("/admin", "/admin/stuck/paid_not_vended", "/admin/purchases/PAAAAAAAAAAAA"):
        response = await client.get(path)
        assert response.status == 401, path
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = await client.get("/admin", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status == 401


async def test_browsers_without_a_session_are_sent_to_the_login_form(client: Client) -> None:
    """A browser asking for a page without a session is redirected to the login form."""
    response = await client.get("/admin?q=0712345678", headers=HTML, allow_redirects=False)
    assert response.status == 303
    assert response.headers["Location"].startswith("/admin/login?next=%2Fadmin%3Fq%3D")


async def test_bearer_token_opens_the_pages(client: Client) -> None:
    """The right bearer token opens the search page."""
    response = await client.get("/admin", headers=BEARER)
    assert response.status == 200
    assert "Find a purchase" in await response.text()


async def test_login_sets_an_httponly_strict_cookie_that_is_not_the_token(
    client: Client,
) -> None:
    """The login form sets an HttpOnly, SameSite=Strict session cookie that hides the token."""
    set_cookie = await login(client)
    assert f"{COOKIE_NAME}=" in set_cookie
    assert "HttpOnly" in set_cookie
    assert "SameSite=Strict" in set_cookie
    assert ADMIN_TOKEN not in set_cookie
    response = await client.get("/admin")
    assert response.status == 200


async def test_wrong_login_is_refused_without_a_cookie(client: Client) -> None:
    """A wrong token in the login form answers 401 and sets no session."""
    response = await client.post("/admin/login", data={"token": "guess"}, allow_redirects=False)
    assert response.status == 401
    assert "Set-Cookie" not in response.headers
    assert (await client.get("/admin")).status == 401


async def test_forged_and_expired_sessions_are_refused(client: Client, shop: Shop) -> None:
    """A cookie with a wrong MAC, or older than the session lifetime, opens nothing."""
    await login(client)
    cookie = client.session.cookie_jar.filter_cookies(client.make_url("/admin"))[COOKIE_NAME]
    issued, _, mac = cookie.value.partition(".")
    forged = f"{int(issued) + 3600}.{mac}"
    client.session.cookie_jar.clear()
    forged_response = await client.get("/admin", headers={"Cookie": f"{COOKIE_NAME}={forged}"})
    assert forged_response.status == 401
    await login(client)
    shop.clock.advance(12 * 3600 + 1)
    assert (await client.get("/admin")).status == 401


async def test_login_never_redirects_off_the_admin_pages(client: Client) -> None:
    """A ``next`` pointing to another site is replaced by /admin."""
    for target in ("https://evil.example/admin", "//evil.example/admin", "/ussd"):
        response = await client.post(
            "/admin/login", data={"token": ADMIN_TOKEN, "next": target}, allow_redirects=False
        )
        assert response.headers["Location"] == "/admin", target


async def test_logout_ends_the_session(client: Client) -> None:
    """Logging out (with the CSRF token) clears the session cookie."""
    await login(client)
    page = await (await client.get("/admin")).text()
    response = await client.post(
        "/admin/logout", data={"csrf": csrf_of(page)}, allow_redirects=False
    )
    assert response.status == 303
    assert (await client.get("/admin")).status == 401


# ---------------------------------------------------------------------------------------- search


@pytest.mark.parametrize(
    "typed", ["0712345678", "+254 712 345 678", "254712345678", "0712-345-678", " 712345678 "]
)
async def test_search_finds_purchases_by_phone_in_any_format(
    client: Client, shop: Shop, typed: str
) -> None:
    """A phone number typed in any common format finds that phone's purchases, and only those."""
    mine = await buy(shop, "mine")
    theirs = await buy(shop, "theirs", phone=OTHER_PHONE)
    response = await client.get("/admin", params={"q": typed}, headers=BEARER)
    html = await response.text()
    assert mine.purchase_id in html
    assert theirs.purchase_id not in html


async def test_search_finds_purchases_by_meter(client: Client, shop: Shop) -> None:
    """A meter number finds every purchase for that meter."""
    first = await buy(shop, "a", meter=1)
    second = await buy(shop, "b", phone=OTHER_PHONE, meter=1)
    elsewhere = await buy(shop, "c", meter=0)
    html = await (await client.get("/admin", params={"q": shop.drns[1]}, headers=BEARER)).text()
    assert first.purchase_id in html
    assert second.purchase_id in html
    assert elsewhere.purchase_id not in html


async def test_search_by_purchase_id_opens_the_purchase(client: Client, shop: Shop) -> None:
    """A purchase id (in any case) leads straight to that purchase's page."""
    purchase = await buy(shop, "x")
    response = await client.get(
        "/admin", params={"q": purchase.purchase_id.lower()}, headers=BEARER, allow_redirects=False
    )
    assert response.status == 303
    assert response.headers["Location"] == f"/admin/purchases/{purchase.purchase_id}"


async def test_search_with_no_match_says_so(client: Client, shop: Shop) -> None:
    """A number nobody bought from gives an empty result, not an error."""
    await buy(shop, "x")
    html = await (await client.get("/admin", params={"q": "0733999888"}, headers=BEARER)).text()
    assert "No purchase matches" in html


async def test_search_text_is_escaped(client: Client) -> None:
    """What the operator typed is shown escaped, never as markup."""
    html = await (
        await client.get("/admin", params={"q": "<script>x</script>"}, headers=BEARER)
    ).text()
    assert "<script>" not in html
    assert "&lt;script&gt;" in html


# -------------------------------------------------------------------------------------- timeline


async def test_timeline_shows_the_saga_steps_in_order(client: Client, shop: Shop) -> None:
    """The purchase page lists creation, payment request, confirmation and vend in that order."""
    purchase = await buy(shop, "t")
    html = await (
        await client.get(f"/admin/purchases/{purchase.purchase_id}", headers=BEARER)
    ).text()
    timeline = html[html.index('id="timeline"') :]
    positions = [
        timeline.index(kind)
        for kind in ("purchase_created", "payment_requested", "payment_confirmed", "token_vended")
    ]
    assert positions == sorted(positions)


async def test_purchase_page_masks_the_token_to_its_last_four_digits(
    client: Client, shop: Shop
) -> None:
    """The purchase page shows the token's last four digits and never the whole token."""
    purchase = await buy(shop, "m")
    vend = await vend_of(shop, purchase)
    html = await (
        await client.get(f"/admin/purchases/{purchase.purchase_id}", headers=BEARER)
    ).text()
    assert vend.token[-4:] in html
    assert vend.token not in html
    assert vend.token[:4] + "-" + vend.token[4:8] not in html


async def test_purchase_page_shows_the_debt_recovered_and_remaining(
    client: Client, shop: Shop
) -> None:
    """A meter owing KES 500 at 10 %: the page shows what went to the debt and what remains."""
    await shop.ledger.set_debt(
        shop.drns[0], balance=Money(50000, "KES"), rate_basis_points=1000, actor="ops"
    )
    purchase = await buy(shop, "debt")
    recovered = AMOUNT.amount_minor // 10
    html = await (
        await client.get(f"/admin/purchases/{purchase.purchase_id}", headers=BEARER)
    ).text()
    assert "Debt recovered" in html
    assert str(Money(recovered, "KES")) in html
    assert str(Money(50000 - recovered, "KES")) in html
    assert "debt_recovered" in html  # the timeline's event


async def test_unknown_purchase_is_a_404_page(client: Client) -> None:
    """A purchase id that does not exist answers 404."""
    response = await client.get("/admin/purchases/PZZZZZZZZZZZZ", headers=BEARER)
    assert response.status == 404


# --------------------------------------------------------------------------------------- reprint


async def test_reprint_queues_the_same_token_and_never_vends_again(
    client: Client, shop: Shop
) -> None:
    """Reprint queues an SMS with the very token vended before; no new vend, TID or token."""
    purchase = await buy(shop, "r")
    vend = await vend_of(shop, purchase)
    meter_before = await shop.ledger.get_meter(purchase.meter)
    await login(client)
    page = await (await client.get(f"/admin/purchases/{purchase.purchase_id}")).text()
    response = await client.post(
        f"/admin/purchases/{purchase.purchase_id}/reprint", data={"csrf": csrf_of(page)}
    )
    assert response.status == 200
    grouped = "-".join(vend.token[i : i + 4] for i in range(0, 20, 4))
    assert grouped in await response.text()
    messages = await shop.ledger.outbox_for(purchase.purchase_id)
    assert [m.kind for m in messages] == [MessageKind.TOKEN, MessageKind.REPRINT]
    assert grouped in messages[1].body
    assert messages[1].recipient == PHONE
    after = await vend_of(shop, purchase)
    assert (after.tid, after.token) == (vend.tid, vend.token)
    assert (await shop.ledger.get_meter(purchase.meter)).last_tid == meter_before.last_tid
    kinds = [e.kind for e in await shop.ledger.timeline(purchase.purchase_id)]
    assert kinds.count("token_vended") == 1


async def test_reprint_confirmation_is_not_cached(client: Client, shop: Shop) -> None:
    """The page that shows the full token forbids caching and framing."""
    purchase = await buy(shop, "c")
    response = await client.post(f"/admin/purchases/{purchase.purchase_id}/reprint", headers=BEARER)
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


async def test_reprint_from_a_session_requires_the_csrf_token(client: Client, shop: Shop) -> None:
    """A session POST without the CSRF token, or with a wrong one, is refused and sends nothing."""
    purchase = await buy(shop, "csrf")
    await login(client)
    path = f"/admin/purchases/{purchase.purchase_id}/reprint"
    missing = await client.post(path, data={})
    wrong = await client.post(path, data={"csrf": "0" * 64})
    assert (missing.status, wrong.status) == (403, 403)
    messages = await shop.ledger.outbox_for(purchase.purchase_id)
    assert [m.kind for m in messages] == [MessageKind.TOKEN]


async def test_reprint_needs_credentials(client: Client, shop: Shop) -> None:
    """A reprint POST without credentials is refused and sends nothing."""
    purchase = await buy(shop, "anon")
    response = await client.post(f"/admin/purchases/{purchase.purchase_id}/reprint")
    assert response.status == 401
    assert len(await shop.ledger.outbox_for(purchase.purchase_id)) == 1


async def test_reprint_of_an_unpaid_purchase_is_refused(client: Client, shop: Shop) -> None:
    """A purchase without a token cannot be reprinted: 409 and nothing queued."""
    purchase = await awaiting(shop, "unpaid")
    response = await client.post(f"/admin/purchases/{purchase.purchase_id}/reprint", headers=BEARER)
    assert response.status == 409
    assert await shop.ledger.outbox_for(purchase.purchase_id) == []


async def test_reprint_never_logs_the_full_token(client: Client, shop: Shop) -> None:
    """The log lines of a reprint carry at most the token's last four digits."""
    purchase = await buy(shop, "log")
    vend = await vend_of(shop, purchase)
    with structlog.testing.capture_logs() as logs:
        response = await client.post(
            f"/admin/purchases/{purchase.purchase_id}/reprint", headers=BEARER
        )
    assert response.status == 200
    assert logs, "the reprint logged nothing"
    assert vend.token not in repr(logs)


async def test_only_the_reprint_confirmation_shows_the_full_token(
    client: Client, shop: Shop
) -> None:
    """Search, stuck lists and the purchase page never contain the full token."""
    purchase = await buy(shop, "only")
    vend = await vend_of(shop, purchase)
    shop.clock.advance(3600)
    paths = [
        "/admin",
        f"/admin?q={PHONE}",
        f"/admin/purchases/{purchase.purchase_id}",
        "/admin/stuck/vended_not_delivered",
    ]
    for path in paths:
        html = await (await client.get(path, headers=BEARER)).text()
        assert vend.token not in html.replace("-", "").replace(" ", ""), path
    reprint = await client.post(f"/admin/purchases/{purchase.purchase_id}/reprint", headers=BEARER)
    assert vend.token in (await reprint.text()).replace("-", "")


# ----------------------------------------------------------------------------------------- stuck


async def test_stuck_lists_show_each_kind_past_its_threshold(client: Client, shop: Shop) -> None:
    """Old unpaid, paid-not-vended and undelivered purchases are listed; recent ones are not."""
    old_unpaid = await awaiting(shop, "old-unpaid")
    vended = await buy(shop, "undelivered")
    paid = await awaiting(shop, "paid-only", phone=PHONE)
    assert paid.provider_reference is not None
    # A crash between payment and vend leaves a purchase PAID: made here through the ledger.
    await shop.ledger.mark_paid(
        paid.purchase_id,
        ConfirmedPayment(
            provider="fakepay",
            reference=paid.provider_reference,
            amount=AMOUNT,
            payer=PHONE,
            receipt="R1",
        ),
        actor="test",
    )
    shop.clock.advance(900)
    recent_unpaid = await awaiting(shop, "recent-unpaid")

    async def listed(kind: str) -> str:
        return await (await client.get(f"/admin/stuck/{kind}", headers=BEARER)).text()

    awaiting_html = await listed("awaiting_payment")
    assert old_unpaid.purchase_id in awaiting_html
    assert recent_unpaid.purchase_id not in awaiting_html
    assert paid.purchase_id in await listed("paid_not_vended")
    assert vended.purchase_id in await listed("vended_not_delivered")
    assert (await shop.ledger.get_purchase(paid.purchase_id)).state is PurchaseState.PAID


async def test_search_page_counts_stuck_purchases(client: Client, shop: Shop) -> None:
    """The search page shows how many purchases are stuck in each list."""
    for n in range(3):
        await awaiting(shop, f"unpaid-{n}")
    shop.clock.advance(601)
    html = await (await client.get("/admin", headers=BEARER)).text()
    card = re.search(
        r'href="/admin/stuck/awaiting_payment">\s*<span class="count">(\d+)', html, re.DOTALL
    )
    assert card is not None
    assert card.group(1) == "3"


async def test_unknown_stuck_list_is_a_404(client: Client) -> None:
    """A stuck list that does not exist answers 404."""
    assert (await client.get("/admin/stuck/whatever", headers=BEARER)).status == 404


def test_setup_refuses_a_short_admin_token(shop: Shop) -> None:
    """An admin token shorter than 16 characters is refused at set-up."""
    with pytest.raises(ValueError, match="16 characters"):
        setup_admin(
            web.Application(), ledger=shop.ledger, vending=shop.vending, admin_token=Secret("x")
        )


async def test_token_digits_in_event_data_are_masked(client: Client, shop: Shop) -> None:
    """A token written into an event's data, bare or grouped, shows only its last four digits."""
    purchase = await buy(shop, "note")
    await shop.ledger.append_event(
        purchase.purchase_id,
        "operator_note",
        actor="support",
        data={"note": "read 1234-5678-9012-3456-7890 to caller", "token": "11112222333344445555"},
    )
    html = await (
        await client.get(f"/admin/purchases/{purchase.purchase_id}", headers=BEARER)
    ).text()
    assert "operator_note" in html
    assert "1234-5678-9012-3456-7890" not in html
    assert "****7890" in html
    assert "11112222333344445555" not in html
    assert "****5555" in html


async def test_retry_vend_finishes_a_failed_vend_once_the_cause_is_fixed(
    client: Client, shop: Shop
) -> None:
    """A vend that failed (meter registered with an unknown SGC) succeeds on retry, once."""
    meter = await shop.ledger.get_meter(shop.drns[0])
    await shop.ledger.put_meter(dataclasses.replace(meter, sgc="654321"))
    with pytest.raises(VendFailed):
        await buy(shop, "fails")
    (purchase,) = await shop.ledger.find_purchases(states=[PurchaseState.VEND_FAILED])
    await shop.ledger.put_meter(meter)  # the operator corrects the registration
    page = await (
        await client.get(f"/admin/purchases/{purchase.purchase_id}", headers=BEARER)
    ).text()
    assert "Retry the vend" in page
    path = f"/admin/purchases/{purchase.purchase_id}/vend"
    first = await client.post(path, headers=BEARER, allow_redirects=False)
    again = await client.post(path, headers=BEARER, allow_redirects=False)
    assert (first.status, again.status) == (303, 303)
    assert (await shop.ledger.get_purchase(purchase.purchase_id)).state is PurchaseState.VENDED
    messages = await shop.ledger.outbox_for(purchase.purchase_id)
    assert [m.kind for m in messages] == [MessageKind.TOKEN]
    kinds = [e.kind for e in await shop.ledger.timeline(purchase.purchase_id)]
    assert kinds.count("token_vended") == 1


async def test_retry_vend_refuses_an_unpaid_purchase(client: Client, shop: Shop) -> None:
    """No token for a purchase that is not paid: 409 and nothing vended."""
    purchase = await awaiting(shop, "unpaid-vend")
    response = await client.post(f"/admin/purchases/{purchase.purchase_id}/vend", headers=BEARER)
    assert response.status == 409
    assert await shop.ledger.get_vend(purchase.purchase_id) is None


# ------------------------------------------------------------------------------- issue 17 (10)


def _admin_app(shop: Shop) -> web.Application:
    app = web.Application(middlewares=[context_middleware])
    setup_admin(
        app,
        ledger=shop.ledger,
        vending=shop.vending,
        admin_token=Secret(ADMIN_TOKEN),
        clock=shop.clock,
    )
    app.add_routes(admin_routes())
    return app


async def test_a_copied_cookie_is_dead_after_logout_on_every_instance(
    client: Client, shop: Shop, aiohttp_client: ClientFactory
) -> None:
    """Logout revokes the session server-side, on every instance sharing the ledger.

    A saved copy of the cookie fails here and on the other instance (before the fix it kept
    working until it expired).
    """
    other = await aiohttp_client(_admin_app(shop))  # a second instance, same ledger
    await login(client)
    cookie = client.session.cookie_jar.filter_cookies(client.make_url("/admin"))[COOKIE_NAME]
    copied = {"Cookie": f"{COOKIE_NAME}={cookie.value}"}
    assert (await other.get("/admin", headers=copied)).status == 200
    page = await (await client.get("/admin")).text()
    response = await client.post(
        "/admin/logout", data={"csrf": csrf_of(page)}, allow_redirects=False
    )
    assert response.status == 303
    client.session.cookie_jar.clear()
    assert (await client.get("/admin", headers=copied)).status == 401
    assert (await other.get("/admin", headers=copied)).status == 401
    (event,) = await shop.ledger.events(kind="admin_session_revoked")
    assert event.data["session"] in cookie.value


@pytest.mark.parametrize(
    "target",
    [
        "/admin\r\nSet-Cookie: evil=1",
        "/admin\nLocation: https://evil.example",
        "/admin\r",
        "/admin/\x00",
        "/admin/caf\u00e9",
        "/administrator",
    ],
)
async def test_login_with_an_unsafe_next_goes_to_admin(client: Client, target: str) -> None:
    """CR/LF, control or non-ASCII characters in ``next`` give /admin.

    Before the fix a CR/LF reached the Location header and the connection dropped.
    """
    response = await client.post(
        "/admin/login", data={"token": ADMIN_TOKEN, "next": target}, allow_redirects=False
    )
    assert response.status == 303
    assert response.headers["Location"] == "/admin"
    form = await client.get("/admin/login", params={"next": target})
    assert form.status == 200


async def test_failed_logins_are_throttled_per_source(client: Client, shop: Shop) -> None:
    """500 wrong tokens at once: ten are answered 401, the rest 429 with Retry-After.

    The right token from that source waits too; another source is unaffected; the lock-out is
    a security event in the ledger.
    """
    wrong = {"Authorization": "Bearer not-the-token"}
    responses = await asyncio.gather(*(client.get("/admin", headers=wrong) for _ in range(500)))
    statuses = [r.status for r in responses]
    assert statuses.count(401) == 10
    assert statuses.count(429) == 490
    throttled = next(r for r in responses if r.status == 429)
    assert 1 <= int(throttled.headers["Retry-After"]) <= 60
    assert (await client.get("/admin", headers=BEARER)).status == 429
    refused = await client.post("/admin/login", data={"token": ADMIN_TOKEN}, allow_redirects=False)
    assert refused.status == 429
    elsewhere = {**BEARER, "X-Forwarded-For": "198.51.100.7"}  # behind the local proxy
    assert (await client.get("/admin", headers=elsewhere)).status == 200
    (event,) = await shop.ledger.events(kind="admin_auth_locked_out")
    assert event.data["source"] == "127.0.0.1"


async def test_concurrent_wrong_logins_through_the_form_are_throttled_too(
    shop: Shop, aiohttp_client: ClientFactory
) -> None:
    """Forty wrong tokens posted at once, their bodies arriving late: three 401s, the rest 429.

    Each login reads its form before the token is checked; had the source's lock-out been
    looked at only before that read, every guess in flight would pass it (forty guesses, not
    three: a brute force only needs to send its guesses concurrently).
    """
    app = web.Application(middlewares=[context_middleware])
    setup_admin(
        app,
        ledger=shop.ledger,
        vending=shop.vending,
        admin_token=Secret(ADMIN_TOKEN),
        throttle=AuthThrottle(limit=3, window_s=60),
    )
    app.add_routes(admin_routes())
    client = await aiohttp_client(app)
    connections = [await asyncio.open_connection(client.host, client.port) for _ in range(40)]
    for n, (_, writer) in enumerate(connections):
        body = f"token=guess-{n:02d}".encode()
        writer.write(
            b"POST /admin/login HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\ntoken=" % len(body)
        )
        await writer.drain()
    await asyncio.sleep(0.3)  # every handler has begun and waits for the rest of its form
    for n, (_, writer) in enumerate(connections):
        writer.write(f"guess-{n:02d}".encode())
        await writer.drain()
    statuses = []
    for reader, writer in connections:
        status_line = await reader.readline()
        statuses.append(int(status_line.split()[1]))
        writer.close()
    assert statuses.count(401) == 3
    assert statuses.count(429) == 37


async def test_the_lock_out_ends_after_the_window(
    shop: Shop, aiohttp_client: ClientFactory
) -> None:
    """Wrong logins through the form lock the source out for the window, then it may try again."""
    now = [0.0]
    app = web.Application(middlewares=[context_middleware])
    setup_admin(
        app,
        ledger=shop.ledger,
        vending=shop.vending,
        admin_token=Secret(ADMIN_TOKEN),
        throttle=AuthThrottle(limit=3, window_s=30, clock=lambda: now[0]),
    )
    app.add_routes(admin_routes())
    client = await aiohttp_client(app)
    for _ in range(3):
        response = await client.post("/admin/login", data={"token": "guess"})
        assert response.status == 401
    locked = await client.post("/admin/login", data={"token": ADMIN_TOKEN}, allow_redirects=False)
    assert locked.status == 429
    assert locked.headers["Retry-After"] == "30"
    now[0] = 30.5
    assert (
        await client.post("/admin/login", data={"token": ADMIN_TOKEN}, allow_redirects=False)
    ).status == 303


# --------------------------------------------------------------------------------------- vendors


async def test_vendors_page_lists_floats_and_needs_the_token(client: Client, shop: Shop) -> None:
    """Each vendor with its status, float and terminals; no key material; guarded like the rest."""
    vendors = cast("VendorLedger", shop.ledger)
    made = await register_vendor(
        vendors, "corner", name="Corner <shop>", currency="KES", commission_bp=250,
        terminals=("till-1",), actor="test", master_key=bytes(32),
    )  # fmt: skip
    await vendors.top_up_float("corner", 123_450, reference="B1", actor="test")
    await vendors.set_vendor_status("corner", VendorStatus.SUSPENDED, actor="test")
    assert (await client.get("/admin/vendors")).status == 401
    response = await client.get("/admin/vendors", headers=BEARER)
    html = await response.text()
    assert response.status == 200
    assert "Corner &lt;shop&gt;" in html
    assert "KES 1,234.50" in html
    assert "suspended" in html
    assert "2.5 %" in html
    assert "till-1" in html
    assert made.key.secret not in html
    assert made.key.signing_key not in html
    assert "Register a vendor" not in html  # no vendor operations: the page only lists


@pytest.fixture
async def vendor_admin(shop: Shop, aiohttp_client: ClientFactory) -> Client:
    """The admin routes with the vendor operations (register, top up, suspend)."""
    app = web.Application(middlewares=[context_middleware])
    vendors = VendorService(
        shop.vending, shop.ledger, cast("VendorLedger", shop.ledger), clock=shop.clock,
        master_key=VENDOR_MASTER_KEY,
    )  # fmt: skip
    setup_admin(
        app,
        ledger=shop.ledger,
        vending=shop.vending,
        admin_token=Secret(ADMIN_TOKEN),
        clock=shop.clock,
        vendors=vendors,
    )
    app.add_routes(admin_routes())
    return await aiohttp_client(app)


VENDOR_MASTER_KEY = bytes(range(32))


async def test_vendors_are_registered_from_the_page_with_the_secret_shown_once(
    vendor_admin: Client, shop: Shop
) -> None:
    """The form registers a vendor (CSRF checked); the page shows its key once; stored sealed."""
    await login(vendor_admin)
    page = await (await vendor_admin.get("/admin/vendors")).text()
    assert 'action="/admin/vendors"' in page
    form = {
        "vendor_id": "agent-7", "name": "Agent <7>", "currency": "KES", "credit_limit": "500",
        "commission_percent": "1.5", "terminals": "pos-1 pos-2", "allow_ip": "",
        "rate_per_minute": "120",
    }  # fmt: skip
    forged = await vendor_admin.post("/admin/vendors", data=form)
    assert forged.status == 403
    done = await vendor_admin.post("/admin/vendors", data={**form, "csrf": csrf_of(page)})
    html = await done.text()
    assert done.status == 201
    vendors = cast("VendorLedger", shop.ledger)
    (key,) = await vendors.vendor_keys("agent-7")
    secret = re.search(r'class="secret">(vsk_[A-Za-z0-9_-]+)<', html)
    assert secret is not None
    assert key.key_id in html
    assert key.sealed_key is not None
    opened = open_signing_key(
        key.sealed_key, key_id=key.key_id, vendor_id="agent-7", master_key=VENDOR_MASTER_KEY
    )
    assert opened == derive_signing_key(secret.group(1))
    vendor = await vendors.get_vendor("agent-7")
    assert (vendor.credit_limit_minor, vendor.commission_bp, vendor.rate_per_minute) == (
        50_000, 150, 120,
    )  # fmt: skip
    assert [t.terminal_id for t in await vendors.terminals("agent-7")] == ["pos-1", "pos-2"]
    listing = await (await vendor_admin.get("/admin/vendors")).text()
    assert "Agent &lt;7&gt;" in listing
    assert secret.group(1) not in listing  # shown once
    again = await vendor_admin.post("/admin/vendors", data={**form, "csrf": csrf_of(page)})
    assert again.status == 409
    bad = {**form, "vendor_id": "x1", "commission_percent": "150", "csrf": csrf_of(page)}
    refused = await vendor_admin.post("/admin/vendors", data=bad)
    assert refused.status == 400
    assert "commission" in await refused.text()
    assert [v.vendor_id for v in await vendors.list_vendors()] == ["agent-7"]


async def test_floats_are_topped_up_once_per_reference_and_vendors_suspended_from_the_page(
    vendor_admin: Client, shop: Shop
) -> None:
    """Top-up (major units, once per reference), suspend and resume, each behind CSRF."""
    vendors = cast("VendorLedger", shop.ledger)
    await register_vendor(
        vendors, "corner", name="Corner", currency="KES", actor="test",
        master_key=VENDOR_MASTER_KEY,
    )  # fmt: skip
    await login(vendor_admin)
    csrf = csrf_of(await (await vendor_admin.get("/admin/vendors")).text())
    url = "/admin/vendors/corner/top-up"
    paid = {"amount": "1500.50", "reference": "BANK-9", "csrf": csrf}
    assert (await vendor_admin.post(url, data={**paid, "csrf": "0" * 64})).status == 403
    first = await vendor_admin.post(url, data=paid, allow_redirects=False)
    repeat = await vendor_admin.post(url, data=paid, allow_redirects=False)
    assert (first.status, repeat.status) == (303, 303)
    other = await vendor_admin.post(url, data={**paid, "amount": "10"})
    assert other.status == 409
    for amount in ("-5", "0", "1.001", "lots"):
        wrong = await vendor_admin.post(url, data={**paid, "amount": amount, "reference": "B2"})
        assert wrong.status == 400, amount
    assert (await vendor_admin.post("/admin/vendors/nobody/top-up", data=paid)).status == 404
    assert (await vendors.get_vendor("corner")).balance_minor == 150_050
    status_url = "/admin/vendors/corner/status"
    stop = await vendor_admin.post(
        status_url, data={"action": "suspend", "csrf": csrf}, allow_redirects=False
    )
    assert stop.status == 303
    assert (await vendors.get_vendor("corner")).status is VendorStatus.SUSPENDED
    await vendor_admin.post(status_url, data={"action": "resume", "csrf": csrf})
    assert (await vendors.get_vendor("corner")).status is VendorStatus.ACTIVE
    events = await shop.ledger.events(kind="float_top_up")
    assert [e.actor for e in events] == ["admin-web"]


async def test_without_the_vendor_operations_the_page_only_lists(client: Client) -> None:
    """No vendor operations given: no forms, and the POSTs answer 404."""
    page = await (await client.get("/admin/vendors", headers=BEARER)).text()
    assert 'action="/admin/vendors"' not in page
    posted = await client.post(
        "/admin/vendors", data={"vendor_id": "x", "name": "x"}, headers=BEARER
    )
    assert posted.status == 404
