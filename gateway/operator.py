"""The operator's port: what the admin pages read of the ledger, and the records they show.

``gateway/web/admin.py`` never imports the ledger (docs/architecture.md, "Who may import whom"):
it reads through :class:`OperatorRecords`, which the ledger satisfies, and changes a purchase only
through the saga (reprint, vend); the one thing it writes itself is the audit trail of the admin
sign-in (security events). The records and errors it needs are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from gateway.ledger import (
    DebtRecovery,
    Event,
    NotFound,
    OutboxMessage,
    OutboxState,
    PaymentRecord,
    Purchase,
    PurchaseState,
    Vend,
)

__all__ = [
    "DebtRecovery",
    "Event",
    "NotFound",
    "OperatorRecords",
    "OutboxMessage",
    "OutboxState",
    "PaymentRecord",
    "Purchase",
    "PurchaseState",
    "Vend",
]


class OperatorRecords(Protocol):
    """The reads behind the admin pages (``gateway.ledger.Ledger`` satisfies it)."""

    async def get_purchase(self, purchase_id: str) -> Purchase:
        """The purchase. Raises ``NotFound``."""
        ...

    async def find_purchases(
        self,
        *,
        phone: str | None = None,
        meter: str | None = None,
        states: Sequence[PurchaseState] | None = None,
        limit: int = 20,
    ) -> list[Purchase]:
        """Purchases matching every given filter, newest first."""
        ...

    async def get_payment(self, provider: str, reference: str) -> PaymentRecord | None:
        """The payment row for (provider, reference), if any."""
        ...

    async def get_vend(self, purchase_id: str) -> Vend | None:
        """The purchase's vend, if it has one."""
        ...

    async def outbox_for(self, purchase_id: str) -> list[OutboxMessage]:
        """The purchase's messages, oldest first."""
        ...

    async def timeline(self, purchase_id: str) -> list[Event]:
        """The purchase's events, oldest first."""
        ...

    async def get_debt_recovery(self, purchase_id: str) -> DebtRecovery | None:
        """What the purchase's vend recovered, if anything."""
        ...

    async def events(self, *, kind: str | None = None, limit: int = 100) -> list[Event]:
        """Recent events, newest first, optionally of one kind (security review)."""
        ...

    async def append_event(
        self,
        purchase_id: str | None,
        kind: str,
        *,
        actor: str,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """Append an audit event (the admin sign-in's security events have no purchase)."""
        ...
