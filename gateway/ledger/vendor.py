"""The vendor API's ledger part: vendors, terminals, keys, floats and idempotent vendor requests.

Every operation is written once as steps over SQL both databases speak (``?`` placeholders;
``FOR UPDATE`` where PostgreSQL must lock a row), as the ledger core's steps
(``gateway/ledger/core.py``): a generator yields ``(kind, sql, params)`` and is sent the result
(the first row or None, every row, or how many rows changed). ``LedgerCore`` is a
``VendorSteps``, so both dialects drive these steps in one transaction (``_write``) or a read
(``_read``) like the core's own, and the core's ``record_vend`` takes a vendor sale's float debit
(``_debit_float``) inside its transaction.

A float moves only with a ``float_movements`` row in the same transaction, and only three ways: a
top-up (once per reference), a vend's debit (once per purchase, inside ``record_vend``'s
transaction, with the vend and its token) and a refund (once per purchase, only when no token
was issued). So the float always equals top-ups minus debits plus refunds.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final, Protocol

from gateway.ledger.base import (
    DuplicateError,
    FloatDebit,
    LedgerError,
    NotFound,
    PurchaseId,
    PurchaseState,
    is_legal,
)

ONE: Final = 0
ROWS: Final = 1
RUN: Final = 2

Stmt = tuple[int, str, tuple[object, ...]]
Steps = Generator[Stmt, Any, Any]


class Row(Protocol):
    """A result row as both drivers give it (``sqlite3.Row``, ``asyncpg.Record``)."""

    def __getitem__(self, key: str | int, /) -> Any: ...  # noqa: ANN401 - a column's value


def one(sql: str, *params: object) -> Stmt:
    """A statement whose result is its first row, or None."""
    return (ONE, sql, params)


def rows(sql: str, *params: object) -> Stmt:
    """A statement whose result is every row."""
    return (ROWS, sql, params)


def run(sql: str, *params: object) -> Stmt:
    """A statement whose result is how many rows it changed."""
    return (RUN, sql, params)


def when(value: datetime | str) -> datetime:
    """A stored timestamp as an aware datetime (PostgreSQL gives one, SQLite ISO text)."""
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


# ------------------------------------------------------------------------------------ the values


class VendorStatus(StrEnum):
    """Whether a vendor (or terminal) may sell."""

    ACTIVE = "active"
    SUSPENDED = "suspended"


class MovementKind(StrEnum):
    """How a float moved."""

    TOP_UP = "top_up"
    DEBIT = "debit"
    REFUND = "refund"


@dataclass(frozen=True, slots=True, kw_only=True)
class VendorDraft:
    """A vendor to register."""

    vendor_id: str
    name: str
    currency: str
    credit_limit_minor: int = 0
    commission_bp: int = 0
    ip_allowlist: tuple[str, ...] = ()
    rate_per_minute: int = 600


@dataclass(frozen=True, slots=True, kw_only=True)
class Vendor:
    """A bank, agent or sales point selling from a prepaid float (integer minor units)."""

    vendor_id: str
    name: str
    currency: str
    balance_minor: int
    credit_limit_minor: int
    commission_bp: int
    ip_allowlist: tuple[str, ...]
    rate_per_minute: int
    status: VendorStatus
    created_at: datetime

    @property
    def available_minor(self) -> int:
        """What the vendor may still spend: the float down to its credit limit."""
        return self.balance_minor + self.credit_limit_minor


@dataclass(frozen=True, slots=True, kw_only=True)
class Terminal:
    """A vendor's till, with its own rate limit."""

    vendor_id: str
    terminal_id: str
    label: str
    rate_per_minute: int
    status: VendorStatus
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class VendorKey:
    """An API key: its signing key sealed under the master key, and that key's hash.

    The secret shown once is never stored, nor the signing key derived from it in the clear
    (``gateway/vendor/sealing.py``). ``legacy_signing_key`` is a schema-8 row's clear signing key
    until the gateway's start re-seals it (migration 0010). A key replaced by a rotation stays
    valid until ``expires_at``.
    """

    key_id: str
    vendor_id: str
    sealed_key: bytes | None = field(repr=False)
    key_hash: str | None
    scopes: frozenset[str]
    terminal_id: str | None
    active: bool = True
    created_at: datetime | None = None
    expires_at: datetime | None = None
    replaced_by: str | None = None
    legacy_signing_key: str | None = field(default=None, repr=False)

    def valid_at(self, moment: datetime) -> bool:
        """Active, and not past the end of a rotation's overlap."""
        return self.active and (self.expires_at is None or moment < self.expires_at)


@dataclass(frozen=True, slots=True, kw_only=True)
class FloatMovement:
    """One move of a float; ``amount_minor`` is signed (top-ups and refunds +, debits -)."""

    movement_id: int
    vendor_id: str
    kind: MovementKind
    amount_minor: int
    commission_minor: int
    balance_after_minor: int
    purchase_id: PurchaseId | None
    reference: str
    actor: str
    created_at: datetime


class RequestState(StrEnum):
    """A vendor request: still running (under a lease) or answered."""

    RUNNING = "running"
    DONE = "done"


@dataclass(frozen=True, slots=True, kw_only=True)
class VendorRequest:
    """One request per (vendor, Idempotency-Key), and its stored answer."""

    vendor_id: str
    idempotency_key: str
    request_hash: str
    terminal_id: str | None
    purchase_id: PurchaseId | None
    state: RequestState
    status_code: int | None
    response: bytes | None = field(repr=False)
    lease_until: datetime
    created_at: datetime


class ClaimOutcome(StrEnum):
    """What claiming an idempotency key found."""

    NEW = "new"  # ours to run (first time, or a run whose lease ended: resume it)
    RUNNING = "running"  # another run holds the lease: 409
    DONE = "done"  # answered: replay the stored response
    CONFLICT = "conflict"  # the key was used with another body: 422


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestClaim:
    """The claim's outcome and the request as it stands."""

    outcome: ClaimOutcome
    request: VendorRequest


class InsufficientFloat(LedgerError):
    """The debit would take the float below its credit limit: nothing was written."""

    def __init__(self, vendor_id: str, needed_minor: int, available_minor: int) -> None:
        super().__init__(
            f"vendor {vendor_id}: the float has {available_minor} minor units available,"
            f" {needed_minor} needed"
        )
        self.vendor_id = vendor_id
        self.needed_minor = needed_minor
        self.available_minor = available_minor


class VendorSuspended(LedgerError):
    """The vendor is suspended: it sells nothing."""

    def __init__(self, vendor_id: str) -> None:
        super().__init__(f"vendor {vendor_id} is suspended")
        self.vendor_id = vendor_id


class TokenAlreadyIssued(LedgerError):
    """A reversal of a sale whose token was issued: the float is not refunded."""

    def __init__(self, purchase_id: str) -> None:
        super().__init__(f"purchase {purchase_id} has its token: it cannot be reversed")
        self.purchase_id = purchase_id


# ------------------------------------------------------------------------------------ row mapping


def vendor_of(row: Row) -> Vendor:
    """A ``vendors`` row."""
    return Vendor(
        vendor_id=row["vendor_id"],
        name=row["name"],
        currency=row["currency"],
        balance_minor=row["balance_minor"],
        credit_limit_minor=row["credit_limit_minor"],
        commission_bp=row["commission_bp"],
        ip_allowlist=tuple(row["ip_allowlist"].split()),
        rate_per_minute=row["rate_per_minute"],
        status=VendorStatus(row["status"]),
        created_at=when(row["created_at"]),
    )


def terminal_of(row: Row) -> Terminal:
    """A ``vendor_terminals`` row."""
    return Terminal(
        vendor_id=row["vendor_id"],
        terminal_id=row["terminal_id"],
        label=row["label"],
        rate_per_minute=row["rate_per_minute"],
        status=VendorStatus(row["status"]),
        created_at=when(row["created_at"]),
    )


def key_of(row: Row) -> VendorKey:
    """A ``vendor_keys`` row."""
    sealed = row["sealed_key"]
    expires = row["expires_at"]
    return VendorKey(
        key_id=row["key_id"],
        vendor_id=row["vendor_id"],
        sealed_key=bytes(sealed) if sealed is not None else None,
        key_hash=row["key_hash"],
        scopes=frozenset(row["scopes"].split()),
        terminal_id=row["terminal_id"],
        active=row["status"] == "active",
        created_at=when(row["created_at"]),
        expires_at=when(expires) if expires is not None else None,
        replaced_by=row["replaced_by"],
        legacy_signing_key=row["signing_key"],
    )


def movement_of(row: Row) -> FloatMovement:
    """A ``float_movements`` row."""
    purchase = row["purchase_id"]
    return FloatMovement(
        movement_id=row["movement_id"],
        vendor_id=row["vendor_id"],
        kind=MovementKind(row["kind"]),
        amount_minor=row["amount_minor"],
        commission_minor=row["commission_minor"],
        balance_after_minor=row["balance_after_minor"],
        purchase_id=PurchaseId(purchase) if purchase is not None else None,
        reference=row["reference"],
        actor=row["actor"],
        created_at=when(row["created_at"]),
    )


def request_of(row: Row) -> VendorRequest:
    """A ``vendor_requests`` row."""
    purchase = row["purchase_id"]
    response = row["response"]
    return VendorRequest(
        vendor_id=row["vendor_id"],
        idempotency_key=row["idempotency_key"],
        request_hash=row["request_hash"],
        terminal_id=row["terminal_id"],
        purchase_id=PurchaseId(purchase) if purchase is not None else None,
        state=RequestState(row["state"]),
        status_code=row["status_code"],
        response=bytes(response) if response is not None else None,
        lease_until=when(row["lease_until"]),
        created_at=when(row["created_at"]),
    )


_EVENT: Final = "INSERT INTO events (purchase_id, kind, actor, data, at) VALUES (?, ?, ?, ?, ?)"
_VENDOR: Final = "SELECT * FROM vendors WHERE vendor_id = ?"
_LOCK_VENDOR: Final = "SELECT * FROM vendors WHERE vendor_id = ? FOR UPDATE"
_REQUEST: Final = "SELECT * FROM vendor_requests WHERE vendor_id = ? AND idempotency_key = ?"
_MOVE_FLOAT: Final = (
    "INSERT INTO float_movements (vendor_id, kind, amount_minor, commission_minor,"
    " balance_after_minor, purchase_id, reference, actor, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


# ------------------------------------------------------------------------------------- the steps


class VendorSteps:
    """The vendor operations, once; a backend provides the driver and the timestamp form."""

    _clock: Callable[[], datetime]

    def _stamp(self, moment: datetime) -> object:
        raise NotImplementedError

    async def _write(self, op: Callable[..., Steps], /, *args: object, atomic: bool = True) -> Any:  # noqa: ANN401 - the steps' result
        """Run ``op(*args)``'s steps in one transaction (``LedgerCore``'s dialects)."""
        raise NotImplementedError

    async def _read(self, op: Callable[..., Steps], /, *args: object, hot: bool = False) -> Any:  # noqa: ANN401 - the steps' result
        """Run ``op(*args)``'s steps as a read (``LedgerCore``'s dialects)."""
        raise NotImplementedError

    def _vendor_event(
        self, purchase_id: str | None, kind: str, actor: str, data: Mapping[str, Any]
    ) -> Stmt:
        return run(_EVENT, purchase_id, kind, actor, _json(data), self._stamp(self._clock()))

    # -- vendors, terminals, keys -----------------------------------------------------------------

    async def add_vendor(self, draft: VendorDraft, *, actor: str) -> Vendor:
        """Register a vendor with an empty float. Raises ``DuplicateError`` if the id is taken."""
        result: Vendor = await self._write(self._add_vendor, draft, actor)
        return result

    def _add_vendor(self, draft: VendorDraft, actor: str) -> Steps:
        now = self._stamp(self._clock())
        added = yield run(
            "INSERT INTO vendors (vendor_id, name, currency, credit_limit_minor, commission_bp,"
            " ip_allowlist, rate_per_minute, status, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (vendor_id) DO NOTHING",
            draft.vendor_id,
            draft.name,
            draft.currency,
            draft.credit_limit_minor,
            draft.commission_bp,
            " ".join(draft.ip_allowlist),
            draft.rate_per_minute,
            VendorStatus.ACTIVE.value,
            now,
            now,
        )
        if added != 1:
            raise DuplicateError(
                f"vendor {draft.vendor_id} exists",
                constraint="vendors.vendor_id",
                key=draft.vendor_id,
            )
        yield self._vendor_event(
            None,
            "vendor_added",
            actor,
            {
                "vendor_id": draft.vendor_id,
                "currency": draft.currency,
                "credit_limit_minor": draft.credit_limit_minor,
                "commission_bp": draft.commission_bp,
            },
        )
        row = yield one(_VENDOR, draft.vendor_id)
        return vendor_of(row)

    async def get_vendor(self, vendor_id: str) -> Vendor:
        """The vendor. Raises ``NotFound``."""
        result: Vendor = await self._read(self._get_vendor, vendor_id)
        return result

    @staticmethod
    def _get_vendor(vendor_id: str) -> Steps:
        row = yield one(_VENDOR, vendor_id)
        if row is None:
            raise NotFound("vendor", vendor_id)
        return vendor_of(row)

    async def list_vendors(self) -> list[Vendor]:
        """Every vendor, by id."""
        result: list[Vendor] = await self._read(self._list_vendors)
        return result

    @staticmethod
    def _list_vendors() -> Steps:
        found = yield rows("SELECT * FROM vendors ORDER BY vendor_id")
        return [vendor_of(row) for row in found]

    async def set_vendor_status(
        self, vendor_id: str, status: VendorStatus, *, actor: str
    ) -> Vendor:
        """Suspend or reactivate a vendor, with its event. Raises ``NotFound``."""
        result: Vendor = await self._write(self._set_vendor_status, vendor_id, status, actor)
        return result

    def _set_vendor_status(self, vendor_id: str, status: VendorStatus, actor: str) -> Steps:
        row = yield one(_LOCK_VENDOR, vendor_id)
        if row is None:
            raise NotFound("vendor", vendor_id)
        yield run(
            "UPDATE vendors SET status = ?, updated_at = ? WHERE vendor_id = ?",
            status.value,
            self._stamp(self._clock()),
            vendor_id,
        )
        yield self._vendor_event(
            None, f"vendor_{status.value}", actor, {"vendor_id": vendor_id, "from": row["status"]}
        )
        row = yield one(_VENDOR, vendor_id)
        return vendor_of(row)

    async def add_terminal(
        self, vendor_id: str, terminal_id: str, *, label: str = "", rate_per_minute: int = 60
    ) -> Terminal:
        """Register a vendor's terminal. Raises ``NotFound``, ``DuplicateError``."""
        result: Terminal = await self._write(
            self._add_terminal, vendor_id, terminal_id, label, rate_per_minute
        )
        return result

    def _add_terminal(
        self, vendor_id: str, terminal_id: str, label: str, rate_per_minute: int
    ) -> Steps:
        yield from self._get_vendor(vendor_id)
        added = yield run(
            "INSERT INTO vendor_terminals (vendor_id, terminal_id, label, rate_per_minute,"
            " status, created_at) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (vendor_id, terminal_id) DO NOTHING",
            vendor_id,
            terminal_id,
            label,
            rate_per_minute,
            VendorStatus.ACTIVE.value,
            self._stamp(self._clock()),
        )
        if added != 1:
            key = f"{vendor_id}/{terminal_id}"
            raise DuplicateError(f"terminal {key} exists", constraint="vendor_terminals", key=key)
        row = yield one(
            "SELECT * FROM vendor_terminals WHERE vendor_id = ? AND terminal_id = ?",
            vendor_id,
            terminal_id,
        )
        return terminal_of(row)

    async def terminals(self, vendor_id: str) -> list[Terminal]:
        """The vendor's terminals, by id."""
        result: list[Terminal] = await self._read(self._terminals, vendor_id)
        return result

    @staticmethod
    def _terminals(vendor_id: str) -> Steps:
        found = yield rows(
            "SELECT * FROM vendor_terminals WHERE vendor_id = ? ORDER BY terminal_id", vendor_id
        )
        return [terminal_of(row) for row in found]

    async def add_vendor_key(self, key: VendorKey, *, actor: str) -> None:
        """Store a key (sealed, with its hash), with its event. Raises ``NotFound``."""
        await self._write(self._add_vendor_key, key, actor)

    def _add_vendor_key(self, key: VendorKey, actor: str) -> Steps:
        if key.sealed_key is None or key.key_hash is None:
            raise ValueError(f"vendor key {key.key_id}: only a sealed key is stored")
        yield from self._get_vendor(key.vendor_id)
        yield run(
            "INSERT INTO vendor_keys (key_id, vendor_id, sealed_key, key_hash, scopes,"
            " terminal_id, status, created_at) VALUES (?, ?, ?, ?, ?, ?, 'active', ?)",
            key.key_id,
            key.vendor_id,
            key.sealed_key,
            key.key_hash,
            " ".join(sorted(key.scopes)),
            key.terminal_id,
            self._stamp(self._clock()),
        )
        yield self._vendor_event(
            None,
            "vendor_key_added",
            actor,
            {
                "vendor_id": key.vendor_id,
                "key_id": key.key_id,
                "scopes": sorted(key.scopes),
                "fingerprint": key.key_hash[:16],
            },
        )

    async def rotate_vendor_key(
        self, old_key_id: str, new: VendorKey, *, expires_at: datetime, actor: str
    ) -> None:
        """Add ``new`` and let the old key run until ``expires_at``, in one transaction.

        Raises:
            NotFound: no active key ``old_key_id`` of ``new``'s vendor.
        """
        await self._write(self._rotate_vendor_key, old_key_id, new, expires_at, actor)

    def _rotate_vendor_key(
        self, old_key_id: str, new: VendorKey, expires_at: datetime, actor: str
    ) -> Steps:
        old = yield one("SELECT * FROM vendor_keys WHERE key_id = ? FOR UPDATE", old_key_id)
        if old is None or old["vendor_id"] != new.vendor_id or old["status"] != "active":
            raise NotFound("active vendor key", old_key_id)
        yield from self._add_vendor_key(new, actor)
        now = self._clock()
        yield run(
            "UPDATE vendor_keys SET expires_at = ?, replaced_by = ? WHERE key_id = ?",
            self._stamp(max(now, expires_at)),
            new.key_id,
            old_key_id,
        )
        yield self._vendor_event(
            None,
            "vendor_key_rotated",
            actor,
            {
                "vendor_id": new.vendor_id,
                "key_id": old_key_id,
                "replaced_by": new.key_id,
                "expires_at": max(now, expires_at).isoformat(),
            },
        )

    async def reseal_vendor_key(self, key_id: str, *, sealed_key: bytes, key_hash: str) -> bool:
        """Replace a schema-8 row's clear signing key by its sealed form; False if done already."""
        result: bool = await self._write(self._reseal_vendor_key, key_id, sealed_key, key_hash)
        return result

    def _reseal_vendor_key(self, key_id: str, sealed_key: bytes, key_hash: str) -> Steps:
        changed = yield run(
            "UPDATE vendor_keys SET sealed_key = ?, key_hash = ?, signing_key = NULL"
            " WHERE key_id = ? AND signing_key IS NOT NULL",
            sealed_key,
            key_hash,
            key_id,
        )
        if changed == 1:
            yield self._vendor_event(
                None,
                "vendor_key_resealed",
                "gateway",
                {"key_id": key_id, "fingerprint": key_hash[:16]},
            )
        return changed == 1

    async def all_vendor_keys(self) -> list[VendorKey]:
        """Every vendor key, by id (the start's re-seal and check)."""
        result: list[VendorKey] = await self._read(self._all_vendor_keys)
        return result

    @staticmethod
    def _all_vendor_keys() -> Steps:
        found = yield rows("SELECT * FROM vendor_keys ORDER BY key_id")
        return [key_of(row) for row in found]

    async def revoke_vendor_key(self, key_id: str, *, actor: str) -> None:
        """Revoke a key (rotation: add the new one first). Raises ``NotFound``."""
        await self._write(self._revoke_vendor_key, key_id, actor)

    def _revoke_vendor_key(self, key_id: str, actor: str) -> Steps:
        changed = yield run(
            "UPDATE vendor_keys SET status = 'revoked', revoked_at = ? WHERE key_id = ?",
            self._stamp(self._clock()),
            key_id,
        )
        if changed != 1:
            raise NotFound("vendor key", key_id)
        yield self._vendor_event(None, "vendor_key_revoked", actor, {"key_id": key_id})

    async def get_vendor_key(self, key_id: str) -> VendorKey | None:
        """The key (revoked ones too: ``active`` says), or None."""
        result: VendorKey | None = await self._read(self._get_vendor_key, key_id)
        return result

    @staticmethod
    def _get_vendor_key(key_id: str) -> Steps:
        row = yield one("SELECT * FROM vendor_keys WHERE key_id = ?", key_id)
        return key_of(row) if row is not None else None

    async def vendor_keys(self, vendor_id: str) -> list[VendorKey]:
        """The vendor's keys, oldest first."""
        result: list[VendorKey] = await self._read(self._vendor_keys, vendor_id)
        return result

    @staticmethod
    def _vendor_keys(vendor_id: str) -> Steps:
        found = yield rows(
            "SELECT * FROM vendor_keys WHERE vendor_id = ? ORDER BY created_at, key_id", vendor_id
        )
        return [key_of(row) for row in found]

    async def remember_nonce(self, vendor_id: str, nonce: str, *, forget_before: datetime) -> bool:
        """Record a request nonce; False if it was seen (a replay).

        Forgets the nonces seen before ``forget_before`` (outside the signature window).
        """
        result: bool = await self._write(self._remember_nonce, vendor_id, nonce, forget_before)
        return result

    def _remember_nonce(self, vendor_id: str, nonce: str, forget_before: datetime) -> Steps:
        yield run("DELETE FROM vendor_nonces WHERE seen_at < ?", self._stamp(forget_before))
        added = yield run(
            "INSERT INTO vendor_nonces (vendor_id, nonce, seen_at) VALUES (?, ?, ?)"
            " ON CONFLICT (vendor_id, nonce) DO NOTHING",
            vendor_id,
            nonce,
            self._stamp(self._clock()),
        )
        return added == 1

    # -- the float --------------------------------------------------------------------------------

    async def top_up_float(
        self, vendor_id: str, amount_minor: int, *, reference: str, actor: str
    ) -> FloatMovement:
        """Add to the float, once per ``reference`` (a repeat returns the first top-up).

        Raises:
            ValueError: the amount is not positive.
            NotFound: no such vendor.
        """
        if amount_minor <= 0:
            raise ValueError(f"a top-up must be positive, not {amount_minor}")
        result: FloatMovement = await self._write(
            self._top_up, vendor_id, amount_minor, reference, actor
        )
        return result

    def _top_up(self, vendor_id: str, amount_minor: int, reference: str, actor: str) -> Steps:
        vendor = yield one(_LOCK_VENDOR, vendor_id)
        if vendor is None:
            raise NotFound("vendor", vendor_id)
        seen = yield one(
            "SELECT * FROM float_movements WHERE vendor_id = ? AND kind = ? AND reference = ?",
            vendor_id,
            MovementKind.TOP_UP.value,
            reference,
        )
        if seen is not None:
            if seen["amount_minor"] != amount_minor:
                raise DuplicateError(
                    f"top-up reference {reference} was used for {seen['amount_minor']}",
                    constraint="float_movements.reference",
                    key=reference,
                )
            return movement_of(seen)
        return (
            yield from self._move_float(
                vendor_id, MovementKind.TOP_UP, amount_minor, 0, None, reference, actor
            )
        )

    def _move_float(
        self,
        vendor_id: str,
        kind: MovementKind,
        amount_minor: int,
        commission_minor: int,
        purchase_id: str | None,
        reference: str,
        actor: str,
    ) -> Steps:
        """Move the float by ``amount_minor`` (signed) with its row and event.

        A debit is conditional: never below the credit limit (``InsufficientFloat``).
        """
        now = self._stamp(self._clock())
        after = yield one(
            "UPDATE vendors SET balance_minor = balance_minor + ?, updated_at = ?"
            " WHERE vendor_id = ? AND balance_minor + ? >= -credit_limit_minor"
            " RETURNING balance_minor",
            amount_minor,
            now,
            vendor_id,
            amount_minor,
        )
        if after is None:
            vendor = yield one(_VENDOR, vendor_id)
            if vendor is None:
                raise NotFound("vendor", vendor_id)
            available = vendor["balance_minor"] + vendor["credit_limit_minor"]
            raise InsufficientFloat(vendor_id, -amount_minor, available)
        balance = after["balance_minor"]
        yield run(
            _MOVE_FLOAT,
            vendor_id,
            kind.value,
            amount_minor,
            commission_minor,
            balance,
            purchase_id,
            reference,
            actor,
            now,
        )
        yield self._vendor_event(
            purchase_id,
            f"float_{kind.value}",
            actor,
            {
                "vendor_id": vendor_id,
                "amount_minor": amount_minor,
                "commission_minor": commission_minor,
                "balance_after_minor": balance,
                "reference": reference,
            },
        )
        row = yield one(
            "SELECT * FROM float_movements WHERE vendor_id = ? AND kind = ? AND reference = ?",
            vendor_id,
            kind.value,
            reference,
        )
        return movement_of(row)

    def _debit_float(self, row: Row, debit: FloatDebit, actor: str) -> Steps:
        """A vend's debit, inside ``record_vend``'s transaction: the purchase becomes PAID.

        ``row`` is the (locked) purchase row. Raises ``InsufficientFloat`` or
        ``VendorSuspended``: the whole vend is refused, nothing stays.
        """
        current = PurchaseState(row["state"])
        purchase_id = row["purchase_id"]
        if current is not PurchaseState.CREATED:
            # Reversed (EXPIRED, REFUND_PENDING) or paid otherwise: a float never pays it again.
            raise LedgerError(f"purchase {purchase_id} cannot be paid from a float ({current})")
        vendor = yield one(_VENDOR, debit.vendor_id)
        if vendor is None:
            raise NotFound("vendor", debit.vendor_id)
        if vendor["status"] != VendorStatus.ACTIVE.value:
            raise VendorSuspended(debit.vendor_id)
        if vendor["currency"] != row["currency"]:
            raise LedgerError(f"vendor {debit.vendor_id} sells in {vendor['currency']}")
        if debit.amount_minor <= 0 or debit.commission_minor < 0:
            raise ValueError(f"a debit must be positive, not {debit.amount_minor}")
        if debit.amount_minor + debit.commission_minor != row["amount_minor"]:
            # The float pays the purchase's amount (less the commission), never another sum.
            raise LedgerError(
                f"purchase {purchase_id} costs {row['amount_minor']}: a debit of"
                f" {debit.amount_minor} with {debit.commission_minor} commission does not pay it"
            )
        yield from self._move_float(
            debit.vendor_id,
            MovementKind.DEBIT,
            -debit.amount_minor,
            debit.commission_minor,
            purchase_id,
            purchase_id,
            actor,
        )
        yield run(
            "UPDATE purchases SET state = ?, updated_at = ? WHERE purchase_id = ?",
            PurchaseState.PAID.value,
            self._stamp(self._clock()),
            purchase_id,
        )
        yield self._vendor_event(
            purchase_id,
            "paid_from_float",
            actor,
            {"vendor_id": debit.vendor_id, "from": current, "to": PurchaseState.PAID},
        )

    async def refund_float(
        self, vendor_id: str, purchase_id: str, *, actor: str
    ) -> FloatMovement | None:
        """Reverse a sale whose token was never issued: its debit back on the float, once.

        Returns the refund (the first one on a repeat), or None when nothing was debited.

        Raises:
            TokenAlreadyIssued: the purchase has its vend: nothing is refunded.
            NotFound: no such purchase of this vendor.
        """
        result: FloatMovement | None = await self._write(
            self._refund, vendor_id, purchase_id, actor
        )
        return result

    def _refund(self, vendor_id: str, purchase_id: str, actor: str) -> Steps:
        purchase = yield one(
            "SELECT * FROM purchases WHERE purchase_id = ? FOR UPDATE", purchase_id
        )
        owner = yield one(
            "SELECT vendor_id FROM vendor_requests WHERE purchase_id = ?", purchase_id
        )
        if purchase is None or owner is None or owner["vendor_id"] != vendor_id:
            raise NotFound("vendor sale", purchase_id)
        vend = yield one("SELECT 1 FROM vends WHERE purchase_id = ?", purchase_id)
        if vend is not None:
            raise TokenAlreadyIssued(purchase_id)
        moves = yield rows(
            "SELECT * FROM float_movements WHERE purchase_id = ? ORDER BY movement_id", purchase_id
        )
        by_kind = {row["kind"]: row for row in moves}
        if MovementKind.REFUND.value in by_kind:
            return movement_of(by_kind[MovementKind.REFUND.value])
        debit = by_kind.get(MovementKind.DEBIT.value)
        current = PurchaseState(purchase["state"])
        if debit is None:
            if is_legal(current, PurchaseState.EXPIRED):
                yield run(
                    "UPDATE purchases SET state = ?, updated_at = ? WHERE purchase_id = ?",
                    PurchaseState.EXPIRED.value,
                    self._stamp(self._clock()),
                    purchase_id,
                )
                yield self._vendor_event(
                    purchase_id,
                    "vendor_sale_reversed",
                    actor,
                    {"from": current, "to": PurchaseState.EXPIRED, "refunded_minor": 0},
                )
            return None
        refund = yield from self._move_float(
            vendor_id,
            MovementKind.REFUND,
            -debit["amount_minor"],
            0,
            purchase_id,
            purchase_id,
            actor,
        )
        if is_legal(current, PurchaseState.REFUND_PENDING):
            yield run(
                "UPDATE purchases SET state = ?, updated_at = ? WHERE purchase_id = ?",
                PurchaseState.REFUND_PENDING.value,
                self._stamp(self._clock()),
                purchase_id,
            )
        yield self._vendor_event(
            purchase_id,
            "vendor_sale_reversed",
            actor,
            {"from": current, "refunded_minor": -debit["amount_minor"]},
        )
        return refund

    async def float_movements(
        self, vendor_id: str, *, since: datetime, until: datetime
    ) -> list[FloatMovement]:
        """The vendor's float movements in [since, until), oldest first."""
        result: list[FloatMovement] = await self._read(
            self._float_movements, vendor_id, since, until
        )
        return result

    def _float_movements(self, vendor_id: str, since: datetime, until: datetime) -> Steps:
        found = yield rows(
            "SELECT * FROM float_movements WHERE vendor_id = ? AND created_at >= ?"
            " AND created_at < ? ORDER BY movement_id",
            vendor_id,
            self._stamp(since),
            self._stamp(until),
        )
        return [movement_of(row) for row in found]

    async def float_balance_at(self, vendor_id: str, moment: datetime) -> int:
        """The float just before ``moment`` (0 before its first movement)."""
        result: int = await self._read(self._balance_at, vendor_id, moment)
        return result

    def _balance_at(self, vendor_id: str, moment: datetime) -> Steps:
        row = yield one(
            "SELECT balance_after_minor FROM float_movements WHERE vendor_id = ?"
            " AND created_at < ? ORDER BY movement_id DESC LIMIT 1",
            vendor_id,
            self._stamp(moment),
        )
        return row["balance_after_minor"] if row is not None else 0

    # -- vendor requests (Idempotency-Key) --------------------------------------------------------

    async def claim_vendor_request(
        self,
        vendor_id: str,
        idempotency_key: str,
        *,
        request_hash: str,
        terminal_id: str | None,
        lease_s: float,
    ) -> RequestClaim:
        """Claim an idempotency key for one run (see ``ClaimOutcome``).

        A run whose lease ended (its process died) is taken over: the caller resumes it, and
        every step after is idempotent (the purchase by its own key, the vend by its purchase).
        """
        result: RequestClaim = await self._write(
            self._claim, vendor_id, idempotency_key, request_hash, terminal_id, lease_s
        )
        return result

    def _claim(
        self,
        vendor_id: str,
        key: str,
        request_hash: str,
        terminal_id: str | None,
        lease_s: float,
    ) -> Steps:
        moment = self._clock()
        now, lease = self._stamp(moment), self._stamp(moment + timedelta(seconds=lease_s))
        added = yield run(
            "INSERT INTO vendor_requests (vendor_id, idempotency_key, request_hash, terminal_id,"
            " state, lease_until, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (vendor_id, idempotency_key) DO NOTHING",
            vendor_id,
            key,
            request_hash,
            terminal_id,
            RequestState.RUNNING.value,
            lease,
            now,
            now,
        )
        row = yield one(_REQUEST + " FOR UPDATE", vendor_id, key)
        request = request_of(row)
        if added == 1:
            return RequestClaim(outcome=ClaimOutcome.NEW, request=request)
        if request.request_hash != request_hash:
            return RequestClaim(outcome=ClaimOutcome.CONFLICT, request=request)
        if request.state is RequestState.DONE:
            return RequestClaim(outcome=ClaimOutcome.DONE, request=request)
        if request.lease_until > moment:
            return RequestClaim(outcome=ClaimOutcome.RUNNING, request=request)
        yield run(
            "UPDATE vendor_requests SET lease_until = ?, updated_at = ?"
            " WHERE vendor_id = ? AND idempotency_key = ?",
            lease,
            now,
            vendor_id,
            key,
        )
        taken = dataclasses.replace(request, lease_until=moment + timedelta(seconds=lease_s))
        return RequestClaim(outcome=ClaimOutcome.NEW, request=taken)

    async def attach_vendor_purchase(
        self, vendor_id: str, idempotency_key: str, purchase_id: str
    ) -> None:
        """Link the request to the purchase it opened (idempotent)."""
        await self._write(self._attach, vendor_id, idempotency_key, purchase_id)

    def _attach(self, vendor_id: str, key: str, purchase_id: str) -> Steps:
        yield run(
            "UPDATE vendor_requests SET purchase_id = ?, updated_at = ?"
            " WHERE vendor_id = ? AND idempotency_key = ? AND purchase_id IS NULL",
            purchase_id,
            self._stamp(self._clock()),
            vendor_id,
            key,
        )

    async def finish_vendor_request(
        self, vendor_id: str, idempotency_key: str, *, status_code: int, response: bytes
    ) -> VendorRequest:
        """Store the answer, once: a request already answered keeps its first answer."""
        result: VendorRequest = await self._write(
            self._finish, vendor_id, idempotency_key, status_code, response
        )
        return result

    def _finish(self, vendor_id: str, key: str, status_code: int, response: bytes) -> Steps:
        yield run(
            "UPDATE vendor_requests SET state = ?, status_code = ?, response = ?, updated_at = ?"
            " WHERE vendor_id = ? AND idempotency_key = ? AND state = ?",
            RequestState.DONE.value,
            status_code,
            response,
            self._stamp(self._clock()),
            vendor_id,
            key,
            RequestState.RUNNING.value,
        )
        row = yield one(_REQUEST, vendor_id, key)
        if row is None:
            raise NotFound("vendor request", f"{vendor_id}/{key}")
        return request_of(row)

    async def release_vendor_request(self, vendor_id: str, idempotency_key: str) -> None:
        """End a run's lease early (it stopped before money moved: the key may be sent again)."""
        await self._write(self._release, vendor_id, idempotency_key)

    def _release(self, vendor_id: str, key: str) -> Steps:
        yield run(
            "UPDATE vendor_requests SET lease_until = ? WHERE vendor_id = ?"
            " AND idempotency_key = ? AND state = ?",
            self._stamp(self._clock()),
            vendor_id,
            key,
            RequestState.RUNNING.value,
        )

    async def get_vendor_request(
        self, vendor_id: str, *, idempotency_key: str | None = None, purchase_id: str | None = None
    ) -> VendorRequest | None:
        """The vendor's request by its key or by the purchase (vend id) it opened; None if none."""
        result: VendorRequest | None = await self._read(
            self._get_request, vendor_id, idempotency_key, purchase_id
        )
        return result

    @staticmethod
    def _get_request(vendor_id: str, key: str | None, purchase_id: str | None) -> Steps:
        if key is not None:
            row = yield one(_REQUEST, vendor_id, key)
        else:
            row = yield one(
                "SELECT * FROM vendor_requests WHERE vendor_id = ? AND purchase_id = ?",
                vendor_id,
                purchase_id,
            )
        return request_of(row) if row is not None else None


class VendorLedger(Protocol):
    """The vendor API's port on the ledger (both backends implement it with ``VendorSteps``)."""

    async def add_vendor(self, draft: VendorDraft, *, actor: str) -> Vendor:
        """As ``VendorSteps.add_vendor``."""
        ...

    async def get_vendor(self, vendor_id: str) -> Vendor:
        """As ``VendorSteps.get_vendor``."""
        ...

    async def list_vendors(self) -> list[Vendor]:
        """As ``VendorSteps.list_vendors``."""
        ...

    async def set_vendor_status(
        self, vendor_id: str, status: VendorStatus, *, actor: str
    ) -> Vendor:
        """As ``VendorSteps.set_vendor_status``."""
        ...

    async def add_terminal(
        self, vendor_id: str, terminal_id: str, *, label: str = "", rate_per_minute: int = 60
    ) -> Terminal:
        """As ``VendorSteps.add_terminal``."""
        ...

    async def terminals(self, vendor_id: str) -> list[Terminal]:
        """As ``VendorSteps.terminals``."""
        ...

    async def add_vendor_key(self, key: VendorKey, *, actor: str) -> None:
        """As ``VendorSteps.add_vendor_key``."""
        ...

    async def revoke_vendor_key(self, key_id: str, *, actor: str) -> None:
        """As ``VendorSteps.revoke_vendor_key``."""
        ...

    async def rotate_vendor_key(
        self, old_key_id: str, new: VendorKey, *, expires_at: datetime, actor: str
    ) -> None:
        """As ``VendorSteps.rotate_vendor_key``."""
        ...

    async def reseal_vendor_key(self, key_id: str, *, sealed_key: bytes, key_hash: str) -> bool:
        """As ``VendorSteps.reseal_vendor_key``."""
        ...

    async def all_vendor_keys(self) -> list[VendorKey]:
        """As ``VendorSteps.all_vendor_keys``."""
        ...

    async def get_vendor_key(self, key_id: str) -> VendorKey | None:
        """As ``VendorSteps.get_vendor_key``."""
        ...

    async def vendor_keys(self, vendor_id: str) -> list[VendorKey]:
        """As ``VendorSteps.vendor_keys``."""
        ...

    async def remember_nonce(self, vendor_id: str, nonce: str, *, forget_before: datetime) -> bool:
        """As ``VendorSteps.remember_nonce``."""
        ...

    async def top_up_float(
        self, vendor_id: str, amount_minor: int, *, reference: str, actor: str
    ) -> FloatMovement:
        """As ``VendorSteps.top_up_float``."""
        ...

    async def refund_float(
        self, vendor_id: str, purchase_id: str, *, actor: str
    ) -> FloatMovement | None:
        """As ``VendorSteps.refund_float``."""
        ...

    async def float_movements(
        self, vendor_id: str, *, since: datetime, until: datetime
    ) -> list[FloatMovement]:
        """As ``VendorSteps.float_movements``."""
        ...

    async def float_balance_at(self, vendor_id: str, moment: datetime) -> int:
        """As ``VendorSteps.float_balance_at``."""
        ...

    async def claim_vendor_request(
        self,
        vendor_id: str,
        idempotency_key: str,
        *,
        request_hash: str,
        terminal_id: str | None,
        lease_s: float,
    ) -> RequestClaim:
        """As ``VendorSteps.claim_vendor_request``."""
        ...

    async def attach_vendor_purchase(
        self, vendor_id: str, idempotency_key: str, purchase_id: str
    ) -> None:
        """As ``VendorSteps.attach_vendor_purchase``."""
        ...

    async def finish_vendor_request(
        self, vendor_id: str, idempotency_key: str, *, status_code: int, response: bytes
    ) -> VendorRequest:
        """As ``VendorSteps.finish_vendor_request``."""
        ...

    async def release_vendor_request(self, vendor_id: str, idempotency_key: str) -> None:
        """As ``VendorSteps.release_vendor_request``."""
        ...

    async def get_vendor_request(
        self, vendor_id: str, *, idempotency_key: str | None = None, purchase_id: str | None = None
    ) -> VendorRequest | None:
        """As ``VendorSteps.get_vendor_request``."""
        ...
