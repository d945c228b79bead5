"""The operator's pages at ``/admin``: search, a purchase's timeline, reprint, stuck purchases.

Pages: ``GET /admin`` (search by phone in any format, meter or purchase id; counts of stuck
purchases), ``GET /admin/stuck/{kind}``, ``GET /admin/purchases/{id}`` (details, payment, token
masked, messages, timeline of events), ``POST /admin/purchases/{id}/reprint`` (the saga resends
the same token), ``POST /admin/purchases/{id}/vend`` (retry a paid or vend-failed purchase's one
vend through the saga), ``/admin/login``, ``/admin/logout``.

Server-rendered HTML (aiohttp-jinja2, autoescape on, no JavaScript), behind the admin token:

* ``Authorization: Bearer <token>`` for scripts; or
* the login form at ``/admin/login``, which sets the ``gw_admin`` cookie (HttpOnly,
  SameSite=Strict, Path=/admin, Secure over HTTPS). The cookie holds ``<issued>.<id>.<mac>``
  where ``id`` is random and ``mac`` is HMAC-SHA256 keyed by the admin token over both: never the
  token itself. A session lasts ``session_ttl_s``; changing the admin token ends every session.
  Logging out revokes the session on the server: an ``admin_session_revoked`` event in the
  ledger, which every instance sharing the ledger checks, so a copy of the cookie is dead too.

Failed credentials (a wrong bearer token, a wrong login) are counted per source address; past
``AuthThrottle.limit`` failures within ``window_s`` that source gets 429 with ``Retry-After``
until the window has passed, and the lock-out is a security event (logged, and appended to the
ledger). The count is per instance. The source is the TCP peer, or, when the peer is a loopback
or private address (the reverse proxy of ``deploy/``), the last ``X-Forwarded-For`` entry.

After login the browser goes to ``next`` only if it is a local path under ``/admin`` of
printable ASCII (no scheme, host, ``//``, backslash or control characters); anything else goes
to ``/admin``.

Every comparison is constant-time (``hmac.compare_digest``). A request without valid credentials
gets 401 with ``WWW-Authenticate: Bearer``; a browser asking for a page is sent to the login form
instead. Every POST made with the cookie carries a CSRF token (an HMAC of the session cookie) in
the form; a POST without it, or with a wrong one, is refused with 403. Bearer requests need none:
a browser never attaches that header on its own, so another site cannot forge it.

Full tokens appear in one place only: the page that confirms a reprint (the operator may read
the token to the customer on the phone). Every other page shows the last four digits; no log line
carries a token; every admin response is ``Cache-Control: no-store`` under a strict
Content-Security-Policy.

Mount it from the composition root::

    setup_admin(app, ledger=ledger, vending=vending, admin_token=config.admin_token)
    app.add_routes(admin_routes())
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable
from urllib.parse import quote, urlsplit

import aiohttp_jinja2
import jinja2
import structlog
from aiohttp import web

from gateway.config import Secret
from gateway.errors import GatewayError
from gateway.money import Money
from gateway.operator import (
    Event,
    NotFound,
    OperatorRecords,
    OutboxMessage,
    OutboxState,
    Purchase,
    PurchaseState,
    Vend,
)
from gateway.phone import InvalidPhoneNumber, Msisdn, masked, parse_msisdn
from gateway.values.clock import UtcClock, utc_now
from gateway.vending import CUSTOMER_INITIATED_CHANNEL, NothingToReprint, NotPaid, VendFailed
from gateway.vendor.service import VendorStatus

if TYPE_CHECKING:
    from gateway.vendor.service import FloatMovement, Registered, Terminal, Vendor

__all__ = [
    "ADMIN",
    "ADMIN_JINJA",
    "COOKIE_NAME",
    "AdminSaga",
    "AdminSite",
    "StuckKind",
    "StuckPolicy",
    "admin_routes",
    "setup_admin",
]

log = structlog.get_logger()

COOKIE_NAME: Final = "gw_admin"
_CSRF_FIELD: Final = "csrf"
_ACTOR: Final = "admin-web"
_PURCHASE_ID: Final = re.compile(r"^P[A-Z2-9]{12}$")
_DRN_LENGTHS: Final = frozenset({11, 13})  # with a 6-digit IIN, with the legacy 4-digit IIN
#: A 20-digit token, bare or in groups of four (``1234-5678-…``, ``1234 5678 …``).
_TOKEN_LIKE: Final = re.compile(r"(?<!\d)\d{4}(?:[ -]?\d{4}){4}(?!\d)")
#: How many purchases a stuck category reads at most; a full page says "at least".
_STUCK_SCAN_LIMIT: Final = 1000
_SEARCH_LIMIT: Final = 50
_CLOCK_SKEW_S: Final = 60
REVOKED_KIND: Final = "admin_session_revoked"
#: Revocations read back per check: far more logouts than happen within a session's lifetime.
_REVOCATIONS_READ: Final = 5000
_SESSION_ID: Final = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_SECURITY_HEADERS: Final[Mapping[str, str]] = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self';"
        " frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class AdminSaga(Protocol):
    """What the admin pages need of the saga (``gateway.vending.Vending`` satisfies it)."""

    async def reprint(self, purchase_id: str, *, actor: str = "operator") -> OutboxMessage:
        """Queue the purchase's token again: the same token, never a new one.

        Raises:
            NothingToReprint: the purchase has no token yet.
            NotFound: no such purchase.
        """
        ...

    async def vend(self, purchase_id: str) -> Vend:
        """Make the paid purchase's one token (a purchase vended already returns its vend).

        Raises:
            NotPaid: the purchase is not paid.
            VendFailed: the engine refused again; the purchase stays VEND_FAILED.
        """
        ...


class StuckKind(StrEnum):
    """Why a purchase needs a look."""

    AWAITING_PAYMENT = "awaiting_payment"
    PAID_NOT_VENDED = "paid_not_vended"
    VENDED_NOT_DELIVERED = "vended_not_delivered"
    NEEDS_OPERATOR = "needs_operator"


_STUCK_STATES: Final[Mapping[StuckKind, tuple[PurchaseState, ...]]] = {
    StuckKind.AWAITING_PAYMENT: (PurchaseState.CREATED, PurchaseState.AWAITING_PAYMENT),
    StuckKind.PAID_NOT_VENDED: (PurchaseState.PAID,),
    StuckKind.VENDED_NOT_DELIVERED: (PurchaseState.VENDED,),
    StuckKind.NEEDS_OPERATOR: (
        PurchaseState.VEND_FAILED,
        PurchaseState.REFUND_PENDING,
        # Only a paybill (c2b) purchase: its confirmation said money moved (_needs_look).
        PurchaseState.PAYMENT_FAILED,
        PurchaseState.EXPIRED,
    ),
}
#: A customer-initiated (paybill) purchase that ended unpaid: money may have been taken.
_UNPAID_ENDS: Final = frozenset({PurchaseState.PAYMENT_FAILED, PurchaseState.EXPIRED})
_STUCK_TITLES: Final[Mapping[StuckKind, str]] = {
    StuckKind.AWAITING_PAYMENT: "Awaiting payment too long",
    StuckKind.PAID_NOT_VENDED: "Paid, not vended",
    StuckKind.VENDED_NOT_DELIVERED: "Vended, not delivered",
    StuckKind.NEEDS_OPERATOR: "Vend failed, refund pending or paybill payment unproven",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class StuckPolicy:
    """How long a purchase may sit in a state before the stuck list shows it. Seconds.

    Attributes:
        awaiting_payment_s: created or awaiting payment for longer than this (since creation).
        paid_not_vended_s: paid, no token, for longer than this (the sweeper should have vended).
        vended_not_delivered_s: token sent, no delivery report, for longer than this.
        needs_operator_s: vend failed or refund pending for longer than this (0: at once).
    """

    awaiting_payment_s: float = 900.0
    paid_not_vended_s: float = 60.0
    vended_not_delivered_s: float = 600.0
    needs_operator_s: float = 0.0

    def threshold(self, kind: StuckKind) -> timedelta:
        """The age past which a purchase of ``kind`` counts as stuck."""
        seconds = {
            StuckKind.AWAITING_PAYMENT: self.awaiting_payment_s,
            StuckKind.PAID_NOT_VENDED: self.paid_not_vended_s,
            StuckKind.VENDED_NOT_DELIVERED: self.vended_not_delivered_s,
            StuckKind.NEEDS_OPERATOR: self.needs_operator_s,
        }[kind]
        return timedelta(seconds=seconds)


@runtime_checkable
class VendorListing(Protocol):
    """What the vendors page reads (the ledger's vendor port has it: gateway/ledger/vendor.py)."""

    async def list_vendors(self) -> list[Vendor]:
        """Every vendor, by id."""
        ...

    async def terminals(self, vendor_id: str) -> list[Terminal]:
        """A vendor's terminals."""
        ...


class VendorOperations(VendorListing, Protocol):
    """What the vendors page does (``gateway.vendor.service.VendorService`` has it)."""

    async def register(self, vendor_id: str, **terms: Any) -> Registered:  # noqa: ANN401 - as register_vendor
        """Register a vendor, its terminals and a first key (its secret shown once)."""
        ...

    async def top_up(
        self, vendor_id: str, amount_minor: int, *, reference: str, actor: str
    ) -> FloatMovement:
        """Add to the float, once per reference."""
        ...

    async def set_status(self, vendor_id: str, status: VendorStatus, *, actor: str) -> Vendor:
        """Suspend or resume a vendor."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminSite:
    """Everything the admin handlers use, stored in the app under ``ADMIN`` by ``setup_admin``."""

    ledger: OperatorRecords
    vending: AdminSaga
    admin_token: Secret = field(repr=False)
    clock: Callable[[], datetime]
    stuck: StuckPolicy
    region: str
    session_ttl_s: float
    throttle: AuthThrottle
    vendors: VendorOperations | None = None
    currency: str = "KES"

    def mac(self, purpose: str, message: str) -> str:
        """HMAC-SHA256, keyed by the admin token, over ``purpose|message`` (hex)."""
        return hmac.new(
            self.admin_token.reveal().encode(), f"{purpose}|{message}".encode(), hashlib.sha256
        ).hexdigest()

    def new_session(self, now_s: int) -> str:
        """A fresh session cookie value issued at ``now_s`` (Unix seconds), with a random id."""
        session_id = secrets.token_urlsafe(18)
        return f"{now_s}.{session_id}.{self.mac('session', f'{now_s}.{session_id}')}"

    def session_id(self, cookie: str, now_s: int) -> str | None:
        """The id of ``cookie`` if issued by ``new_session`` with this token, unexpired; else None.

        Revocation is checked apart, in the ledger (``session_revoked``).
        """
        issued_text, _, rest = cookie.partition(".")
        session_id, _, mac = rest.partition(".")
        if not issued_text.isdigit() or len(issued_text) > 12 or not _SESSION_ID.match(session_id):
            return None
        issued = int(issued_text)
        if not (now_s - self.session_ttl_s <= issued <= now_s + _CLOCK_SKEW_S):
            return None
        expected = self.mac("session", f"{issued_text}.{session_id}")
        return session_id if hmac.compare_digest(mac.encode(), expected.encode()) else None

    def session_is_valid(self, cookie: str, now_s: int) -> bool:
        """Whether ``cookie`` was issued by ``new_session`` with this token and has not expired."""
        return self.session_id(cookie, now_s) is not None

    async def session_revoked(self, session_id: str) -> bool:
        """Whether a logout on any instance sharing the ledger revoked ``session_id``."""
        events = await self.ledger.events(kind=REVOKED_KIND, limit=_REVOCATIONS_READ)
        return any(event.data.get("session") == session_id for event in events)

    async def revoke_session(self, session_id: str, *, remote: str | None) -> None:
        """End ``session_id`` on every instance (an audit event in the ledger)."""
        await self.ledger.append_event(
            None, REVOKED_KIND, actor=_ACTOR, data={"session": session_id, "remote": remote}
        )

    def token_matches(self, presented: str) -> bool:
        """Whether ``presented`` is the admin token (constant time)."""
        return hmac.compare_digest(presented.encode(), self.admin_token.reveal().encode())

    def csrf_for(self, session: str) -> str:
        """The CSRF token bound to one session cookie."""
        return self.mac("csrf", session)


class AuthThrottle:
    """Failed admin credentials counted per source; past ``limit`` in ``window_s``: refused.

    In memory, per instance (several instances each allow ``limit``); at most ``max_sources``
    sources are remembered, the least recently failing forgotten first.
    """

    def __init__(
        self,
        *,
        limit: int = 10,
        window_s: float = 60.0,
        max_sources: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self._max_sources = max_sources
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, source: str, now: float) -> deque[float]:
        failures = self._failures.get(source)
        if failures is None:
            return deque()
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[source]
        return failures

    def retry_after(self, source: str) -> int | None:
        """Seconds until ``source`` may try again, or None if it may now."""
        now = self._clock()
        failures = self._recent(source, now)
        if len(failures) < self.limit:
            return None
        return max(1, int(failures[-self.limit] + self.window_s - now + 0.999))

    def failed(self, source: str) -> bool:
        """Count one failure; True when it is the one that locks ``source`` out."""
        now = self._clock()
        failures = self._recent(source, now)
        failures.append(now)
        self._failures[source] = failures
        self._failures.move_to_end(source)
        while len(self._failures) > self._max_sources:
            self._failures.popitem(last=False)
        return len(failures) == self.limit


def _source(request: web.Request) -> str:
    """Who is trying: the TCP peer, or behind a local/private proxy its X-Forwarded-For."""
    remote = request.remote or "unknown"
    try:
        proxied = ipaddress.ip_address(remote).is_private  # loopback is private too
    except ValueError:
        proxied = False
    forwarded = request.headers.get("X-Forwarded-For", "")
    if proxied and forwarded:
        return forwarded.rsplit(",", 1)[-1].strip()[:64] or remote
    return remote


ADMIN: Final = web.AppKey("admin", AdminSite)
ADMIN_JINJA: Final = web.AppKey("admin_jinja2", jinja2.Environment)


def setup_admin(  # noqa: PLR0913 - every collaborator named, each with a default but two
    app: web.Application,
    *,
    ledger: OperatorRecords,
    vending: AdminSaga,
    admin_token: Secret,
    clock: UtcClock = utc_now,
    stuck: StuckPolicy | None = None,
    region: str = "KE",
    session_ttl_s: float = 12 * 3600,
    throttle: AuthThrottle | None = None,
    vendors: VendorOperations | None = None,
    currency: str = "KES",
) -> None:
    """Prepare ``app`` for the admin pages: their collaborators and the Jinja2 environment.

    Add the routes with ``app.add_routes(admin_routes())``.

    Args:
        app: the application the routes will be added to.
        ledger: where purchases, events, vends and messages are read (the ledger).
        vending: the saga (reprints go through it, never around it).
        admin_token: the operator's secret; at least 16 characters.
        clock: UTC time source (ages of stuck purchases, session expiry).
        stuck: when a purchase counts as stuck.
        region: default region for phone numbers typed without a country code.
        session_ttl_s: how long a login lasts.
        throttle: how many failed credentials a source may present (default 10 a minute).
        vendors: the vendor API's operations (register, top up, suspend on the vendors page);
            without them the page only lists.
        currency: the registration form's default currency.

    Raises:
        ValueError: the admin token is shorter than 16 characters.
    """
    if len(admin_token.reveal()) < 16:
        raise ValueError("the admin token must be at least 16 characters")
    app[ADMIN] = AdminSite(
        ledger=ledger,
        vending=vending,
        admin_token=admin_token,
        clock=clock,
        stuck=stuck or StuckPolicy(),
        region=region,
        session_ttl_s=session_ttl_s,
        throttle=throttle or AuthThrottle(),
        vendors=vendors,
        currency=currency,
    )
    aiohttp_jinja2.setup(
        app,
        app_key=ADMIN_JINJA,
        loader=jinja2.PackageLoader("gateway.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        default_helpers=False,
        filters=_FILTERS,
    )


def admin_routes() -> list[web.RouteDef]:
    """The admin routes, all under ``/admin`` (see the module docstring for their guard)."""
    return [
        web.get("/admin", _index, name="admin_index"),
        web.get("/admin/", _index),
        web.get("/admin/login", _login_form, name="admin_login"),
        web.post("/admin/login", _login),
        web.post("/admin/logout", _logout),
        web.get("/admin/stuck/{kind}", _stuck_list, name="admin_stuck"),
        web.get("/admin/vendors", _vendors_list, name="admin_vendors"),
        web.post("/admin/vendors", _vendor_register),
        web.post("/admin/vendors/{vendor_id}/top-up", _vendor_top_up),
        web.post("/admin/vendors/{vendor_id}/status", _vendor_status),
        web.get("/admin/purchases/{purchase_id}", _purchase, name="admin_purchase"),
        web.post("/admin/purchases/{purchase_id}/reprint", _reprint),
        web.post("/admin/purchases/{purchase_id}/vend", _retry_vend),
        web.get("/admin/static/admin.css", _stylesheet),
    ]


# ------------------------------------------------------------------------------- presentation


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "—"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _when_short(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _kwh(units: int) -> str:
    return f"{units // 10}.{units % 10}"


def _money(amount: Money | None) -> str:
    return "—" if amount is None else str(amount)


def _age(now: datetime, then: datetime) -> str:
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def _mask_value(key: str, value: Any) -> str:  # noqa: ANN401 - event data is free-form JSON
    """Event data for the screen: anything that looks like a full token is cut to 4 digits."""
    text = value if isinstance(value, str) else str(value)
    if "token" in key.lower() and not key.lower().endswith("last4") and len(text) > 4:
        return "****" + text[-4:]
    return _TOKEN_LIKE.sub(lambda m: "****" + m.group(0)[-4:], text)


def _event_rows(events: Sequence[Event]) -> list[dict[str, Any]]:
    return [
        {
            "at": event.at,
            "kind": event.kind,
            "actor": event.actor,
            "data": [(key, _mask_value(key, value)) for key, value in sorted(event.data.items())],
        }
        for event in events
    ]


_FILTERS: Final[Mapping[str, Callable[..., str]]] = {
    "when": _when,
    "when_short": _when_short,
    "kwh": _kwh,
    "money": _money,
}


def _group_token(token: str) -> str:
    return "-".join(token[i : i + 4] for i in range(0, len(token), 4))


def _render(
    request: web.Request,
    template: str,
    context: Mapping[str, Any],
    *,
    status: int = 200,
    csrf: str | None = None,
    via: str = "",
) -> web.Response:
    site = request.app[ADMIN]
    full = {"csrf": csrf, "via": via, "now": site.clock(), **context}
    response = aiohttp_jinja2.render_template(
        template, request, full, app_key=ADMIN_JINJA, status=status
    )
    response.headers.update(_SECURITY_HEADERS)
    return response


# ------------------------------------------------------------------------------------- the guard


def _see_other(location: str) -> web.Response:
    """A 303 to ``location`` (a path of ours) with the admin security headers."""
    return web.Response(status=303, headers={**_SECURITY_HEADERS, "Location": location})


@dataclass(frozen=True, slots=True, kw_only=True)
class _Operator:
    """An authenticated request: how it proved itself, and the CSRF token of its session."""

    via: str  # "bearer" or "cookie"
    csrf: str | None
    session_id: str | None = None


_Page = Callable[[web.Request, _Operator], Awaitable[web.StreamResponse]]


def _now_s(site: AdminSite) -> int:
    return int(site.clock().timestamp())


async def _authenticate(request: web.Request) -> _Operator | bool | None:
    """The operator, None when no credentials came, False when wrong ones came."""
    site = request.app[ADMIN]
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, presented = header.partition(" ")
        if scheme.lower() == "bearer" and site.token_matches(presented.strip()):
            return _Operator(via="bearer", csrf=None)
        return False
    cookie = request.cookies.get(COOKIE_NAME)
    if cookie is None:
        return None
    session_id = site.session_id(cookie, _now_s(site))
    if session_id is None:
        return False
    if await site.session_revoked(session_id):
        log.warning("admin_revoked_session_used", security_event=True, remote=request.remote)
        return False
    return _Operator(via="cookie", csrf=site.csrf_for(cookie), session_id=session_id)


def _too_many(request: web.Request) -> web.Response | None:
    """429 with Retry-After when the request's source is locked out; None otherwise."""
    site = request.app[ADMIN]
    source = _source(request)
    wait_s = site.throttle.retry_after(source)
    if wait_s is None:
        return None
    log.warning("admin_auth_throttled", security_event=True, source=source, retry_after=wait_s)
    return web.Response(
        status=429,
        text=f"too many failed attempts: try again in {wait_s} s\n",
        headers={**_SECURITY_HEADERS, "Retry-After": str(wait_s)},
    )


async def _failed(request: web.Request, kind: str) -> None:
    """Count a failed credential; the failure that locks the source out is a ledger event."""
    site = request.app[ADMIN]
    source = _source(request)
    log.warning(kind, security_event=True, path=request.path, source=source)
    if site.throttle.failed(source):
        data = {
            "source": source,
            "failures": site.throttle.limit,
            "window_s": site.throttle.window_s,
        }
        log.warning("admin_auth_locked_out", security_event=True, **data)
        await site.ledger.append_event(None, "admin_auth_locked_out", actor=_ACTOR, data=data)


def _wants_html(request: web.Request) -> bool:
    return request.method == "GET" and "text/html" in request.headers.get("Accept", "")


async def _unauthorized(request: web.Request, *, wrong: bool) -> web.Response:
    if wrong:
        await _failed(request, "admin_auth_failed")
    if _wants_html(request):
        response = _see_other(f"/admin/login?next={quote(request.path_qs, safe='')}")
        if wrong:
            response.del_cookie(COOKIE_NAME, path="/admin")
        return response
    return web.Response(
        status=401,
        text="admin token required\n",
        headers={**_SECURITY_HEADERS, "WWW-Authenticate": 'Bearer realm="gateway admin"'},
    )


def _guarded(page: _Page) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Wrap an admin page: credentials first, then the CSRF token on every cookie POST."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if "Authorization" in request.headers and (refused := _too_many(request)) is not None:
            return refused
        operator = await _authenticate(request)
        if not isinstance(operator, _Operator):
            return await _unauthorized(request, wrong=operator is False)
        if request.method == "POST" and operator.via == "cookie":
            form = await request.post()
            sent = form.get(_CSRF_FIELD)
            if not (
                isinstance(sent, str)
                and operator.csrf is not None
                and hmac.compare_digest(sent.encode(), operator.csrf.encode())
            ):
                log.warning("admin_csrf_refused", path=request.path, remote=request.remote)
                return web.Response(
                    status=403,
                    text="missing or wrong CSRF token: reload the page and try again\n",
                    headers=dict(_SECURITY_HEADERS),
                )
        return await page(request, operator)

    handler.__doc__ = page.__doc__
    return handler


def _safe_next(target: str | None) -> str:
    """Where to go after login: only a local path under /admin (never another site).

    Printable ASCII only: a CR or LF would split the ``Location`` header.
    """
    if not target or len(target) > 2000:
        return "/admin"
    if not (target.isascii() and target.isprintable()) or "\\" in target:
        return "/admin"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or target.startswith("//"):
        return "/admin"
    if parts.path != "/admin" and not parts.path.startswith("/admin/"):
        return "/admin"
    return target


async def _login_form(request: web.Request) -> web.Response:
    """The login form (GET /admin/login)."""
    return _render(
        request,
        "admin/login.html",
        {"next": _safe_next(request.query.get("next")), "error": None},
    )


async def _login(request: web.Request) -> web.StreamResponse:
    """Check the token typed in the form; on success set the session cookie and go on."""
    site = request.app[ADMIN]
    refused = _too_many(request)
    if refused is not None:
        return refused
    form = await request.post()
    # Again after the form's read: guesses sent concurrently all passed the check above while
    # their bodies came in; between this check and the failure's count nothing awaits.
    refused = _too_many(request)
    if refused is not None:
        return refused
    presented = form.get("token")
    target = _safe_next(str(form.get("next") or ""))
    if not (isinstance(presented, str) and site.token_matches(presented.strip())):
        await _failed(request, "admin_login_failed")
        return _render(
            request,
            "admin/login.html",
            {"next": target, "error": "That is not the admin token."},
            status=401,
        )
    response = _see_other(target)
    response.set_cookie(
        COOKIE_NAME,
        site.new_session(_now_s(site)),
        max_age=int(site.session_ttl_s),
        path="/admin",
        httponly=True,
        samesite="Strict",
        secure=request.secure or request.headers.get("X-Forwarded-Proto") == "https",
    )
    log.info("admin_logged_in", remote=request.remote)
    return response


async def _logout_page(request: web.Request, operator: _Operator) -> web.StreamResponse:
    """End the cookie session, on the server too (a copy of the cookie no longer works)."""
    if operator.session_id is not None:
        await request.app[ADMIN].revoke_session(operator.session_id, remote=_source(request))
        log.info("admin_logged_out", remote=request.remote)
    response = _see_other("/admin/login")
    response.del_cookie(COOKIE_NAME, path="/admin")
    return response


_logout = _guarded(_logout_page)


async def _stylesheet(request: web.Request) -> web.Response:
    """The admin pages' stylesheet (public: it holds nothing secret)."""
    env = request.app[ADMIN_JINJA]
    css = env.get_template("admin/admin.css.jinja2").render()
    return web.Response(
        text=css,
        content_type="text/css",
        headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"},
    )


# ----------------------------------------------------------------------------------- the queries


@dataclass(frozen=True, slots=True, kw_only=True)
class _Match:
    """A search result: the purchase and what in the query matched it."""

    purchase: Purchase
    matched_by: str


async def _search(site: AdminSite, query: str) -> tuple[list[_Match], list[str]]:
    """Purchases matching ``query`` as a purchase id, a meter number or a phone number.

    Returns the matches (newest first, each once) and how the query was understood.
    """
    text = query.strip()
    understood: list[str] = []
    found: dict[str, _Match] = {}
    candidate = text.upper()
    if _PURCHASE_ID.match(candidate):
        understood.append(f"purchase {candidate}")
        try:
            purchase = await site.ledger.get_purchase(candidate)
        except NotFound:
            pass
        else:
            found[purchase.purchase_id] = _Match(purchase=purchase, matched_by="purchase id")
    compact = re.sub(r"[\s-]", "", text)
    if compact.isdigit() and len(compact) in _DRN_LENGTHS:
        understood.append(f"meter {compact}")
        for purchase in await site.ledger.find_purchases(meter=compact, limit=_SEARCH_LIMIT):
            found.setdefault(purchase.purchase_id, _Match(purchase=purchase, matched_by="meter"))
    try:
        phone: Msisdn | None = parse_msisdn(text, site.region)
    except InvalidPhoneNumber:
        phone = None
    if phone is not None:
        understood.append(f"phone {phone}")
        for purchase in await site.ledger.find_purchases(phone=phone, limit=_SEARCH_LIMIT):
            found.setdefault(purchase.purchase_id, _Match(purchase=purchase, matched_by="phone"))
    matches = sorted(found.values(), key=lambda m: m.purchase.created_at, reverse=True)
    return matches, understood


def _age_basis(kind: StuckKind, purchase: Purchase) -> datetime:
    """When a purchase entered the state its stuck kind watches."""
    return purchase.created_at if kind is StuckKind.AWAITING_PAYMENT else purchase.updated_at


def _needs_look(purchase: Purchase) -> bool:
    """False for an unpaid end nobody said was paid (a prompt the customer let go)."""
    return purchase.state not in _UNPAID_ENDS or purchase.channel == CUSTOMER_INITIATED_CHANNEL


async def _stuck(site: AdminSite, kind: StuckKind) -> tuple[list[Purchase], bool]:
    """The purchases stuck in ``kind``, oldest first, and whether the scan hit its limit."""
    cutoff = site.clock() - site.stuck.threshold(kind)
    rows = await site.ledger.find_purchases(states=_STUCK_STATES[kind], limit=_STUCK_SCAN_LIMIT)
    stuck = [p for p in rows if _age_basis(kind, p) <= cutoff and _needs_look(p)]
    stuck.sort(key=lambda p: _age_basis(kind, p))
    return stuck, len(rows) >= _STUCK_SCAN_LIMIT


# -------------------------------------------------------------------------------------- the pages


async def _index_page(request: web.Request, operator: _Operator) -> web.StreamResponse:
    """Search (by phone in any format, meter or purchase id) and the stuck purchases' counts."""
    site = request.app[ADMIN]
    query = request.query.get("q", "").strip()[:64]
    matches: list[_Match] = []
    understood: list[str] = []
    if query:
        matches, understood = await _search(site, query)
        if len(matches) == 1 and matches[0].matched_by == "purchase id":
            target = f"/admin/purchases/{matches[0].purchase.purchase_id}"
            return _see_other(target)
    counts = []
    for kind in StuckKind:
        stuck, capped = await _stuck(site, kind)
        counts.append(
            {
                "kind": kind.value,
                "title": _STUCK_TITLES[kind],
                "count": len(stuck),
                "capped": capped,
            }
        )
    return _render(
        request,
        "admin/index.html",
        {
            "query": query,
            "understood": understood,
            "rows": [{"purchase": m.purchase, "note": m.matched_by} for m in matches],
            "stuck": counts,
        },
        csrf=operator.csrf,
        via=operator.via,
    )


async def _stuck_page(request: web.Request, operator: _Operator) -> web.StreamResponse:
    """The purchases stuck in one category, oldest first, with their age."""
    site = request.app[ADMIN]
    try:
        kind = StuckKind(request.match_info["kind"])
    except ValueError:
        raise web.HTTPNotFound(text="no such list\n") from None
    stuck, capped = await _stuck(site, kind)
    now = site.clock()
    rows = [{"purchase": p, "note": _age(now, _age_basis(kind, p))} for p in stuck]
    return _render(
        request,
        "admin/stuck.html",
        {
            "kind": kind.value,
            "title": _STUCK_TITLES[kind],
            "threshold": _age(now, now - site.stuck.threshold(kind)),
            "rows": rows,
            "capped": capped,
            "scan_limit": _STUCK_SCAN_LIMIT,
        },
        csrf=operator.csrf,
        via=operator.via,
    )


async def _vendor_rows(site: AdminSite) -> list[dict[str, Any]]:
    listing = site.vendors if site.vendors is not None else site.ledger
    rows: list[dict[str, Any]] = []
    if isinstance(listing, VendorListing):
        for v in await listing.list_vendors():
            terminals = await listing.terminals(v.vendor_id)
            rows.append(
                {
                    "vendor": v,
                    "float": _money(Money(v.balance_minor, v.currency)),
                    "credit_limit": _money(Money(v.credit_limit_minor, v.currency)),
                    "commission": f"{v.commission_bp / 100:g} %",
                    "terminals": ", ".join(t.terminal_id for t in terminals),
                }
            )
    return rows


async def _render_vendors(
    request: web.Request,
    operator: _Operator,
    *,
    error: str | None = None,
    status: int = 200,
    form: Mapping[str, str] | None = None,
) -> web.Response:
    site = request.app[ADMIN]
    return _render(
        request,
        "admin/vendors.html",
        {
            "rows": await _vendor_rows(site),
            "manage": site.vendors is not None,
            "currency": site.currency,
            "error": error,
            "form": dict(form or {}),
        },
        status=status,
        csrf=operator.csrf,
        via=operator.via,
    )


async def _vendors_page(request: web.Request, operator: _Operator) -> web.StreamResponse:
    """The vendors (vendor API): status, float, credit limit, commission, terminals.

    With the vendor operations: register a vendor (its key's secret shown once), top up a
    float, suspend or resume; ``gateway vendors`` does the same and more (keys, terminals).
    """
    return await _render_vendors(request, operator)


def _field(form: Mapping[str, Any], name: str, limit: int = 200) -> str:
    value = form.get(name, "")
    return value.strip()[:limit] if isinstance(value, str) else ""


def _minor(text: str, currency: str, what: str) -> int:
    try:
        value = Money.of(text or "0", currency).amount_minor
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from exc
    if value < 0:
        raise ValueError(f"{what}: cannot be negative")
    return value


def _basis_points(text: str) -> int:
    try:
        value = Decimal(text or "0") * 100
    except InvalidOperation as exc:
        raise ValueError(f"commission: not a number: {text!r}") from exc
    if not value.is_finite() or value != value.to_integral_value() or not 0 <= value <= 10_000:
        raise ValueError("commission: 0 to 100 %, two decimals at most")
    return int(value)


async def _vendor_register_page(request: web.Request, operator: _Operator) -> web.StreamResponse:
    """Register a vendor from the form; show its first key's secret once."""
    site = request.app[ADMIN]
    if site.vendors is None:
        return await _render_vendors(
            request, operator, error="vendor operations are off", status=404
        )
    form = await request.post()
    kept = {name: _field(form, name) for name in _VENDOR_FIELDS}
    currency = (kept["currency"] or site.currency).upper()
    try:
        registered = await site.vendors.register(
            kept["vendor_id"],
            name=kept["name"],
            currency=currency,
            credit_limit_minor=_minor(kept["credit_limit"], currency, "credit limit"),
            commission_bp=_basis_points(kept["commission_percent"]),
            ip_allowlist=tuple(kept["allow_ip"].replace(",", " ").split()),
            terminals=tuple(kept["terminals"].replace(",", " ").split()),
            rate_per_minute=int(kept["rate_per_minute"] or "600"),
            actor=_ACTOR,
        )
    except ValueError as exc:
        return await _render_vendors(request, operator, error=str(exc), status=400, form=kept)
    except GatewayError as exc:  # DuplicateError: the id is taken
        return await _render_vendors(request, operator, error=str(exc), status=409, form=kept)
    log.info(
        "admin_vendor_registered", vendor=registered.vendor.vendor_id, key_id=registered.key.key_id
    )
    return _render(
        request,
        "admin/vendor_registered.html",
        {
            "vendor": registered.vendor,
            "key_id": registered.key.key_id,
            "secret": registered.key.secret,
        },
        status=201,
        csrf=operator.csrf,
        via=operator.via,
    )


_VENDOR_FIELDS: Final = (
    "vendor_id",
    "name",
    "currency",
    "credit_limit",
    "commission_percent",
    "allow_ip",
    "terminals",
    "rate_per_minute",
)


async def _vendor_top_up_page(request: web.Request, operator: _Operator) -> web.StreamResponse:
    """Add to a vendor's float (once per reference), then back to the list."""
    site = request.app[ADMIN]
    vendor_id = request.match_info["vendor_id"]
    if site.vendors is None:
        return await _render_vendors(
            request, operator, error="vendor operations are off", status=404
        )
    form = await request.post()
    known = {v.vendor_id: v for v in await site.vendors.list_vendors()}
    if vendor_id not in known:
        return await _render_vendors(request, operator, error=f"no vendor {vendor_id}", status=404)
    vendor = known[vendor_id]
    try:
        amount = _minor(_field(form, "amount"), vendor.currency, "amount")
        moved = await site.vendors.top_up(
            vendor_id, amount, reference=_field(form, "reference", 100), actor=_ACTOR
        )
    except ValueError as exc:
        return await _render_vendors(request, operator, error=str(exc), status=400)
    except GatewayError as exc:  # the reference was used for another amount
        return await _render_vendors(request, operator, error=str(exc), status=409)
    log.info(
        "admin_vendor_topped_up",
        vendor=vendor_id,
        amount_minor=moved.amount_minor,
        reference=moved.reference,
    )
    return _see_other("/admin/vendors")


async def _vendor_status_page(request: web.Request, operator: _Operator) -> web.StreamResponse:
    """Suspend (``action=suspend``) or resume (``action=resume``) a vendor's sales."""
    site = request.app[ADMIN]
    vendor_id = request.match_info["vendor_id"]
    if site.vendors is None:
        return await _render_vendors(
            request, operator, error="vendor operations are off", status=404
        )
    form = await request.post()
    action = _field(form, "action")
    if action not in {"suspend", "resume"}:
        return await _render_vendors(
            request, operator, error="action: suspend or resume", status=400
        )
    target = VendorStatus.SUSPENDED if action == "suspend" else VendorStatus.ACTIVE
    try:
        await site.vendors.set_status(vendor_id, target, actor=_ACTOR)
    except NotFound:
        return await _render_vendors(request, operator, error=f"no vendor {vendor_id}", status=404)
    log.info("admin_vendor_status", vendor=vendor_id, status=target.value)
    return _see_other("/admin/vendors")


async def _purchase_page(request: web.Request, operator: _Operator) -> web.StreamResponse:
    """One purchase: its details, payment, token (masked), messages and timeline of events."""
    site = request.app[ADMIN]
    purchase_id = request.match_info["purchase_id"].upper()
    try:
        purchase = await site.ledger.get_purchase(purchase_id)
    except NotFound:
        return _render(
            request,
            "admin/not_found.html",
            {"what": f"purchase {purchase_id}"},
            status=404,
            csrf=operator.csrf,
            via=operator.via,
        )
    payment = None
    if purchase.provider_reference is not None:
        payment = await site.ledger.get_payment(purchase.provider, purchase.provider_reference)
    vend = await site.ledger.get_vend(purchase.purchase_id)
    messages = await site.ledger.outbox_for(purchase.purchase_id)
    events = await site.ledger.timeline(purchase.purchase_id)
    debt_recovery = (
        await site.ledger.get_debt_recovery(purchase.purchase_id)
        if purchase.debt_recovery_minor
        else None
    )
    return _render(
        request,
        "admin/purchase.html",
        {
            "purchase": purchase,
            "debt_recovery": debt_recovery,
            "phone_masked": masked(purchase.phone) if purchase.phone else None,
            "payment": payment,
            "vend": vend,
            "messages": messages,
            "events": _event_rows(events),
        },
        csrf=operator.csrf,
        via=operator.via,
    )


async def _reprint_page(request: web.Request, operator: _Operator) -> web.StreamResponse:
    """Send the purchase's token again through the saga; show it once, to the operator."""
    site = request.app[ADMIN]
    purchase_id = request.match_info["purchase_id"].upper()
    try:
        purchase = await site.ledger.get_purchase(purchase_id)
        message = await site.vending.reprint(purchase_id, actor=_ACTOR)
    except NotFound:
        return _render(
            request,
            "admin/not_found.html",
            {"what": f"purchase {purchase_id}"},
            status=404,
            csrf=operator.csrf,
            via=operator.via,
        )
    except NothingToReprint as exc:
        return _render(
            request,
            "admin/refused.html",
            {"purchase_id": purchase_id, "reason": str(exc), "title": "Cannot resend"},
            status=409,
            csrf=operator.csrf,
            via=operator.via,
        )
    vend = await site.ledger.get_vend(purchase_id)
    if vend is None:  # pragma: no cover - reprint succeeded, so the vend exists
        raise web.HTTPInternalServerError(text="vend vanished\n")
    log.info(
        "admin_reprint_queued",
        purchase_id=purchase_id,
        message_id=message.message_id,
        token=vend.masked_token,
    )
    return _render(
        request,
        "admin/reprinted.html",
        {
            "purchase": purchase,
            "vend": vend,
            "token_grouped": _group_token(vend.token),
            "message": message,
            "held": message.state is OutboxState.HELD,
        },
        csrf=operator.csrf,
        via=operator.via,
    )


async def _retry_vend_page(request: web.Request, operator: _Operator) -> web.StreamResponse:
    """Retry a paid purchase's vend (after the cause of a vend failure was fixed), via the saga.

    The saga makes at most one token per purchase: a purchase vended already keeps its token.
    """
    site = request.app[ADMIN]
    purchase_id = request.match_info["purchase_id"].upper()
    try:
        vend = await site.vending.vend(purchase_id)
    except NotFound:
        return _render(
            request,
            "admin/not_found.html",
            {"what": f"purchase {purchase_id}"},
            status=404,
            csrf=operator.csrf,
            via=operator.via,
        )
    except (NotPaid, VendFailed) as exc:
        log.warning("admin_vend_retry_refused", purchase_id=purchase_id, reason=str(exc))
        return _render(
            request,
            "admin/refused.html",
            {"purchase_id": purchase_id, "reason": str(exc), "title": "Cannot vend"},
            status=409,
            csrf=operator.csrf,
            via=operator.via,
        )
    log.info("admin_vend_retried", purchase_id=purchase_id, token=vend.masked_token)
    return _see_other(f"/admin/purchases/{purchase_id}")


_index = _guarded(_index_page)
_stuck_list = _guarded(_stuck_page)
_vendors_list = _guarded(_vendors_page)
_vendor_register = _guarded(_vendor_register_page)
_vendor_top_up = _guarded(_vendor_top_up_page)
_vendor_status = _guarded(_vendor_status_page)
_purchase = _guarded(_purchase_page)
_reprint = _guarded(_reprint_page)
_retry_vend = _guarded(_retry_vend_page)
