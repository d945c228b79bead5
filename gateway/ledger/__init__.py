"""The transaction ledger: its ports by role, one core of rules, SQLite and PostgreSQL dialects.

Each dialect, and its driver (aiosqlite, asyncpg), is imported when first used: importing the
ports (``gateway.ledger.base``, ``gateway.ledger.ports``) or this package loads neither.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from gateway.ledger.base import (
    C2B_VALIDATION_KEEP_S,
    EARLY_REPORT_LIMIT,
    EARLY_REPORT_TTL_S,
    MAX_SAVED_METERS,
    PENDING_CLAIM_LEASE_S,
    STATUS_ACCEPTED,
    STATUS_CONTRADICTED,
    STATUS_EARLY_KEEP_S,
    STATUS_EARLY_MAX,
    STATUS_EARLY_MAX_BYTES,
    STATUS_HELD,
    STATUS_QUERY_KEEP_S,
    STATUS_UNMATCHED,
    TRANSITIONS,
    C2bValidation,
    ConfirmedPayment,
    DebtRecovery,
    DuplicateError,
    Event,
    FbeDraft,
    FbeIssue,
    FloatDebit,
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
    Minted,
    NotFound,
    NoticeOutcome,
    NoticeRecord,
    OutboxMessage,
    OutboxState,
    OutboxStats,
    PaymentRecord,
    PaymentRecordState,
    PendingClaim,
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
from gateway.values.clock import utc_now

if TYPE_CHECKING:
    from gateway.ledger.postgres import PostgresLedger, is_postgres_url, open_postgres_ledger
    from gateway.ledger.sqlite import SqliteLedger, open_sqlite_ledger, sqlite_path

#: The backends' names, by the module that defines them: imported on first use.
_LAZY: Final[Mapping[str, str]] = {
    "PostgresLedger": "gateway.ledger.postgres",
    "is_postgres_url": "gateway.ledger.postgres",
    "open_postgres_ledger": "gateway.ledger.postgres",
    "SqliteLedger": "gateway.ledger.sqlite",
    "open_sqlite_ledger": "gateway.ledger.sqlite",
    "sqlite_path": "gateway.ledger.sqlite",
}
_POSTGRES_SCHEMES: Final = frozenset({"postgres", "postgresql"})


def __getattr__(name: str) -> Any:  # noqa: ANN401 - whatever the backend module defines
    """A backend's name, importing that backend (and its driver) now."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


@contextlib.asynccontextmanager
async def open_ledger(
    url: str, *, clock: Callable[[], datetime] = utc_now, pool_size: int = 10
) -> AsyncIterator[Ledger]:
    """Open the ledger named by ``url``, migrated; closed on exit.

    ``sqlite:///var/gateway.db`` (one instance) or ``postgresql://host:5432/db`` (several;
    ``pool_size``: this process's connections at most).

    Raises:
        LedgerError: the URL names no supported backend.
        LedgerUnavailable, MigrationError: the database cannot be opened or brought up to date.
    """
    if urlsplit(url).scheme in _POSTGRES_SCHEMES:  # gateway.ledger.postgres.is_postgres_url
        from gateway.ledger.postgres import open_postgres_ledger  # noqa: PLC0415 - on first use

        async with open_postgres_ledger(url, clock=clock, max_size=pool_size) as ledger:
            yield ledger
        return
    from gateway.ledger.sqlite import open_sqlite_ledger, sqlite_path  # noqa: PLC0415

    async with open_sqlite_ledger(sqlite_path(url), clock=clock) as ledger:
        yield ledger


__all__ = [
    "C2B_VALIDATION_KEEP_S",
    "EARLY_REPORT_LIMIT",
    "EARLY_REPORT_TTL_S",
    "MAX_SAVED_METERS",
    "PENDING_CLAIM_LEASE_S",
    "STATUS_ACCEPTED",
    "STATUS_CONTRADICTED",
    "STATUS_EARLY_KEEP_S",
    "STATUS_EARLY_MAX",
    "STATUS_EARLY_MAX_BYTES",
    "STATUS_HELD",
    "STATUS_QUERY_KEEP_S",
    "STATUS_UNMATCHED",
    "TRANSITIONS",
    "C2bValidation",
    "ConfirmedPayment",
    "CustomerLedger",
    "DebtRecovery",
    "DuplicateError",
    "Event",
    "FbeDraft",
    "FbeIssue",
    "FloatDebit",
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
    "Minted",
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
    "PendingClaim",
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
    "is_postgres_url",
    "mask_name",
    "new_purchase_id",
    "open_ledger",
    "open_postgres_ledger",
    "open_sqlite_ledger",
    "open_vending_key",
    "seal_vending_key",
    "sqlite_path",
]
