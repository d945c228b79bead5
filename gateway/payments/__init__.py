"""Mobile-money collections: the ``PaymentProvider`` port and its adapters."""

from gateway.payments.base import (
    AmountMismatch,
    CallbackAck,
    CollectionRequest,
    CollectionStarted,
    ForgedCallback,
    PaymentCancelled,
    PaymentDeclined,
    PaymentError,
    PaymentEvents,
    PaymentNotice,
    PaymentProvider,
    PaymentState,
    PaymentStatus,
    PaymentTimedOut,
    ProviderReference,
    ProviderUnavailable,
)

__all__ = [
    "AmountMismatch",
    "CallbackAck",
    "CollectionRequest",
    "CollectionStarted",
    "ForgedCallback",
    "PaymentCancelled",
    "PaymentDeclined",
    "PaymentError",
    "PaymentEvents",
    "PaymentNotice",
    "PaymentProvider",
    "PaymentState",
    "PaymentStatus",
    "PaymentTimedOut",
    "ProviderReference",
    "ProviderUnavailable",
]
