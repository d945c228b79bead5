"""Outbox messages and SMS delivery reports: the types the ledger and ``gateway/sms/`` share.

The ledger stores messages and applies delivery reports; the SMS adapters and the outbox worker
send messages and parse reports. Both see these types here, so neither imports the other
(docs/architecture.md, "Who may import whom").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from gateway.values.ids import PurchaseId
from gateway.values.phone import Msisdn

__all__ = ["DeliveryReport", "DeliveryState", "MessageKind", "OutboxMessage", "OutboxState"]


class DeliveryState(StrEnum):
    """What the network says about a message (Africa's Talking delivery-report vocabulary)."""

    QUEUED = "queued"  # accepted by the provider, not yet handed to the network
    SENT = "sent"  # handed to the network
    DELIVERED = "delivered"  # the handset has it
    FAILED = "failed"  # final failure reported by the network
    REJECTED = "rejected"  # the provider refused it

    @property
    def is_final(self) -> bool:
        """Whether no later report can change this state."""
        return self in {DeliveryState.DELIVERED, DeliveryState.FAILED, DeliveryState.REJECTED}


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryReport:
    """A delivery report for a message we sent."""

    provider_message_id: str
    state: DeliveryState
    failure_reason: str | None = None
    raw: bytes = field(default=b"", repr=False)


class OutboxState(StrEnum):
    """Where an outgoing SMS stands."""

    PENDING = "pending"  # due at ``next_try_at``
    SENDING = "sending"  # claimed by a worker until ``next_try_at`` (the lease)
    SENT = "sent"  # the provider took it
    DELIVERED = "delivered"
    FAILED = "failed"  # refused for good: needs an operator
    HELD = "held"  # no recipient known (C2B without a phone): needs an operator


class MessageKind(StrEnum):
    """Why a message is in the outbox."""

    TOKEN = "token"  # noqa: S105 - a message kind, not a secret; exactly one per vend
    REPRINT = "reprint"  # the same token again, on request
    REPLY = "reply"  # an answer to a customer's SMS command (no purchase needed)
    FBE = "fbe"  # the month's free basic electricity token, sent with the purchase it came with


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxMessage:
    """One SMS to send. ``body`` may hold a token: never log it."""

    message_id: int
    purchase_id: PurchaseId | None
    kind: MessageKind
    recipient: Msisdn | None
    body: str = field(repr=False)
    state: OutboxState
    attempts: int
    next_try_at: datetime
    provider_message_id: str | None
    cost: str | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
