"""SMS delivery: the ``SmsSender`` port, its adapters and the outbox worker."""

from gateway.sms.base import (
    DeliveryReport,
    DeliveryState,
    SentMessage,
    SmsError,
    SmsRejected,
    SmsSender,
    SmsUnavailable,
)

__all__ = [
    "DeliveryReport",
    "DeliveryState",
    "SentMessage",
    "SmsError",
    "SmsRejected",
    "SmsSender",
    "SmsUnavailable",
]
