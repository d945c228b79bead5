"""The vendor API's rules: who may call, what a meter and an amount give, and the idempotent vend.

The web layer (``gateway/web/vendor.py``) only turns HTTP into calls of ``VendorService`` and its
``Answer`` back into HTTP. Everything that moves money goes through the saga
(``Vending.vend_from_float``: the float's debit, the vend and its tokens in one ledger
transaction) and the ledger's vendor port (``VendorLedger``).

Idempotency (``POST /vendor/v1/vends`` with ``Idempotency-Key``, scoped by vendor): the first
request claims the key and runs; its answer's bytes are stored, and every later request with the
same key and body gets those bytes back (no second vend, no second debit). The same key with
another body is 422 ``idempotency_key_reused``; while the first run holds its lease, 409
``request_in_progress``. A run that outlives ``engine_wait_s`` answers 202 with the vend's status
URL and finishes in the background. A run whose process died is resumed by the next request with
its key once the lease ends (the purchase and the vend are idempotent themselves).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from typing import Any, Final

import structlog

from gateway.errors import GatewayError
from gateway.ledger import (
    FloatDebit,
    IdempotencyConflict,
    Ledger,
    LedgerError,
    MeterNumber,
    MeterStatus,
    NotFound,
    mask_name,
)
from gateway.ledger.vendor import (
    ClaimOutcome,
    FloatMovement,
    InsufficientFloat,
    MovementKind,
    RequestState,
    Terminal,
    TokenAlreadyIssued,
    Vendor,
    VendorDraft,
    VendorKey,
    VendorLedger,
    VendorRequest,
    VendorStatus,
    VendorSuspended,
)
from gateway.money import Money
from gateway.phone import InvalidPhoneNumber, Msisdn, parse_msisdn
from gateway.tariff import AmountAboveMaximum, AmountBelowMinimum, Quote, TariffError
from gateway.vending import (
    VENDOR_CHANNEL,
    MeterBlocked,
    UnknownMeter,
    VendFailed,
    Vending,
)
from gateway.vendor import sealing, signing
from gateway.vendor.limits import Bucket, LocalRateLimiter, RateLimiter, retry_after

log = structlog.get_logger()

#: The ledger's vendor value types, for the web layer (which never imports the ledger).
__all__ = [
    "Answer",
    "Caller",
    "FloatMovement",
    "LocalRateLimiter",
    "Problem",
    "RateLimiter",
    "Registered",
    "Statement",
    "Terminal",
    "Vendor",
    "VendorKey",
    "VendorService",
    "VendorStatus",
    "add_terminal",
    "add_vendor_key",
    "register_vendor",
    "reseal_vendor_keys",
    "rotate_vendor_key",
    "vendor_statement",
]

PROBLEM_TYPE: Final = "https://sts-gateway.invalid/problems/"
#: How long a run holds its key before another request may resume it.
LEASE_S: Final = 30.0
#: How long a vend request waits for the engine before answering 202.
ENGINE_WAIT_S: Final = 10.0
IDEMPOTENCY_KEY_MAX: Final = 100
BASIS_POINTS: Final = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """An HTTP answer: status, the exact body bytes, the media type and extra headers."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


def to_json(data: Mapping[str, Any]) -> bytes:
    """The API's JSON bytes (sorted keys, one line, a final newline): stable for replays."""
    return (json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n").encode()


class Problem(GatewayError):
    """An RFC 9457 problem: a stable ``code``, an HTTP status and a human ``detail``."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        **extra: object,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = extra

    def answer(self) -> Answer:
        """The problem as ``application/problem+json``."""
        body = {
            "type": PROBLEM_TYPE + self.code,
            "title": self.code.replace("_", " "),
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
            **self.extra,
        }
        return Answer(
            status=self.status,
            body=to_json(body),
            content_type="application/problem+json",
            headers=self.headers,
        )


# -- authentication ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Caller:
    """An authenticated request's vendor, terminal and key."""

    vendor: Vendor
    terminal: str | None
    key: VendorKey


def _allowed(remote: str | None, allowlist: tuple[str, ...]) -> bool:
    if not allowlist:
        return True
    if remote is None:
        return False
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(entry, strict=False) for entry in allowlist)


# -- the service --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Registered:
    """A vendor just registered, with its first key (the secret shown once)."""

    vendor: Vendor
    key: signing.NewKey


@dataclass(frozen=True, slots=True, kw_only=True)
class Statement:
    """A vendor's float over one UTC day: opening, movements, closing and totals."""

    vendor: Vendor
    day: date
    opening_minor: int
    closing_minor: int
    movements: list[FloatMovement]

    def totals(self) -> dict[str, int]:
        """Sums by kind (debits as positive amounts) and the commission earned."""
        by_kind = dict.fromkeys(MovementKind, 0)
        for movement in self.movements:
            by_kind[movement.kind] += movement.amount_minor
        return {
            "top_ups_minor": by_kind[MovementKind.TOP_UP],
            "debits_minor": -by_kind[MovementKind.DEBIT],
            "refunds_minor": by_kind[MovementKind.REFUND],
            "commission_minor": sum(
                m.commission_minor for m in self.movements if m.kind is MovementKind.DEBIT
            ),
            "sales": sum(1 for m in self.movements if m.kind is MovementKind.DEBIT),
        }


def _units_text(units: int) -> str:
    return f"{units // 10}.{units % 10}"


# -- operators (the CLI and the admin page call these directly) ----------------------------------


async def register_vendor(  # noqa: PLR0913 - a vendor's terms
    vendors: VendorLedger,
    vendor_id: str,
    *,
    name: str,
    currency: str,
    master_key: bytes,
    credit_limit_minor: int = 0,
    commission_bp: int = 0,
    ip_allowlist: tuple[str, ...] = (),
    terminals: tuple[str, ...] = (),
    rate_per_minute: int = 600,
    actor: str,
) -> Registered:
    """Register a vendor, its terminals and a first key with every scope.

    Raises:
        ValueError: a term is malformed. DuplicateError: the vendor exists.
    """
    if not _ID.fullmatch(vendor_id):
        raise ValueError(f"a vendor id is 1-40 letters, digits, '-' and '_': {vendor_id!r}")
    if not name.strip():
        raise ValueError("a vendor has a name")
    if not 0 <= commission_bp <= BASIS_POINTS:
        raise ValueError(f"commission is 0 to 10,000 basis points, not {commission_bp}")
    if credit_limit_minor < 0:
        raise ValueError(f"a credit limit cannot be negative: {credit_limit_minor}")
    if rate_per_minute <= 0:
        raise ValueError(f"a rate limit is positive: {rate_per_minute}")
    for entry in ip_allowlist:
        ipaddress.ip_network(entry, strict=False)  # ValueError names it
    for terminal in terminals:
        _check_terminal_id(terminal)
    Money(0, currency)  # ValueError for a malformed currency
    vendor = await vendors.add_vendor(
        VendorDraft(
            vendor_id=vendor_id,
            name=name.strip(),
            currency=currency,
            credit_limit_minor=credit_limit_minor,
            commission_bp=commission_bp,
            ip_allowlist=ip_allowlist,
            rate_per_minute=rate_per_minute,
        ),
        actor=actor,
    )
    for terminal in terminals:
        await vendors.add_terminal(vendor_id, terminal)
    key = await add_vendor_key(
        vendors, vendor_id, scopes=signing.SCOPES, actor=actor, master_key=master_key
    )
    return Registered(vendor=vendor, key=key)


_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,40}")


def _check_terminal_id(terminal: str) -> None:
    if not _ID.fullmatch(terminal):
        raise ValueError(f"a terminal id is 1-40 letters, digits, '-' and '_': {terminal!r}")


async def add_terminal(
    vendors: VendorLedger,
    vendor_id: str,
    terminal: str,
    *,
    label: str = "",
    rate_per_minute: int = 60,
) -> Terminal:
    """Register a terminal of the vendor. Raises ValueError, NotFound, DuplicateError."""
    _check_terminal_id(terminal)
    if rate_per_minute <= 0:
        raise ValueError(f"a rate limit is positive: {rate_per_minute}")
    return await vendors.add_terminal(
        vendor_id, terminal, label=label, rate_per_minute=rate_per_minute
    )


def _check_scopes(scopes: frozenset[str]) -> None:
    unknown = scopes - signing.SCOPES
    if unknown or not scopes:
        raise ValueError(f"scopes are among {sorted(signing.SCOPES)}: {sorted(unknown)}")


def _sealed(
    made: signing.NewKey, vendor_id: str, scopes: frozenset[str], terminal: str | None,
    master_key: bytes,
) -> VendorKey:  # fmt: skip
    signing_key = made.signing_key
    return VendorKey(
        key_id=made.key_id,
        vendor_id=vendor_id,
        sealed_key=sealing.seal_signing_key(
            signing_key, key_id=made.key_id, vendor_id=vendor_id, master_key=master_key
        ),
        key_hash=sealing.fingerprint(signing_key),
        scopes=scopes,
        terminal_id=terminal,
    )


async def add_vendor_key(
    vendors: VendorLedger,
    vendor_id: str,
    *,
    scopes: frozenset[str],
    master_key: bytes,
    terminal: str | None = None,
    actor: str,
    new: signing.NewKey | None = None,
) -> signing.NewKey:
    """A new key for the vendor, stored sealed under ``master_key`` (the secret shown once)."""
    _check_scopes(scopes)
    made = new or signing.new_key()
    await vendors.add_vendor_key(
        _sealed(made, vendor_id, scopes, terminal, master_key), actor=actor
    )
    return made


async def rotate_vendor_key(
    vendors: VendorLedger,
    key_id: str,
    *,
    overlap: timedelta,
    master_key: bytes,
    now: datetime,
    actor: str,
) -> tuple[VendorKey, signing.NewKey]:
    """A new key with the old one's vendor, scopes and terminal; the old one ends after ``overlap``.

    Returns the old key (as it was) and the new one (its secret shown once).

    Raises:
        NotFound: no such key valid now. ValueError: it was rotated already (rotate the new one).
    """
    old = await vendors.get_vendor_key(key_id)
    if old is None or not old.valid_at(now):
        raise NotFound("active vendor key", key_id)
    if old.replaced_by is not None:
        raise ValueError(f"key {key_id} was rotated already (to {old.replaced_by})")
    made = signing.new_key()
    await vendors.rotate_vendor_key(
        key_id,
        _sealed(made, old.vendor_id, old.scopes, old.terminal_id, master_key),
        expires_at=now + overlap,
        actor=actor,
    )
    return old, made


async def reseal_vendor_keys(vendors: VendorLedger, master_key: bytes) -> int:
    """At start: seal schema-8 keys kept in the clear, and check every sealed key opens.

    Returns how many were sealed now. Raises ``VendorKeyUnreadable`` (wrong master key).
    """
    resealed = 0
    for key in await vendors.all_vendor_keys():
        if key.sealed_key is not None:
            sealing.open_signing_key(
                key.sealed_key, key_id=key.key_id, vendor_id=key.vendor_id, master_key=master_key
            )
            continue
        if key.legacy_signing_key is None:  # pragma: no cover - the schema's CHECK forbids it
            continue
        sealed = sealing.seal_signing_key(
            key.legacy_signing_key, key_id=key.key_id, vendor_id=key.vendor_id,
            master_key=master_key,
        )  # fmt: skip
        if await vendors.reseal_vendor_key(
            key.key_id, sealed_key=sealed, key_hash=sealing.fingerprint(key.legacy_signing_key)
        ):
            resealed += 1
    if resealed:
        log.info("vendor_keys_resealed", count=resealed)
    return resealed


async def vendor_statement(vendors: VendorLedger, vendor_id: str, day: date) -> Statement:
    """The vendor's float movements over ``day`` (UTC), with opening and closing balances."""
    vendor = await vendors.get_vendor(vendor_id)
    start = datetime.combine(day, dtime(0), tzinfo=UTC)
    end = start + timedelta(days=1)
    movements = await vendors.float_movements(vendor_id, since=start, until=end)
    opening = await vendors.float_balance_at(vendor_id, start)
    closing = movements[-1].balance_after_minor if movements else opening
    return Statement(
        vendor=vendor, day=day, opening_minor=opening, closing_minor=closing, movements=movements
    )


class VendorService:
    """The vendor API's operations (see the module doc). ``vendors`` is the ledger's vendor port."""

    def __init__(
        self,
        vending: Vending,
        ledger: Ledger,
        vendors: VendorLedger,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        lease_s: float = LEASE_S,
        engine_wait_s: float = ENGINE_WAIT_S,
        limiter: RateLimiter | None = None,
        master_key: bytes,
    ) -> None:
        self._vending = vending
        self._ledger = ledger
        self._vendors = vendors
        self._clock = clock
        self._lease_s = lease_s
        self.engine_wait_s = engine_wait_s
        self._limiter: RateLimiter = limiter or LocalRateLimiter()
        self._running: set[asyncio.Task[Answer]] = set()
        self._master_key = master_key

    @property
    def vendors(self) -> VendorLedger:
        """The ledger's vendor port."""
        return self._vendors

    # -- operators ------------------------------------------------------------------------------

    async def register(self, vendor_id: str, **terms: Any) -> Registered:  # noqa: ANN401 - as register_vendor
        """As ``register_vendor``, sealing under the gateway's master key."""
        return await register_vendor(self._vendors, vendor_id, master_key=self._master_key, **terms)

    async def add_key(self, vendor_id: str, **options: Any) -> signing.NewKey:  # noqa: ANN401 - as add_vendor_key
        """As ``add_vendor_key``, sealing under the gateway's master key."""
        return await add_vendor_key(
            self._vendors, vendor_id, master_key=self._master_key, **options
        )

    async def rotate_key(
        self, key_id: str, *, overlap: timedelta, actor: str
    ) -> tuple[VendorKey, signing.NewKey]:
        """As ``rotate_vendor_key``."""
        return await rotate_vendor_key(
            self._vendors, key_id, overlap=overlap, master_key=self._master_key,
            now=self._clock(), actor=actor,
        )  # fmt: skip

    async def add_terminal(
        self, vendor_id: str, terminal: str, *, label: str = "", rate_per_minute: int = 60
    ) -> Terminal:
        """As ``add_terminal``."""
        return await add_terminal(
            self._vendors, vendor_id, terminal, label=label, rate_per_minute=rate_per_minute
        )

    async def top_up(
        self, vendor_id: str, amount_minor: int, *, reference: str, actor: str
    ) -> FloatMovement:
        """Add to the float once per ``reference`` (``VendorLedger.top_up_float``)."""
        if not reference.strip():
            raise ValueError("a top-up has a reference (the bank transfer's)")
        if amount_minor <= 0:
            raise ValueError("a top-up is more than zero")
        return await self._vendors.top_up_float(
            vendor_id, amount_minor, reference=reference.strip(), actor=actor
        )

    async def set_status(self, vendor_id: str, status: VendorStatus, *, actor: str) -> Vendor:
        """Suspend or resume a vendor."""
        return await self._vendors.set_vendor_status(vendor_id, status, actor=actor)

    async def list_vendors(self) -> list[Vendor]:
        """Every vendor, by id."""
        return await self._vendors.list_vendors()

    async def terminals(self, vendor_id: str) -> list[Terminal]:
        """A vendor's terminals."""
        return await self._vendors.terminals(vendor_id)

    async def keys(self, vendor_id: str) -> list[VendorKey]:
        """A vendor's keys (sealed: ids, scopes, fingerprints, status)."""
        return await self._vendors.vendor_keys(vendor_id)

    async def statement(self, vendor_id: str, day: date) -> Statement:
        """As ``vendor_statement``."""
        return await vendor_statement(self._vendors, vendor_id, day)

    # -- authentication -------------------------------------------------------------------------

    async def authenticate(
        self,
        *,
        headers: Mapping[str, str],
        method: str,
        target: str,
        body: bytes,
        remote: str | None,
        scopes: frozenset[str],
    ) -> Caller:
        """Verify a signed request: key, vendor, address, terminal, signature, nonce, rate, scope.

        ``scopes``: the route's; the key needs one of them.

        Raises:
            Problem: 401 ``signature_invalid`` / ``timestamp_skew`` / ``replayed_request``,
                403 ``vendor_suspended`` / ``ip_not_allowed`` / ``unknown_terminal`` /
                ``scope_denied``, 429 ``rate_limited`` (with ``Retry-After``).
        """
        try:
            signed = signing.parse_headers(headers)
        except signing.SignatureError as exc:
            raise Problem(401, exc.code, exc.detail) from exc
        key = await self._vendors.get_vendor_key(signed.key_id)
        if key is None or not key.valid_at(self._clock()):
            raise Problem(401, "signature_invalid", "unknown, revoked or expired key")
        try:
            signing.verify(
                signed,
                signing_key=self._signing_key(key),
                method=method,
                target=target,
                body=body,
                now=self._clock().timestamp(),
            )
        except signing.SignatureError as exc:
            raise Problem(401, exc.code, exc.detail) from exc
        vendor = await self._vendors.get_vendor(key.vendor_id)
        if vendor.status is not VendorStatus.ACTIVE:
            raise Problem(403, "vendor_suspended", f"vendor {vendor.vendor_id} is suspended")
        if not _allowed(remote, vendor.ip_allowlist):
            raise Problem(403, "ip_not_allowed", "this address is not on the vendor's allowlist")
        terminal = await self._terminal(vendor, key, signed.terminal)
        # One hash tag per vendor: both buckets in one Redis slot (one atomic script, clusters).
        buckets: list[Bucket] = [(f"{{{vendor.vendor_id}}}:v", vendor.rate_per_minute)]
        if terminal is not None:
            buckets.append((f"{{{vendor.vendor_id}}}:t:{terminal.terminal_id}",
                            terminal.rate_per_minute))  # fmt: skip
        wait = await self._limiter.admit(buckets)
        if wait:
            retry = retry_after(wait)
            raise Problem(
                429, "rate_limited", f"too many requests: retry in {retry} s",
                headers={"Retry-After": retry},
            )  # fmt: skip
        window = self._clock() - timedelta(seconds=signing.MAX_SKEW_S)
        if not await self._vendors.remember_nonce(
            vendor.vendor_id, signed.nonce, forget_before=window
        ):
            raise Problem(401, "replayed_request", "this nonce was used already")
        if not key.scopes & scopes:
            wanted = " or ".join(sorted(scopes))
            raise Problem(403, "scope_denied", f"this key has no {wanted} scope for this route")
        return Caller(vendor=vendor, terminal=terminal.terminal_id if terminal else None, key=key)

    def _signing_key(self, key: VendorKey) -> str:
        if key.sealed_key is None:  # a schema-8 row not yet re-sealed (the start does it)
            if key.legacy_signing_key is None:  # pragma: no cover - the schema's CHECK forbids it
                raise Problem(401, "signature_invalid", "unknown, revoked or expired key")
            return key.legacy_signing_key
        try:
            return sealing.open_signing_key(
                key.sealed_key, key_id=key.key_id, vendor_id=key.vendor_id,
                master_key=self._master_key,
            )  # fmt: skip
        except sealing.VendorKeyUnreadable as exc:
            log.error("vendor_key_unreadable", key_id=key.key_id)  # noqa: TRY400 - no trace needed
            raise Problem(401, "signature_invalid", "unknown, revoked or expired key") from exc

    async def _terminal(self, vendor: Vendor, key: VendorKey, named: str) -> Terminal | None:
        terminal = named or key.terminal_id
        if key.terminal_id is not None and terminal != key.terminal_id:
            raise Problem(403, "unknown_terminal", "this key is bound to another terminal")
        if terminal is None:
            return None
        known = {t.terminal_id: t for t in await self._vendors.terminals(vendor.vendor_id)}
        found = known.get(terminal)
        if found is None or found.status is not VendorStatus.ACTIVE:
            raise Problem(403, "unknown_terminal", f"no active terminal {terminal!r}")
        return found

    # -- meter confirm and quote ----------------------------------------------------------------

    async def confirm_meter(self, caller: Caller, meter: str) -> Answer:
        """The meter as a vendor may see it; no side effects. Problem 404 ``unknown_meter``."""
        try:
            record = await self._ledger.get_meter(meter)
        except NotFound as exc:
            raise Problem(404, "unknown_meter", f"no meter {meter!r} is registered") from exc
        tariff = await self._ledger.get_tariff(record.tariff_id)
        changes = await self._ledger.key_changes(record.drn)
        pending = [c for c in changes if c.state.value == "pending"]
        body = {
            "meter": record.drn,
            "name": mask_name(record.customer_name),
            "area": record.area,
            "tariff": {"id": tariff.tariff_id, "name": tariff.name, "index": record.tariff_index},
            "can_sell": record.status is MeterStatus.ACTIVE
            and tariff.currency == caller.vendor.currency,
            "status": record.status.value,
            "currency": tariff.currency,
            "min_amount_minor": tariff.min_purchase_minor,
            "max_amount_minor": tariff.max_purchase_minor,
            "key_change_pending": bool(pending),
        }
        return Answer(status=200, body=to_json(body))

    def _amount(self, caller: Caller, data: Mapping[str, Any]) -> Money:
        amount = data.get("amount_minor")
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            raise Problem(400, "invalid_request", "amount_minor: a positive integer (minor units)")
        currency = data.get("currency", caller.vendor.currency)
        if currency != caller.vendor.currency:
            raise Problem(
                422, "currency_mismatch", f"this vendor sells in {caller.vendor.currency}"
            )
        return Money(amount, currency)

    async def _priced(self, caller: Caller, data: Mapping[str, Any]) -> tuple[str, Quote]:
        meter = data.get("meter")
        if not isinstance(meter, str) or not meter.isdigit() or not 11 <= len(meter) <= 20:
            raise Problem(400, "invalid_request", "meter: the meter number's 11 to 20 digits")
        amount = self._amount(caller, data)
        try:
            quote = await self._vending.quote(meter, amount)
        except UnknownMeter as exc:
            raise Problem(404, "unknown_meter", str(exc)) from exc
        except MeterBlocked as exc:
            raise Problem(422, "meter_blocked", str(exc)) from exc
        except (AmountBelowMinimum, AmountAboveMaximum) as exc:
            raise Problem(422, "amount_out_of_range", str(exc)) from exc
        except TariffError as exc:
            raise Problem(422, "amount_out_of_range", str(exc)) from exc
        return meter, quote

    def _commission(self, caller: Caller, amount: Money) -> int:
        return amount.amount_minor * caller.vendor.commission_bp // BASIS_POINTS

    def _breakdown(self, caller: Caller, meter: str, quote: Quote) -> dict[str, Any]:
        commission = self._commission(caller, quote.amount)
        return {
            "meter": meter,
            "amount_minor": quote.amount.amount_minor,
            "currency": quote.amount.currency,
            "units": _units_text(quote.units),
            "units_tenths_kwh": quote.units,
            "energy_minor": quote.energy.amount_minor,
            "tax_minor": quote.vat.amount_minor,
            "fixed_charges_minor": quote.fixed_charge.amount_minor,
            "debt_minor": quote.debt_recovered_minor,
            "commission_minor": commission,
            "float_debit_minor": quote.amount.amount_minor - commission,
        }

    async def quote(self, caller: Caller, data: Mapping[str, Any]) -> Answer:
        """What an amount buys, and what the float would pay; no money moves."""
        meter, quote = await self._priced(caller, data)
        return Answer(status=200, body=to_json(self._breakdown(caller, meter, quote)))

    # -- the vend -------------------------------------------------------------------------------

    async def vend(
        self, caller: Caller, idempotency_key: str | None, body: bytes, data: Mapping[str, Any]
    ) -> Answer:
        """Sell a token from the float, once per (vendor, ``idempotency_key``)."""
        if not idempotency_key or len(idempotency_key) > IDEMPOTENCY_KEY_MAX:
            raise Problem(400, "idempotency_key_required", "send an Idempotency-Key (1-100 chars)")
        vendor_id = caller.vendor.vendor_id
        claim = await self._vendors.claim_vendor_request(
            vendor_id,
            idempotency_key,
            request_hash=hashlib.sha256(body).hexdigest(),
            terminal_id=caller.terminal,
            lease_s=self._lease_s,
        )
        if claim.outcome is ClaimOutcome.CONFLICT:
            raise Problem(
                422, "idempotency_key_reused", "this Idempotency-Key was sent with another body"
            )
        if claim.outcome is ClaimOutcome.DONE:
            return self._stored(claim.request)
        if claim.outcome is ClaimOutcome.RUNNING:
            raise Problem(
                409, "request_in_progress", "the first request with this key is still running",
                headers={"Retry-After": "1"},
            )  # fmt: skip
        task = asyncio.create_task(self._run_vend(caller, idempotency_key, data))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.engine_wait_s)
        except TimeoutError:
            request = await self._vendors.get_vendor_request(
                vendor_id, idempotency_key=idempotency_key
            )
            purchase = request.purchase_id if request else None
            return self._pending(purchase, idempotency_key)

    def _pending(self, purchase_id: str | None, key: str) -> Answer:
        url = f"/vendor/v1/vends/{purchase_id}" if purchase_id else None
        body = {"status": "pending", "vend_id": purchase_id, "idempotency_key": key,
                "status_url": url or f"/vendor/v1/vends?idempotency_key={key}"}  # fmt: skip
        return Answer(status=202, body=to_json(body), headers={"Retry-After": "2"})

    @staticmethod
    def _stored(request: VendorRequest) -> Answer:
        assert request.response is not None  # noqa: S101 - a DONE request has its answer
        problem = (request.status_code or 200) >= 400
        return Answer(
            status=request.status_code or 200,
            body=request.response,
            content_type="application/problem+json" if problem else "application/json",
        )

    async def _run_vend(self, caller: Caller, key: str, data: Mapping[str, Any]) -> Answer:
        vendor_id = caller.vendor.vendor_id
        try:
            answer = await self._sell(caller, key, data)
        except Problem as problem:
            answer = problem.answer()
        except (VendFailed, LedgerError) as exc:
            # Nothing was debited: the key's lease ends now, the same request may come again.
            log.warning("vendor_vend_not_done", vendor=vendor_id, error=str(exc))
            await self._vendors.release_vendor_request(vendor_id, key)
            retry = Problem(503, "vend_unavailable", "the vend could not be made now; retry",
                            headers={"Retry-After": "5"})  # fmt: skip
            return retry.answer()
        stored = await self._vendors.finish_vendor_request(
            vendor_id, key, status_code=answer.status, response=answer.body
        )
        return self._stored(stored)

    async def _sell(self, caller: Caller, key: str, data: Mapping[str, Any]) -> Answer:
        vendor_id = caller.vendor.vendor_id
        phone = self._phone(data)
        meter, quote = await self._priced(caller, data)
        accepts = data.get("accept_key_change", True)
        if not isinstance(accepts, bool):
            raise Problem(400, "invalid_request", "accept_key_change: true or false")
        if not accepts and any(
            c.state.value == "pending" for c in await self._ledger.key_changes(MeterNumber(meter))
        ):
            # The terminal cannot print key-change tokens: nothing is sold, nothing moves.
            raise Problem(
                422, "key_change_required",
                "this meter's next token set starts with key-change tokens; send"
                " accept_key_change: true (or omit it) to sell them with the credit token",
            )  # fmt: skip
        try:
            purchase = await self._vending.start_purchase(
                channel=VENDOR_CHANNEL,
                phone=phone,
                meter=meter,
                amount=quote.amount,
                idempotency_key=f"vendor:{vendor_id}:{key}",
            )
        except IdempotencyConflict as exc:  # cannot happen: the claim's hash guards the body
            raise Problem(422, "idempotency_key_reused", str(exc)) from exc
        await self._vendors.attach_vendor_purchase(vendor_id, key, purchase.purchase_id)
        commission = self._commission(caller, quote.amount)
        debit = FloatDebit(
            vendor_id=vendor_id,
            amount_minor=quote.amount.amount_minor - commission,
            commission_minor=commission,
        )
        try:
            outcome = await self._vending.vend_from_float(purchase.purchase_id, debit)
        except InsufficientFloat as exc:
            raise Problem(
                402, "insufficient_float", "the float cannot pay this sale",
                needed_minor=exc.needed_minor, available_minor=exc.available_minor,
            ) from exc  # fmt: skip
        except VendorSuspended as exc:
            raise Problem(403, "vendor_suspended", str(exc)) from exc
        vend = outcome.vend
        record = await self._ledger.get_meter(meter)
        tokens: list[dict[str, object]] = [
            {"kind": "key_change", "token": t} for t in vend.key_change_tokens
        ]
        tokens.append({"kind": "credit", "token": vend.token, "tid": vend.tid})
        body = {
            **self._breakdown(caller, meter, quote),
            "vend_id": vend.purchase_id,
            "status": "vended",
            "receipt": vend.receipt,
            "tariff_index": record.tariff_index,
            "units": _units_text(vend.units),
            "units_tenths_kwh": vend.units,
            "tokens": tokens,
            "vended_at": vend.created_at.isoformat(),
            "terminal": caller.terminal,
            "idempotency_key": key,
            "copy": False,
        }
        log.info(
            "vendor_vended",
            vendor=vendor_id,
            terminal=caller.terminal,
            meter=meter,
            token=vend.masked_token,
            float_debit=debit.amount_minor,
        )
        return Answer(status=201, body=to_json(body))

    @staticmethod
    def _phone(data: Mapping[str, Any]) -> Msisdn | None:
        phone = data.get("customer_phone")
        if phone is None:
            return None
        try:
            return parse_msisdn(str(phone))
        except InvalidPhoneNumber as exc:
            raise Problem(400, "invalid_request", f"customer_phone: {exc}") from exc

    # -- after the vend -------------------------------------------------------------------------

    async def last_response(
        self, caller: Caller, *, vend_id: str | None = None, idempotency_key: str | None = None
    ) -> Answer:
        """The stored answer, byte for byte; read-only. 404: never received, send it again."""
        request = await self._vendors.get_vendor_request(
            caller.vendor.vendor_id, idempotency_key=idempotency_key, purchase_id=vend_id
        )
        if request is None:
            raise Problem(
                404, "not_found", "no request with this key or id: it was never received,"
                " it is safe to send again with the same Idempotency-Key",
            )  # fmt: skip
        if request.state is RequestState.DONE:
            return self._stored(request)
        return self._pending(request.purchase_id, request.idempotency_key)

    async def reprint(self, caller: Caller, vend_id: str) -> Answer:
        """The stored tokens again, marked as a copy: never new tokens."""
        request = await self._vendors.get_vendor_request(
            caller.vendor.vendor_id, purchase_id=vend_id
        )
        if request is None or request.response is None or request.status_code != 201:
            raise Problem(404, "not_found", f"no vended sale {vend_id!r} of this vendor")
        body = json.loads(request.response)
        body["copy"] = True
        return Answer(status=200, body=to_json(body))

    async def reversal(self, caller: Caller, vend_id: str) -> Answer:
        """Refund the float for a sale that issued no token; 409 ``token_already_issued``."""
        vendor_id = caller.vendor.vendor_id
        try:
            refund = await self._vendors.refund_float(
                vendor_id, vend_id, actor=f"vendor:{vendor_id}"
            )
        except TokenAlreadyIssued as exc:
            raise Problem(409, "token_already_issued", str(exc)) from exc
        except NotFound as exc:
            raise Problem(404, "not_found", f"no sale {vend_id!r} of this vendor") from exc
        request = await self._vendors.get_vendor_request(vendor_id, purchase_id=vend_id)
        if request is not None and request.state is RequestState.RUNNING:
            closed = Problem(409, "vend_reversed", "this sale was reversed before its token")
            answer = closed.answer()
            await self._vendors.finish_vendor_request(
                vendor_id, request.idempotency_key, status_code=answer.status, response=answer.body
            )
        body = {
            "vend_id": vend_id,
            "status": "reversed",
            "refunded_minor": refund.amount_minor if refund is not None else 0,
        }
        return Answer(status=200, body=to_json(body))
