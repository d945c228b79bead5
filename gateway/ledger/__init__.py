"""The transaction ledger: the ``Ledger`` port, its SQLite backend and sealed vending keys."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from gateway.ledger.base import (
    MAX_SAVED_METERS,
    TRANSITIONS,
    ConfirmedPayment,
    DuplicateError,
    Event,
    IdempotencyConflict,
    IllegalTransition,
    Ledger,
    LedgerError,
    LedgerUnavailable,
    MessageKind,
    MeterInfo,
    MeterNumber,
    MeterRecord,
    MeterStatus,
    MigrationError,
    NotFound,
    NoticeOutcome,
    NoticeRecord,
    OutboxMessage,
    OutboxState,
    PaymentRecord,
    PaymentRecordState,
    Purchase,
    PurchaseDraft,
    PurchaseId,
    PurchaseState,
    ReportRow,
    SavedMeter,
    SavedMetersFull,
    SealedVendingKey,
    TidConflict,
    Vend,
    VendDraft,
    VendingKeyUnreadable,
    VendOutcome,
    is_legal,
    mask_name,
    new_purchase_id,
)
from gateway.ledger.keys import VendingKeyMaterial, open_vending_key, seal_vending_key
from gateway.ledger.sqlite import SqliteLedger, open_sqlite_ledger, sqlite_path


def _utc_now() -> datetime:
    return datetime.now(UTC)


@contextlib.asynccontextmanager
async def open_ledger(
    url: str, *, clock: Callable[[], datetime] = _utc_now
) -> AsyncIterator[Ledger]:
    """Open the ledger named by ``url`` (``sqlite:///var/gateway.db``), migrated; closed on exit.

    Raises:
        LedgerError: the URL names no supported backend (PostgreSQL arrives with issue 7).
        LedgerUnavailable, MigrationError: the database cannot be opened or brought up to date.
    """
    if url.startswith(("postgres://", "postgresql://")):
        raise LedgerError("the PostgreSQL ledger is not built yet (issue 7); use sqlite:///path")
    async with open_sqlite_ledger(sqlite_path(url), clock=clock) as ledger:
        yield ledger


__all__ = [
    "MAX_SAVED_METERS",
    "TRANSITIONS",
    "ConfirmedPayment",
    "DuplicateError",
    "Event",
    "IdempotencyConflict",
    "IllegalTransition",
    "Ledger",
    "LedgerError",
    "LedgerUnavailable",
    "MessageKind",
    "MeterInfo",
    "MeterNumber",
    "MeterRecord",
    "MeterStatus",
    "MigrationError",
    "NotFound",
    "NoticeOutcome",
    "NoticeRecord",
    "OutboxMessage",
    "OutboxState",
    "PaymentRecord",
    "PaymentRecordState",
    "Purchase",
    "PurchaseDraft",
    "PurchaseId",
    "PurchaseState",
    "ReportRow",
    "SavedMeter",
    "SavedMetersFull",
    "SealedVendingKey",
    "SqliteLedger",
    "TidConflict",
    "Vend",
    "VendDraft",
    "VendOutcome",
    "VendingKeyMaterial",
    "VendingKeyUnreadable",
    "is_legal",
    "mask_name",
    "new_purchase_id",
    "open_ledger",
    "open_sqlite_ledger",
    "open_vending_key",
    "seal_vending_key",
    "sqlite_path",
]
