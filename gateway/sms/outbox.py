"""The outbox worker: sends queued SMS through the ``SmsSender``, retries, records delivery.

Messages are written to the outbox in the same transaction as the vend that produced them, so a
token is never lost between the ledger and the network. The worker claims due messages with a
lease (a crashed worker's claims come back when the lease ends: a message may be sent twice
after a crash, never zero times; a resend carries the same token), sends them, and records the
provider's message id and cost.

A message is sent once unless a crash comes between the provider's acceptance and our record of
it (Africa's Talking takes no idempotency key, docs/protocols.md §1.3): so a send only starts while
its claim has time left for the send's deadline and the record (``record_margin_s``), a message
that waited too long behind slow sends is left to its lease (never sent, it comes back then), and
a failed write of an acceptance is tried again (``record_attempts``) rather than dropped, which
would leave the message claimed and send it again when the lease ends.

A retryable failure (``SmsError.retryable``) is tried again after a capped, jittered exponential
backoff; a refusal (``SmsRejected``) or too many attempts marks the message FAILED for an
operator. Delivery reports update the message and, for a token message, move the purchase to
DELIVERED.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import structlog

from gateway.retry import backoff_s
from gateway.sms.base import SentMessage, SmsError, SmsSender
from gateway.values.clock import utc_now
from gateway.values.messages import DeliveryReport, DeliveryState, OutboxMessage

log = structlog.get_logger()


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxPolicy:
    """How the worker retries. Seconds throughout.

    Attributes:
        base_delay_s: the first retry's delay before jitter; doubles with each attempt.
        max_delay_s: the cap on the delay.
        max_attempts: after this many attempts a retryable failure becomes FAILED.
        lease_s: how long a claim lasts (longer than a send's timeout).
        send_timeout_s: the bound on one send.
        batch: messages claimed per run.
        concurrency: sends in flight at once.
        record_margin_s: the time a claim must have left, beyond ``send_timeout_s``, for a
            send to start (the acceptance is recorded within the lease).
        record_attempts: tries to record an accepted send before giving up (logged).
        record_retry_s: the pause between those tries.
    """

    base_delay_s: float = 5.0
    max_delay_s: float = 900.0
    max_attempts: int = 12
    lease_s: float = 120.0
    send_timeout_s: float = 30.0
    batch: int = 50
    concurrency: int = 8
    record_margin_s: float = 5.0
    record_attempts: int = 5
    record_retry_s: float = 0.2


class OutboxStore(Protocol):
    """What the worker needs of the outbox's store (the ledger satisfies it).

    The worker never imports the ledger: it names the five calls it makes, on the types of
    ``gateway/values/messages.py`` (docs/architecture.md, "Who may import whom").
    """

    async def claim_outbox(
        self, now: datetime, *, lease_until: datetime, limit: int = 50
    ) -> list[OutboxMessage]:
        """Claim due messages until ``lease_until`` (expired leases come back)."""
        ...

    async def outbox_sent(
        self,
        message_id: int,
        *,
        provider_message_id: str,
        cost: str | None,
        state: DeliveryState,
    ) -> None:
        """The provider took the message."""
        ...

    async def outbox_retry(self, message_id: int, *, next_try_at: datetime, error: str) -> None:
        """Sending failed for now; try again at ``next_try_at``."""
        ...

    async def outbox_failed(self, message_id: int, *, error: str) -> None:
        """Sending failed for good; an operator must look."""
        ...

    async def apply_delivery_report(self, report: DeliveryReport) -> OutboxMessage | None:
        """Record a delivery report; None when the message id is unknown (yet)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxRun:
    """What one run did."""

    sent: int = 0
    retried: int = 0
    failed: int = 0
    deferred: int = 0  # left to their lease: too little of it was left to send and record


class OutboxWorker:
    """Sends due outbox messages.

    Args:
        ledger: holds the outbox (the ledger, through :class:`OutboxStore`).
        sender: the SMS adapter.
        clock: the time source (UTC, aware).
        jitter: returns a float in [0, 1): the randomness seam (tests pass a constant).
        policy: retry timings.
    """

    def __init__(
        self,
        *,
        ledger: OutboxStore,
        sender: SmsSender,
        clock: Callable[[], datetime] = utc_now,
        jitter: Callable[[], float] = random.random,
        policy: OutboxPolicy | None = None,
    ) -> None:
        self._ledger = ledger
        self._sender = sender
        self._clock = clock
        self._jitter = jitter
        self._policy = policy or OutboxPolicy()

    def backoff(self, attempts: int) -> timedelta:
        """The delay before retry number ``attempts`` (1-based): capped exponential, jittered.

        "Equal jitter": half the capped delay plus a random part of the other half, so retries
        of many messages spread out but none comes back immediately.
        """
        policy = self._policy
        seconds = backoff_s(
            attempts - 1,
            base_s=policy.base_delay_s,
            cap_s=policy.max_delay_s,
            jitter="equal",
            random=self._jitter,
        )
        return timedelta(seconds=seconds)

    async def run_once(self) -> OutboxRun:
        """Claim the due messages and send them; returns the counts. Never raises for a send."""
        now = self._clock()
        policy = self._policy
        messages = await self._ledger.claim_outbox(
            now, lease_until=now + timedelta(seconds=policy.lease_s), limit=policy.batch
        )
        if not messages:
            return OutboxRun()
        gate = asyncio.Semaphore(policy.concurrency)

        async def bounded(message: OutboxMessage) -> str:
            async with gate:
                return await self._send(message)

        outcomes = await asyncio.gather(*(bounded(m) for m in messages))
        return OutboxRun(
            sent=outcomes.count("sent"),
            retried=outcomes.count("retried"),
            failed=outcomes.count("failed"),
            deferred=outcomes.count("deferred"),
        )

    async def _send(self, message: OutboxMessage) -> str:
        bound = structlog.contextvars.bound_contextvars(
            purchase_id=message.purchase_id, message_id=message.message_id
        )
        with bound:
            if message.recipient is None:  # HELD messages are never claimed; be safe anyway
                await self._ledger.outbox_failed(message.message_id, error="no recipient")
                return "failed"
            policy = self._policy
            needed = timedelta(seconds=policy.send_timeout_s + policy.record_margin_s)
            if self._clock() + needed > message.next_try_at:  # next_try_at: the lease's end
                # Sent now, it might be recorded after the lease ends and another worker
                # (or instance) has claimed and sent it again. Untouched, it comes back then.
                log.warning("sms_send_deferred_to_lease_end", kind=message.kind.value)
                return "deferred"
            try:
                async with asyncio.timeout(self._policy.send_timeout_s):
                    sent = await self._sender.send(message.recipient, message.body)
            except SmsError as exc:
                return await self._after_failure(message, str(exc), retryable=exc.retryable)
            except TimeoutError:
                return await self._after_failure(message, "send timed out", retryable=True)
            except Exception as exc:  # the outbox loop is an outermost edge: log, retry later
                log.exception("sms_send_crashed", kind=message.kind.value)
                return await self._after_failure(message, repr(exc), retryable=True)
            await self._record_sent(message, sent)
            log.info(
                "sms_sent",
                kind=message.kind.value,
                provider_message_id=sent.provider_message_id,
                cost=sent.cost,
                attempts=message.attempts,
            )
            return "sent"

    async def _record_sent(self, message: OutboxMessage, sent: SentMessage) -> None:
        """Record the provider's acceptance, trying again on a failed write.

        Unrecorded, the message stays claimed and is sent a second time when its lease ends.
        """
        attempts = max(1, self._policy.record_attempts)
        for attempt in range(1, attempts + 1):
            try:
                await self._ledger.outbox_sent(
                    message.message_id,
                    provider_message_id=sent.provider_message_id,
                    cost=sent.cost,
                    state=sent.state,
                )
            except Exception as exc:
                if attempt == attempts:
                    log.exception("sms_sent_not_recorded", attempts=attempt)
                    raise
                log.warning("sms_sent_record_retried", error=repr(exc), attempt=attempt)
                await asyncio.sleep(self._policy.record_retry_s)
            else:
                return

    async def _after_failure(self, message: OutboxMessage, error: str, *, retryable: bool) -> str:
        if retryable and message.attempts < self._policy.max_attempts:
            next_try_at = self._clock() + self.backoff(message.attempts)
            await self._ledger.outbox_retry(
                message.message_id, next_try_at=next_try_at, error=error
            )
            log.warning("sms_retry_scheduled", error=error, attempts=message.attempts)
            return "retried"
        await self._ledger.outbox_failed(message.message_id, error=error)
        log.error("sms_failed", error=error, attempts=message.attempts, retryable=retryable)
        return "failed"

    async def apply_delivery_report(self, report: DeliveryReport) -> OutboxMessage | None:
        """Record a delivery report (a delivered token message delivers its purchase).

        Returns the message, or None when the id is unknown (logged; not an error).
        """
        message = await self._ledger.apply_delivery_report(report)
        if message is None:
            log.warning("delivery_report_unknown", provider_message_id=report.provider_message_id)
        return message
