"""Recovery: at start-up and on a timer, finish what a crash, an outage or a lost callback left.

One sweep, in order:

0. carry through C2B confirmations recorded but left unfinished (the route answers Daraja once
   the claim is recorded and confirms it in the background; a crash leaves a pending claim);
1. vend every paid-but-not-vended purchase (invariant 3: no paid purchase is lost);
2. ask the provider about purchases awaiting payment past their check time (the first about 20 s
   after the prompt, then every 30 s), expiring them after the payment deadline (a later
   confirmed success still vends);
3. send due outbox messages (including those a crashed worker had claimed).

``run`` does steps 1 and 3 every ``interval_s`` and step 2 continuously: a checker keeps up to
``check_concurrency`` status checks in flight, starting each as soon as it is due, so one
hanging query (or a slow provider) holds up no other recovery and no tick waits for its
slowest check. ``sweep_once`` does all three steps once (start-up, tests, operators).

Steps 1 and 2 are shared among every worker and instance on one ledger: each claims the
purchases it works on (``claim_paid_not_vended``, ``claim_due_checks``: a lease, taken with
``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so no two sweepers ask a provider about the same
purchase or vend it at once, and a purchase whose claimer died comes back when its lease lapses
(``check_lease_s``). Step 3 claims its messages the same way (``OutboxWorker``).

A sweep never raises: each step logs what failed and the next sweep tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import structlog

from gateway.errors import GatewayError
from gateway.ledger import PaymentChecks, Purchase
from gateway.sms.outbox import OutboxWorker
from gateway.values.clock import utc_now
from gateway.vending import Vending

log = structlog.get_logger()

#: A claimed payment check's lease: over a status query's deadline (30 s) with room to spare.
CHECK_LEASE_S: Final = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepReport:
    """What one sweep did."""

    claims: int = 0
    vended: int = 0
    checked: int = 0
    sent: int = 0
    failed_steps: tuple[str, ...] = ()


class Sweeper:
    """Runs ``sweep_once`` at start and every ``interval_s`` until stopped.

    Args:
        vending: the saga (it makes every state change).
        outbox: the SMS worker, or None when another task drives it.
        checks: where the purchases due for a payment check are found (default: the saga's
            ledger).
        clock: the time source (UTC, aware).
        interval_s: the pause between sweeps.
        batch: purchases handled per step and sweep.
        check_concurrency: payment status checks in flight at once.
        check_poll_s: how often ``run``'s checker looks for checks that became due while it
            has room for more (at most ``interval_s``).
        check_lease_s: how long a claimed check is this sweeper's: longer than a check takes
            (a provider's deadline), short enough that a crashed worker's checks come back soon.
    """

    def __init__(  # noqa: PLR0913 - every knob is keyword-only with a default
        self,
        *,
        vending: Vending,
        outbox: OutboxWorker | None,
        checks: PaymentChecks | None = None,
        clock: Callable[[], datetime] = utc_now,
        interval_s: float = 15.0,
        batch: int = 100,
        check_concurrency: int = 32,
        check_poll_s: float = 1.0,
        check_lease_s: float = CHECK_LEASE_S,
    ) -> None:
        self._vending = vending
        self._checks = checks if checks is not None else vending.ledger
        self._outbox = outbox
        self._clock = clock
        self._interval_s = interval_s
        self._batch = batch
        self._check_concurrency = max(1, check_concurrency)
        self._check_poll_s = max(0.01, min(check_poll_s, interval_s))
        self._check_lease = timedelta(seconds=check_lease_s)

    async def sweep_once(self) -> SweepReport:
        """One pass over paid-not-vended, due payment checks and due messages. Never raises."""
        return await self._sweep(checks=True)

    async def _check(self, purchase_id: str) -> bool:
        """One purchase's payment check; False when it failed (logged; a later check retries)."""
        try:
            await self._vending.check_payment(purchase_id)
        except GatewayError as exc:
            log.warning("payment_check_deferred", purchase_id=purchase_id, error=str(exc))
            return False
        except Exception:  # one check's bug must not end the others (nor the checker)
            log.exception("payment_check_crashed", purchase_id=purchase_id)
            return False
        return True

    async def _sweep(self, *, checks: bool) -> SweepReport:
        claims = vended = checked = sent = 0
        failed: list[str] = []
        try:
            claims = await self._vending.finish_pending_claims(limit=self._batch)
        except GatewayError as exc:
            failed.append("claims")
            log.warning("sweep_step_failed", step="claims", error=str(exc))
        try:
            vended = await self._vending.finish_paid(limit=self._batch)
        except GatewayError as exc:
            failed.append("vend")
            log.warning("sweep_step_failed", step="vend", error=str(exc))
        if checks:
            try:
                due = await self._claim_checks(self._batch)
                gate = asyncio.Semaphore(self._check_concurrency)

                async def check(purchase_id: str) -> None:
                    # Several at once: one status query hanging to its deadline must not hold
                    # up the recovery of every lost callback behind it.
                    async with gate:
                        await self._check(purchase_id)

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
        report = SweepReport(
            claims=claims, vended=vended, checked=checked, sent=sent, failed_steps=tuple(failed)
        )
        if claims or vended or checked or sent or failed:
            log.info(
                "sweep_finished",
                claims=claims,
                vended=vended,
                checked=checked,
                sent=sent,
                failed=list(failed),
            )
        return report

    async def _claim_checks(self, limit: int) -> list[Purchase]:
        """Claim up to ``limit`` due checks (no other sweeper takes them while leased)."""
        now = self._clock()
        return await self._checks.claim_due_checks(
            now, lease_until=now + self._check_lease, limit=limit
        )

    async def _due_checks(self, room: int, busy: set[str]) -> list[str]:
        """Claim up to ``room`` purchases due for a check; those not ``busy`` here.

        A purchase still ``busy`` (its check outlived its lease) is left to the check in flight.
        """
        due = await self._claim_checks(room)
        return [p.purchase_id for p in due if p.purchase_id not in busy]

    async def check_continuously(self, stop: asyncio.Event) -> None:
        """Keep up to ``check_concurrency`` due payment checks in flight until ``stop`` is set.

        A check starts as soon as it is due and there is room: the checker looks again as soon
        as one finishes while more were due than there was room for, else every
        ``check_poll_s``. A purchase is never checked twice at once here. Checks in flight when
        ``stop`` is set are finished (each is bounded by its provider's deadline). Never raises.
        """
        in_flight: dict[str, asyncio.Task[bool]] = {}
        # A check that failed (the ledger unavailable, a bug) left its purchase due: it rests
        # for ``interval_s`` instead of being retried at every poll (no hot loop in an outage).
        resting: dict[str, float] = {}
        room_made = asyncio.Event()
        loop = asyncio.get_running_loop()

        def start(purchase_id: str) -> None:
            def forget(task: asyncio.Task[bool]) -> None:
                in_flight.pop(purchase_id, None)
                if task.cancelled() or not task.result():
                    resting[purchase_id] = loop.time() + self._interval_s
                room_made.set()

            task = asyncio.create_task(self._check(purchase_id))
            in_flight[purchase_id] = task
            task.add_done_callback(forget)

        try:
            while not stop.is_set():
                room_made.clear()
                full = True
                try:
                    _wake(resting, loop.time())
                    room = self._check_concurrency - len(in_flight)
                    if room > 0:
                        fresh = await self._due_checks(room, in_flight.keys() | resting.keys())
                        full = len(fresh) >= room
                        for purchase_id in fresh[:room]:
                            start(purchase_id)
                except GatewayError as exc:
                    full = False
                    log.warning("sweep_step_failed", step="check", error=str(exc))
                except Exception:  # an outermost loop: log and go on
                    full = False
                    log.exception("payment_checker_crashed")
                await _first_of(stop, room_made if full else None, self._check_poll_s)
        finally:
            if in_flight:
                await asyncio.gather(*in_flight.values(), return_exceptions=True)

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep now, then every ``interval_s``, with the checker running, until ``stop`` is set."""
        checker = asyncio.create_task(self.check_continuously(stop), name="payment-checker")
        try:
            while not stop.is_set():
                try:
                    await self._sweep(checks=False)
                except Exception:  # the timer loop is an outermost edge: never die
                    log.exception("sweep_crashed")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval_s):
                        await stop.wait()
        finally:
            if not stop.is_set():  # cancelled: the checker goes too
                checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checker


def _wake(resting: dict[str, float], now: float) -> None:
    """Forget the rests that are over (``resting``: purchase id → loop time it rests until)."""
    for purchase_id in [p for p, until in resting.items() if until <= now]:
        del resting[purchase_id]


async def _first_of(stop: asyncio.Event, event: asyncio.Event | None, timeout_s: float) -> None:
    """Wait for ``stop``, or ``event`` (when given; no timeout then), or else ``timeout_s``."""
    if event is None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await stop.wait()
        return
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(event.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
