"""Collections whose outcome is unknown: find out what happened, never prompt twice.

A collection request to a provider without idempotency (Daraja STK) is bracketed by events:
``collection_attempted`` before the request, ``collection_not_started`` when the adapter says it
did not take effect. An "attempted" never followed by a reference means a crash left the outcome
unknown: a prompt may be on the customer's phone, so the saga never sends another
(invariant 7, docs/architecture.md). This module finds the payment instead:

- a success callback for a reference we never stored is matched to the one purchase of that
  payer and amount whose push went out with its outcome unknown (``adopt_unknown_collection``);
- once the prompt's lifetime has passed, the provider's own list of completed payments
  (``ReconcilingProvider``, Daraja Pull Transactions) is searched by payer and amount around
  the push (``reconcile_unknown_collection``): exactly one unclaimed match is the proof and is
  vended; several are an ``unknown_collection_ambiguous`` event for an operator.

The saga (``gateway/vending.py``) owns one :class:`UnknownCollections` and calls it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final

import structlog

from gateway.ledger import (
    Purchase,
    PurchaseState,
    SagaLedger,
    VendContext,
)
from gateway.payments import (
    PaymentNotice,
    PaymentProvider,
    PaymentState,
    PaymentStatus,
    ReconcilingProvider,
)

if TYPE_CHECKING:
    from gateway.vending import SagaPolicy

log = structlog.get_logger()

# Event kinds that bracket a collection request to a provider without idempotency (Daraja STK):
# "attempted" is written before the request, "not started" when the adapter says it did not
# take effect. An "attempted" never followed by a reference means the outcome is unknown.
COLLECTION_ATTEMPTED: Final = "collection_attempted"
COLLECTION_NOT_STARTED: Final = "collection_not_started"
# A push of unknown outcome whose provider lists several unclaimed payments that could be it.
UNKNOWN_COLLECTION_AMBIGUOUS: Final = "unknown_collection_ambiguous"
_PAID_STATES: Final = frozenset(
    {
        PurchaseState.PAID,
        PurchaseState.VENDED,
        PurchaseState.DELIVERED,
        PurchaseState.VEND_FAILED,
        PurchaseState.REFUND_PENDING,
    }
)


class UnknownCollections:
    """Recovery of the saga's collection requests whose outcome is unknown.

    Args:
        ledger: where the saga records every step.
        providers: the saga's payment adapters by name.
        policy: the saga's timings (deadline, reconciliation delay and window).
        clock: the saga's time source (UTC, aware).
        on_success: the saga's step that records a proven payment and vends it.
    """

    def __init__(
        self,
        *,
        ledger: SagaLedger,
        providers: Mapping[str, PaymentProvider],
        policy: SagaPolicy,
        clock: Callable[[], datetime],
        on_success: Callable[[VendContext, PaymentStatus], Awaitable[Purchase]],
    ) -> None:
        self._ledger = ledger
        self._providers = providers
        self._policy = policy
        self._clock = clock
        self._on_success = on_success

    async def collection_outcome_unknown(self, purchase_id: str) -> bool:
        """Whether a collection request went out and its outcome was never recorded."""
        return await self.unknown_collection_since(purchase_id) is not None

    async def unknown_collection_since(self, purchase_id: str) -> datetime | None:
        """When the collection request of unknown outcome went out; None if there is none."""
        marks = [
            event
            for event in await self._ledger.timeline(purchase_id)
            if event.kind in {COLLECTION_ATTEMPTED, COLLECTION_NOT_STARTED}
        ]
        if marks and marks[-1].kind == COLLECTION_ATTEMPTED:
            return marks[-1].at
        return None

    async def _receipts_of_payer(self, purchase: Purchase) -> tuple[set[str], int]:
        """The payer's other paid purchases of this amount: receipts known, and how many lack one.

        Those without a receipt on record (confirmed by STK Query) cannot be told apart from a
        payment found by payer and amount, so their count makes any match ambiguous.
        """
        known: set[str] = set()
        unexplained = 0
        oldest = purchase.created_at - timedelta(seconds=self._policy.payment_expiry_s)
        for other in await self._ledger.find_purchases(
            phone=purchase.phone, states=sorted(_PAID_STATES), limit=100
        ):
            if (
                other.purchase_id == purchase.purchase_id
                or other.provider != purchase.provider
                or other.amount != purchase.amount
            ):
                continue
            if other.provider_reference is not None:
                known.add(other.provider_reference)
            receipt = (await self._ledger.vend_context(other.purchase_id)).receipt
            if receipt is not None:
                known.add(receipt)
            elif other.created_at >= oldest:
                unexplained += 1
        return known, unexplained

    async def _unclaimed(
        self, purchase: Purchase, found: Sequence[PaymentStatus]
    ) -> tuple[dict[str, PaymentStatus], int]:
        """The found payments no other purchase claimed (by reference), and the unexplained count.

        The count is ``_receipts_of_payer``'s: the payer's paid purchases with no receipt.
        """
        if not found:
            return {}, 0
        known, unexplained = await self._receipts_of_payer(purchase)
        candidates: dict[str, PaymentStatus] = {}
        for status in found:
            if status.reference in known or (status.receipt or "") in known:
                continue
            record = await self._ledger.get_payment(status.provider, status.reference)
            if record is None or record.purchase_id in {None, purchase.purchase_id}:
                candidates[status.reference] = status
        return candidates, unexplained

    async def reconcile_unknown_collection(self, purchase: Purchase) -> Purchase | None:
        """Find, in the provider's own list, the payment of a push whose outcome is unknown.

        For a CREATED purchase without a reference whose push went out (outcome unknown) at
        least ``reconcile_after_s`` ago, on a ``ReconcilingProvider``: its completed payments
        by the purchase's payer of exactly its amount around the push, less those already tied
        to another purchase. Exactly one: recorded paid with that record as the proof, and
        vended. Several: an ``unknown_collection_ambiguous`` event for an operator. Returns
        None when this does not apply (or found nothing), else the purchase as it now stands.

        Raises:
            PaymentError: the provider could not answer.
        """
        provider = self._providers[purchase.provider]
        if (
            not isinstance(provider, ReconcilingProvider)
            or purchase.phone is None
            or purchase.state is not PurchaseState.CREATED
            or purchase.provider_reference is not None
        ):
            return None
        attempted = await self.unknown_collection_since(purchase.purchase_id)
        if attempted is None:
            return None
        if self._clock() < attempted + timedelta(seconds=self._policy.reconcile_after_s):
            return None
        before, after = self._policy.reconcile_window_s
        found = await provider.find_payments(
            purchase.phone,
            purchase.amount,
            attempted - timedelta(seconds=before),
            attempted + timedelta(seconds=after),
            account_reference=purchase.meter,  # what the push carried
        )
        candidates, unexplained = await self._unclaimed(purchase, found)
        if not candidates:
            return None
        if len(candidates) > 1 or unexplained:
            timeline = await self._ledger.timeline(purchase.purchase_id)
            if not timeline or timeline[-1].kind != UNKNOWN_COLLECTION_AMBIGUOUS:
                await self._ledger.append_event(
                    purchase.purchase_id,
                    UNKNOWN_COLLECTION_AMBIGUOUS,
                    actor="saga",
                    data={
                        "provider": provider.name,
                        "references": sorted(candidates),
                        "unexplained_payments": unexplained,
                    },
                )
            log.warning(
                UNKNOWN_COLLECTION_AMBIGUOUS,
                references=sorted(candidates),
                unexplained_payments=unexplained,
            )
            return await self._ledger.get_purchase(purchase.purchase_id)
        (status,) = candidates.values()
        log.warning("unknown_collection_reconciled", reference=status.reference)
        context = await self._ledger.vend_context(purchase.purchase_id)
        # The provider's record is the proof: the payment row, the reference and PAID are
        # written with the vend in one transaction (no window with a reference STK Query lacks).
        return await self._on_success(context, status)

    async def adopt_unknown_collection(self, notice: PaymentNotice) -> str | None:
        """Match a success for an unknown reference to our push whose reference was never stored.

        Only a purchase still CREATED, of the same provider, payer and amount, whose push went
        out with its outcome unknown, qualifies; exactly one must. The provider's status query
        for the notice's reference is still the proof before anything vends.
        """
        if (
            notice.is_customer_initiated
            or notice.payer is None
            or notice.claimed_state is not PaymentState.SUCCEEDED
        ):
            return None
        candidates = [
            purchase
            for purchase in await self._ledger.find_purchases(
                phone=notice.payer, states=[PurchaseState.CREATED], limit=20
            )
            if purchase.provider == notice.provider
            and purchase.provider_reference is None
            and (notice.amount is None or purchase.amount == notice.amount)
            and await self.collection_outcome_unknown(purchase.purchase_id)
        ]
        if len(candidates) != 1:
            if candidates:
                log.warning(
                    "unknown_collection_ambiguous",
                    reference=notice.reference,
                    candidates=[c.purchase_id for c in candidates],
                )
            return None
        purchase = candidates[0]
        await self._ledger.attach_payment(
            purchase.purchase_id,
            provider=notice.provider,
            reference=notice.reference,
            actor=f"callback:{notice.provider}",
        )
        log.warning(
            "unknown_collection_adopted",
            purchase_id=purchase.purchase_id,
            reference=notice.reference,
        )
        return purchase.purchase_id
