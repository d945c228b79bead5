"""The transaction ledger: its ports by role, one core of rules, SQLite and PostgreSQL dialects."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from gateway.ledger.base import (
    EARLY_REPORT_LIMIT,
    EARLY_REPORT_TTL_S,
    MAX_SAVED_METERS,
    STATUS_ACCEPTED,
    STATUS_CONTRADICTED,
    STATUS_QUERY_KEEP_S,
    STATUS_UNMATCHED,
    TRANSITIONS,
    ConfirmedPayment,
    DebtRecovery,
    DuplicateError,
    Event,
    FbeDraft,
    FbeIssue,
    IdempotencyConflict,
    IllegalTransition,
    KeyChange,
    KeyChangeState,
    KeyRotation,
    LedgerError,
    LedgerUnavailable,
    MessageKind,
    MeterDebt,
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
    OutboxStats,
    PaymentRecord,
    PaymentRecordState,
    Purchase,
    PurchaseDraft,
    PurchaseId,
    PurchaseState,
    ReceiptReused,
    ReportRow,
    SavedMeter,
    SavedMetersFull,
    SealedVendingKey,
    TidConflict,
    Vend,
    VendConflict,
    VendContext,
    VendDraft,
    VendingKeyUnreadable,
    VendOutcome,
    is_legal,
    mask_name,
    new_purchase_id,
)
from gateway.ledger.keys import VendingKeyMaterial, open_vending_key, seal_vending_key
from gateway.ledger.ports import (
    CustomerLedger,
    Ledger,
    LedgerStats,
    MessageQueue,
    OperatorReads,
    OutboxLedger,
    PaymentChecks,
    PurchaseReads,
    Registry,
    SagaLedger,
    StatusQueries,
)
from gateway.ledger.postgres import PostgresLedger, is_postgres_url, open_postgres_ledger
from gateway.ledger.sqlite import SqliteLedger, open_sqlite_ledger, sqlite_path


def _utc_now() -> datetime:
    return datetime.now(UTC)


@contextlib.asynccontextmanager
async def open_ledger(
    url: str, *, clock: Callable[[], datetime] = _utc_now
) -> AsyncIterator[Ledger]:
    """Open the ledger named by ``url``, migrated; closed on exit.

    ``sqlite:///var/gateway.db`` (one instance) or ``postgresql://host:5432/db`` (several).

    Raises:
        LedgerError: the URL names no supported backend.
        LedgerUnavailable, MigrationError: the database cannot be opened or brought up to date.
    """
    if is_postgres_url(url):
        async with open_postgres_ledger(url, clock=clock) as ledger:
            yield ledger
        return
    async with open_sqlite_ledger(sqlite_path(url), clock=clock) as ledger:
        yield ledger


__all__ = [
    "EARLY_REPORT_LIMIT",
    "EARLY_REPORT_TTL_S",
    "MAX_SAVED_METERS",
    "STATUS_ACCEPTED",
    "STATUS_CONTRADICTED",
    "STATUS_QUERY_KEEP_S",
    "STATUS_UNMATCHED",
    "TRANSITIONS",
    "ConfirmedPayment",
    "CustomerLedger",
    "DebtRecovery",
    "DuplicateError",
    "Event",
    "FbeDraft",
    "FbeIssue",
    "IdempotencyConflict",
    "IllegalTransition",
    "KeyChange",
    "KeyChangeState",
    "KeyRotation",
    "Ledger",
    "LedgerError",
    "LedgerStats",
    "LedgerUnavailable",
    "MessageKind",
    "MessageQueue",
    "MeterDebt",
    "MeterInfo",
    "MeterNumber",
    "MeterRecord",
    "MeterStatus",
    "MigrationError",
    "NotFound",
    "NoticeOutcome",
    "NoticeRecord",
    "OperatorReads",
    "OutboxLedger",
    "OutboxMessage",
    "OutboxState",
    "OutboxStats",
    "PaymentChecks",
    "PaymentRecord",
    "PaymentRecordState",
    "PostgresLedger",
    "Purchase",
    "PurchaseDraft",
    "PurchaseId",
    "PurchaseReads",
    "PurchaseState",
    "ReceiptReused",
    "Registry",
    "ReportRow",
    "SagaLedger",
    "SavedMeter",
    "SavedMetersFull",
    "SealedVendingKey",
    "SqliteLedger",
    "StatusQueries",
    "TidConflict",
    "Vend",
    "VendConflict",
    "VendContext",
    "VendDraft",
    "VendOutcome",
    "VendingKeyMaterial",
    "VendingKeyUnreadable",
    "is_legal",
    "mask_name",
    "new_purchase_id",
    "open_ledger",
    "open_postgres_ledger",
    "open_sqlite_ledger",
    "open_vending_key",
    "seal_vending_key",
    "sqlite_path",
]
