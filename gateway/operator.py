"""The operator's port: what the admin pages read of the ledger, and the records they show.

``gateway/web/admin.py`` never imports the ledger (docs/architecture.md, "Who may import whom"):
it reads through :class:`OperatorRecords`, which the ledger satisfies, and changes nothing but
through the saga (reprint, vend). The records and errors it needs are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gateway.ledger import (
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
