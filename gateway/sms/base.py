"""The SMS port: send a text, learn what became of it.

```
SmsError                     gateway.errors.GatewayError; provider, retryable
  SmsRejected                the provider refused the message for good (invalid number, blacklist …)
  SmsUnavailable             network error, timeout, 5xx, throttling: retryable=True
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from gateway.errors import GatewayError
from gateway.phone import Msisdn

# Re-exported from here too: these moved to gateway/values/, shared by the ledger and sms.
from gateway.values.messages import DeliveryReport as DeliveryReport  # noqa: PLC0414
from gateway.values.messages import DeliveryState as DeliveryState  # noqa: PLC0414


@dataclass(frozen=True, slots=True, kw_only=True)
class SentMessage:
    """The provider accepted a message: its id (for delivery reports) and what it cost."""

    provider_message_id: str
    state: DeliveryState = DeliveryState.SENT
    cost: str | None = None  # as the provider states it, e.g. "KES 0.8000"; never used as money


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


class MalformedDeliveryReport(SmsError):
    """A delivery-report callback we cannot read; ``field`` names what is missing or wrong."""

    def __init__(self, message: str, *, field: str, provider: str) -> None:
        super().__init__(message, provider=provider)
        self.field = field


class DeliveryReportParser(Protocol):
    """Reads one provider's delivery-report callback (its form fields) into a ``DeliveryReport``.

    The composition root hands the delivery route the parser of the configured adapter, so the
    web layer never imports an adapter.
    """

    def __call__(self, form: Mapping[str, str], *, raw: bytes = b"") -> DeliveryReport:
        """The report the form describes.

        Raises:
            MalformedDeliveryReport: a field is missing or malformed.
        """
        ...
