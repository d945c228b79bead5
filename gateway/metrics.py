"""Prometheus metrics of one gateway instance, on a registry of its own (not the global one).

What each metric means and what to do when it alarms is in ``docs/operations.md``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)


@dataclass
class Metrics:
    """The gateway's metrics; ``registry`` is what ``/metrics`` renders."""

    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )

    def __post_init__(self) -> None:
        r = self.registry
        self.purchases = Gauge(
            "gateway_purchases", "Purchases by state (from the ledger)", ["state"], registry=r
        )
        self.payment_confirmation_seconds = Histogram(
            "gateway_payment_confirmation_seconds",
            "From payment request to the provider's confirmation",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.vend_seconds = Histogram(
            "gateway_vend_seconds",
            "Durable vend step: TID, token, vend row, outbox message",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.outbox_backlog = Gauge(
            "gateway_outbox_backlog", "SMS messages not yet accepted by the provider", registry=r
        )
        self.outbox_oldest_age_seconds = Gauge(
            "gateway_outbox_oldest_age_seconds", "Age of the oldest unsent SMS message", registry=r
        )
        self.ussd_hop_seconds = Histogram(
            "gateway_ussd_hop_seconds",
            "Time to answer one USSD request (Africa's Talking waits at most a few seconds)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.http_requests = Counter(
            "gateway_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.outbox_held = Gauge(
            "gateway_outbox_held",
            "SMS messages with no recipient, waiting for an operator",
            registry=r,
        )
        self.security_events = Counter(
            "gateway_security_events",
            "Forged, mismatched or unexpected callbacks and requests",
            ["kind"],
            registry=r,
        )

        # (route, status) → its counter child: ``labels()`` validates and locks on every call
        self._request_counters: dict[tuple[str, int], Any] = {}

    def count_request(self, route: str, status: int) -> None:
        """One HTTP request served on ``route`` with ``status`` (the children are cached)."""
        child = self._request_counters.get((route, status))
        if child is None:
            child = self.http_requests.labels(route=route, status=str(status))
            self._request_counters[(route, status)] = child
        child.inc()

    # -- the saga's observer (gateway.vending.SagaObserver) ------------------------------------

    def payment_confirmed(self, seconds: float) -> None:
        """A payment was proven, ``seconds`` after its collection was requested."""
        self.payment_confirmation_seconds.observe(seconds)

    def vended(self, seconds: float) -> None:
        """A durable vend step took ``seconds``."""
        self.vend_seconds.observe(seconds)

    def security_event(self, kind: str) -> None:
        """The saga saw a security event (``payment_receipt_reused`` …): counted by ``kind``."""
        self.security_events.labels(kind=kind).inc()


class LedgerStats(Protocol):
    """What ``/metrics`` reads from the ledger at scrape time."""

    async def purchase_counts(self) -> dict[str, int]:
        """Purchases by state."""
        ...

    async def outbox_stats(self, now: datetime) -> OutboxSnapshot:
        """The outbox backlog, its oldest message's age and the held messages."""
        ...


class OutboxSnapshot(Protocol):
    """The outbox figures ``/metrics`` shows."""

    @property
    def backlog(self) -> int:
        """Messages not sent yet."""
        ...

    @property
    def oldest_age_s(self) -> float:
        """Seconds since the oldest unsent message was queued."""
        ...

    @property
    def held(self) -> int:
        """Messages with no recipient."""
        ...


def ledger_refresher(
    metrics: Metrics, ledger: LedgerStats, clock: Callable[[], datetime] | None = None
) -> Callable[[], Awaitable[None]]:
    """A coroutine function that copies the ledger's gauges into ``metrics`` (run per scrape)."""
    now = clock or (lambda: datetime.now(UTC))

    async def refresh() -> None:
        for state, count in (await ledger.purchase_counts()).items():
            metrics.purchases.labels(state=state).set(count)
        outbox = await ledger.outbox_stats(now())
        metrics.outbox_backlog.set(outbox.backlog)
        metrics.outbox_oldest_age_seconds.set(outbox.oldest_age_s)
        metrics.outbox_held.set(outbox.held)

    return refresh
