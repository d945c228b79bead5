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
from gateway.sms.outbox import OutboxPolicy, OutboxWorker

__all__ = [
    "DeliveryReport",
    "DeliveryState",
    "OutboxPolicy",
    "OutboxWorker",
    "SentMessage",
    "SmsError",
    "SmsRejected",
    "SmsSender",
    "SmsUnavailable",
]
