"""Recovery: at start-up and on a timer, finish what a crash, an outage or a lost callback left.

One sweep, in order:

1. vend every paid-but-not-vended purchase (invariant 3: no paid purchase is lost);
2. ask the provider about purchases awaiting payment past their check time (with backoff),
   expiring them after the payment deadline (a later confirmed success still vends);
3. send due outbox messages (including those a crashed worker had claimed).

A sweep never raises: each step logs what failed and the next sweep tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from gateway.errors import GatewayError
from gateway.sms.outbox import OutboxWorker
from gateway.vending import Vending

log = structlog.get_logger()


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepReport:
    """What one sweep did."""

    vended: int = 0
    checked: int = 0
    sent: int = 0
    failed_steps: tuple[str, ...] = ()


class Sweeper:
    """Runs ``sweep_once`` at start and every ``interval_s`` until stopped.

    Args:
        vending: the saga (it makes every state change).
        outbox: the SMS worker, or None when another task drives it.
        clock: the time source (UTC, aware).
        interval_s: the pause between sweeps.
        batch: purchases handled per step and sweep.
        check_concurrency: payment status checks in flight at once.
    """

    def __init__(
        self,
        *,
        vending: Vending,
        outbox: OutboxWorker | None,
        clock: Callable[[], datetime] = _utc_now,
        interval_s: float = 15.0,
        batch: int = 100,
        check_concurrency: int = 16,
    ) -> None:
        self._vending = vending
        self._outbox = outbox
        self._clock = clock
        self._interval_s = interval_s
        self._batch = batch
        self._check_concurrency = max(1, check_concurrency)

    async def sweep_once(self) -> SweepReport:
        """One pass over paid-not-vended, due payment checks and due messages. Never raises."""
        ledger = self._vending.ledger
        vended = checked = sent = 0
        failed: list[str] = []
        try:
            vended = await self._vending.finish_paid(limit=self._batch)
        except GatewayError as exc:
            failed.append("vend")
            log.warning("sweep_step_failed", step="vend", error=str(exc))
        try:
            due = await ledger.due_for_check(self._clock(), limit=self._batch)
            gate = asyncio.Semaphore(self._check_concurrency)

            async def check(purchase_id: str) -> None:
                # Several at once: one status query hanging to its deadline must not hold up
                # the recovery of every lost callback behind it.
                async with gate:
                    try:
                        await self._vending.check_payment(purchase_id)
                    except GatewayError as exc:
                        log.warning(
                            "payment_check_deferred", purchase_id=purchase_id, error=str(exc)
                        )

            await asyncio.gather(*(check(purchase.purchase_id) for purchase in due))
            checked = len(due)
        except GatewayError as exc:
            failed.append("check")
            log.warning("sweep_step_failed", step="check", error=str(exc))
        if self._outbox is not None:
            try:
                sent = (await self._outbox.run_once()).sent
            except GatewayError as exc:
                failed.append("outbox")
                log.warning("sweep_step_failed", step="outbox", error=str(exc))
        report = SweepReport(vended=vended, checked=checked, sent=sent, failed_steps=tuple(failed))
        if vended or checked or sent or failed:
            log.info(
                "sweep_finished", vended=vended, checked=checked, sent=sent, failed=list(failed)
            )
        return report

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep now, then every ``interval_s``, until ``stop`` is set."""
        while not stop.is_set():
            try:
                await self.sweep_once()
            except Exception:  # the timer loop is an outermost edge: never die
                log.exception("sweep_crashed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await stop.wait()
