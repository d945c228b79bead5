"""The SMS port: send a text, learn what became of it.

```
SmsError                     gateway.errors.GatewayError; provider, retryable
  SmsRejected                the provider refused the message for good (invalid number, blacklist …)
  SmsUnavailable             network error, timeout, 5xx, throttling: retryable=True
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from gateway.errors import GatewayError
from gateway.phone import Msisdn


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
class SentMessage:
    """The provider accepted a message: its id (for delivery reports) and what it cost."""

    provider_message_id: str
    state: DeliveryState = DeliveryState.SENT
    cost: str | None = None  # as the provider states it, e.g. "KES 0.8000"; never used as money


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryReport:
    """A delivery report for a message we sent."""

    provider_message_id: str
    state: DeliveryState
    failure_reason: str | None = None
    raw: bytes = field(default=b"", repr=False)


class SmsSender(Protocol):
    """Sends one SMS. Implementations bound every call with a timeout."""

    async def send(self, to: Msisdn, text: str) -> SentMessage:
        """Send ``text`` to ``to``. Not idempotent at the provider: the outbox decides retries.

        Raises:
            SmsRejected: refused for good; do not retry.
            SmsUnavailable: not sent now; retry later (``retryable`` is True).
        """
        ...


class SmsError(GatewayError):
    """An SMS could not be sent. ``provider`` names the adapter."""

    def __init__(self, message: str, *, provider: str, retryable: bool = False) -> None:
        super().__init__(message, retryable=retryable)
        self.provider = provider


class SmsRejected(SmsError):
    """The provider refused the message; retrying will not help."""


class SmsUnavailable(SmsError):
    """The provider could not take the message now; retrying may help."""

    def __init__(self, message: str, *, provider: str, retryable: bool = True) -> None:
        super().__init__(message, provider=provider, retryable=retryable)
