"""The payment port: request a collection, parse a callback, query the status (the proof).

A callback is a claim, never proof: none of the providers signs them. The saga treats a
``PaymentNotice`` only as a reason to call ``query_status``, and a purchase becomes paid only when
the provider's own status answer says success with the amount, currency and payer we expect.

```
PaymentError                 gateway.errors.GatewayError; provider, reference, retryable
  PaymentDeclined            the provider or customer declined (insufficient funds, wrong PIN …)
  PaymentCancelled           the customer cancelled the prompt
  PaymentTimedOut            the customer never answered the prompt
  AmountMismatch             paid a different amount or currency than expected
  ForgedCallback             a callback that the provider's own records contradict, or malformed
  ProviderUnavailable        network error, timeout, 5xx, throttling: retryable=True
```
Adapters translate every driver/HTTP error into this tree; nothing else escapes them.

Ports: ``PaymentProvider`` (every adapter), ``PaybillProvider`` (also takes customer-initiated
payments: Daraja C2B), ``PaymentEvents`` (the saga's side). Helpers the adapters share:
``call_provider`` (one HTTP call under ``asyncio.timeout``, transport errors → this tree, with
``retryable`` decided by whether the call is idempotent), ``TokenCache`` (OAuth bearer tokens,
refreshed before expiry) and ``remember`` (bounded memory). ``CustomerPaymentRefusal`` names the
reasons ``validate_customer_payment`` may give so adapters can answer the provider's own codes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import NewType, Protocol, TypeVar, runtime_checkable

import aiohttp

from gateway.errors import GatewayError
from gateway.money import Money
from gateway.phone import Msisdn

_K = TypeVar("_K")
_V = TypeVar("_V")

ProviderReference = NewType("ProviderReference", str)
"""The provider's handle for one collection: Daraja ``CheckoutRequestID`` (STK) or ``TransID``
(C2B), MoMo ``X-Reference-Id``, Airtel ``transaction.id``."""


class PaymentState(StrEnum):
    """Where a collection stands according to the provider."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # declined: insufficient funds, wrong PIN, limits …
    CANCELLED = "cancelled"  # the customer cancelled the prompt
    TIMED_OUT = "timed_out"  # the customer never answered; the provider gave up

    @property
    def is_final(self) -> bool:
        """Whether the provider will not change its answer any more."""
        return self is not PaymentState.PENDING


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectionRequest:
    """Ask ``payer`` to pay ``amount`` for ``purchase_id``.

    ``purchase_id`` is our idempotency handle: adapters derive anything the provider needs to make
    a retried request harmless from it (MoMo's ``X-Reference-Id`` is a UUIDv5 of it).
    """

    purchase_id: str
    payer: Msisdn
    amount: Money
    account_reference: str  # shown to the customer; the meter number (Daraja: at most 12 chars)
    description: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectionStarted:
    """The provider accepted the request and will prompt the customer."""

    provider: str
    reference: ProviderReference
    customer_message: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PaymentNotice:
    """What a callback claims. Never proof: confirm with ``query_status`` before vending.

    ``account_reference`` is set for customer-initiated payments (Daraja C2B ``BillRefNumber``:
    the meter number the customer typed); ``raw`` is the body exactly as received.
    """

    provider: str
    reference: ProviderReference
    claimed_state: PaymentState
    amount: Money | None = None
    payer: Msisdn | None = None
    receipt: str | None = None  # the provider's transaction/receipt number, shown to customers
    account_reference: str | None = None
    is_customer_initiated: bool = False  # C2B paybill: no purchase exists yet
    raw: bytes = field(default=b"", repr=False)

    @property
    def payload_hash(self) -> str:
        """SHA-256 of the raw body: the same reference with another payload is a security event."""
        return hashlib.sha256(self.raw).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class PaymentStatus:
    """The provider's own answer about a collection: the only proof a purchase may be paid on."""

    provider: str
    reference: ProviderReference
    state: PaymentState
    amount: Money | None = None
    payer: Msisdn | None = None
    receipt: str | None = None
    reason: str | None = None  # the provider's words for a failure, for operators
    # What kind of payment the provider's record says it is: True a payment the payer started
    # (paybill, C2B), False one our prompt started (STK push); None when the record does not say.
    customer_initiated: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CallbackAck:
    """The HTTP answer a provider expects for a callback, whatever we made of it."""

    status: int = 200
    content_type: str = "application/json"
    body: bytes = b""


class PaymentProvider(Protocol):
    """One mobile-money operator's collections API (an adapter per provider).

    Attributes:
        name: the provider's name in purchases and callback routes.
        idempotent_requests: whether a collection request may be sent again while its outcome
            is unknown without charging twice (the provider dedupes it by our reference: MoMo,
            Airtel). False for Daraja STK: the saga then never repeats an unknown request
            (invariant 7).
    """

    name: str
    idempotent_requests: bool

    async def request_collection(self, request: CollectionRequest) -> CollectionStarted:
        """Ask the provider to prompt the payer. Safe to retry with the same request.

        Raises:
            PaymentError: ``ProviderUnavailable`` (retryable) or a final refusal.
        """
        ...

    def parse_callback(self, body: bytes, headers: Mapping[str, str]) -> PaymentNotice:
        """Read a callback body into a claim. Pure: no I/O.

        Raises:
            ForgedCallback: the body is not a well-formed callback of this provider.
        """
        ...

    async def query_status(self, reference: ProviderReference) -> PaymentStatus:
        """Ask the provider what happened to ``reference``: the proof. Safe to retry.

        Raises:
            ProviderUnavailable: the provider could not answer now (retryable).
        """
        ...

    def acknowledgement(self) -> CallbackAck:
        """The answer the provider expects for any callback, accepted or not."""
        ...


class StatusQueryStore(Protocol):
    """Where asynchronous status queries and their results are kept (the ledger implements it).

    With it, a result posted to any instance reaches whichever instance waits, and is accepted
    only against the query the provider acknowledged, once.
    """

    async def record_status_query(
        self, *, provider: str, conversation_id: str, originator_id: str, transaction_id: str
    ) -> str | None:
        """Keep a query the provider acknowledged with these ids. Idempotent.

        A result that came first (``"held"`` by ``answer_status_query``) is judged now: its
        outcome (``"accepted"``, ``"unmatched"``, ``"contradicted"``) is returned, else None.
        """
        ...

    async def answer_status_query(
        self,
        *,
        provider: str,
        conversation_id: str,
        originator_id: str,
        transaction_id: str,
        result: bytes,
    ) -> str:
        """Store ``result`` for the query it names: ``"accepted"`` (stored, once).

        ``"contradicted"`` when the ids are a query's but the transaction is another;
        ``"held"`` when no query has these ids yet (kept, capped, for the query's recording to
        judge); ``"unmatched"`` otherwise (nothing stored, as for ``"contradicted"``).
        """
        ...

    async def status_query_result(self, conversation_id: str) -> bytes | None:
        """The stored result of a query, None while it has none."""
        ...

    async def held_status_outcome(self, conversation_id: str) -> str | None:
        """What a held result became once its query was recorded; None until then."""
        ...


class StatusResultOutcome(StrEnum):
    """What became of an asynchronous status result (Daraja Transaction Status ``Result``)."""

    DELIVERED = "delivered"  # it answers an outstanding request of ours: handed to its query
    HELD = "held"  # it may answer a request whose acknowledgement is still on its way: kept
    UNMATCHED = "unmatched"  # no outstanding request of ours has its ids (late, or forged)
    CONTRADICTED = "contradicted"  # its ids are our request's, its transaction is not


@runtime_checkable
class PaybillProvider(PaymentProvider, Protocol):
    """A provider customers can also pay on their own, naming an account (Daraja C2B paybill).

    Such a provider asks us to validate a payment before money moves, then confirms it; and its
    reconciliation answers (Daraja Transaction Status) arrive asynchronously, by callback.
    """

    def parse_customer_validation(self, body: bytes) -> PaymentNotice:
        """Read a validation request: a claim with ``claimed_state`` PENDING (money not moved).

        Raises:
            ForgedCallback: not a well-formed validation request for us.
        """
        ...

    def customer_validation_answer(self, refusal: str | None) -> CallbackAck:
        """The provider's accept (``None``) or reject answer for ``refusal``."""
        ...

    def customer_confirmation_answer(self) -> CallbackAck:
        """The provider's expected answer to a confirmation."""
        ...

    async def deliver_status_result(self, body: bytes) -> StatusResultOutcome:
        """Hand an asynchronous status result to the ``query_status`` call that asked for it.

        A result is bound to the exact request it answers (the provider's ids for our request,
        one use only). Returns what became of it: anything but ``DELIVERED`` or ``HELD`` is a
        security event for the route. Raises ``ForgedCallback`` for a malformed body.
        """
        ...


@runtime_checkable
class ReceiptVerifier(PaymentProvider, Protocol):
    """A provider whose status answer may lack the receipt, but which can look one up.

    Daraja's STK Query carries no receipt: the one an STK callback claims is a claim, and only
    the provider's own record of it (Transaction Status) may put it on a token.
    """

    async def verify_receipt(self, receipt: str) -> PaymentStatus:
        """The provider's own record of the payment ``receipt`` names (FAILED if it has none).

        Raises:
            ProviderUnavailable: the provider could not answer now, or is not set up for it.
        """
        ...


@runtime_checkable
class ReconcilingProvider(PaymentProvider, Protocol):
    """A provider that can list its completed payments by payer, amount and time (Daraja Pull).

    The saga uses it for a push whose outcome a crash left unknown and whose callback never came:
    no reference of ours ties the money to the purchase, so the provider's own list is the proof.
    """

    async def find_payments(
        self,
        payer: Msisdn,
        amount: Money,
        since: datetime,
        until: datetime,
        *,
        account_reference: str | None = None,
    ) -> list[PaymentStatus]:
        """Completed payments by ``payer`` of exactly ``amount`` in ``[since, until]`` (aware).

        With ``account_reference`` (the collection request's), only payments made for it.

        Each is ``SUCCEEDED`` with its reference (the provider's receipt), amount and payer, as
        the provider's own record states them.

        Raises:
            ProviderUnavailable: the provider could not answer now (retryable) or is not set up.
        """
        ...


class PaymentEvents(Protocol):
    """What the callback routes hand their claims to; implemented by the purchase saga."""

    async def on_payment_notice(
        self,
        notice: PaymentNotice,
        *,
        background: Callable[[Callable[[], Awaitable[None]]], None] | None = None,
    ) -> None:
        """Record a claim and confirm it with the provider before anything is vended.

        Never raises for a bad, forged, unknown or duplicated notice: those are logged as security
        events and change nothing. Raises only when the notice could not be recorded at all
        (``LedgerError``), so the route can answer 5xx and the provider retries.

        With ``background``, a customer-initiated claim's confirmation (after it is recorded,
        durably) is handed to it to run after the route has answered.
        """
        ...

    async def validate_customer_payment(
        self,
        provider: str,
        account_reference: str,
        amount: Money,
        payer: Msisdn | None,
        *,
        reference: str | None = None,
    ) -> str | None:
        """Pre-check a customer-initiated payment (Daraja C2B validation) before money moves.

        Returns ``None`` to accept, or the reason to refuse (unknown meter, amount out of range).
        With ``reference`` (the payment's ``TransID``) what was validated is recorded, so that
        a confirmation of that payment naming another account is refused.
        """
        ...


class PaymentError(GatewayError):
    """A collection failed or could not be confirmed.

    Attributes:
        provider: the adapter's name (``daraja``, ``momo``, ``airtel``).
        reference: the provider reference concerned, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        reference: str | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message, retryable=retryable)
        self.provider = provider
        self.reference = reference

    def __str__(self) -> str:
        where = f"{self.provider}:{self.reference}" if self.reference else self.provider
        return f"[{where}] {self.args[0]}"


class PaymentDeclined(PaymentError):
    """The provider or the customer's account declined the payment."""


class PaymentCancelled(PaymentError):
    """The customer cancelled the payment prompt."""


class PaymentTimedOut(PaymentError):
    """The customer did not answer the prompt in time."""


class AmountMismatch(PaymentError):
    """The amount or currency paid is not the one expected."""


class ForgedCallback(PaymentError):
    """A callback that is malformed or that the provider's own records contradict."""


class ProviderUnavailable(PaymentError):
    """The provider could not be reached or answered with an error; try again later."""

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        reference: str | None = None,
        retryable: bool = True,
    ) -> None:
        super().__init__(message, provider=provider, reference=reference, retryable=retryable)


class CustomerPaymentRefusal(StrEnum):
    """Why a customer-initiated payment is refused before money moves (Daraja C2B validation).

    ``PaymentEvents.validate_customer_payment`` may return one of these (a ``str``) so the adapter
    can answer the provider's own reject code; any other text is answered as "other".
    """

    UNKNOWN_ACCOUNT = "unknown_account"  # no such meter
    AMOUNT_OUT_OF_RANGE = "amount_out_of_range"
    INVALID_PAYER = "invalid_payer"
    OTHER = "other"


def remember(memory: dict[_K, _V], key: _K, value: _V, *, limit: int = 10_000) -> None:
    """Store ``key → value`` in an adapter's bounded memory; the oldest go beyond ``limit``.

    Adapters remember what they asked for (amounts, started pushes) to answer retries and fill
    gaps in providers' answers; a long-running process must not grow without bound.
    """
    memory.pop(key, None)
    memory[key] = value
    while len(memory) > limit:
        del memory[next(iter(memory))]


class TokenCache:
    """One OAuth bearer token, fetched on first use and refreshed shortly before it expires.

    Concurrent callers share one fetch. ``fetch`` returns the token and its lifetime in seconds;
    the token is refreshed ``min(margin_s, lifetime / 2)`` seconds before the lifetime ends, by
    ``clock`` (monotonic seconds, injectable for tests).
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[tuple[str, float]]],
        *,
        clock: Callable[[], float] = time.monotonic,
        margin_s: float = 60.0,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._margin_s = margin_s
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> str:
        """A token valid now; fetches one when none is cached or it is about to expire.

        Raises:
            PaymentError: whatever ``fetch`` raises (adapters raise their own error tree).
        """
        async with self._lock:
            if self._token is None or self._clock() >= self._refresh_at:
                token, lifetime_s = await self._fetch()
                if not math.isfinite(lifetime_s) or lifetime_s < 0:
                    lifetime_s = 0.0  # nonsense from the provider: use it once, then refetch
                self._token = token
                self._refresh_at = self._clock() + lifetime_s - min(self._margin_s, lifetime_s / 2)
            return self._token

    def invalidate(self) -> None:
        """Forget the cached token (the provider said it is no longer valid)."""
        self._token = None


@dataclass(frozen=True, slots=True)
class ProviderReply:
    """A provider's HTTP answer, read in full: status code, headers and body bytes."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    def json_object(self) -> dict[str, object] | None:
        """The body as a JSON object, or ``None`` when it is empty or not a JSON object."""
        try:
            value = json.loads(self.body) if self.body else None
        except (ValueError, RecursionError):
            return None
        return value if isinstance(value, dict) else None


async def call_provider(  # noqa: PLR0913 - one HTTP call, spelled out
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    provider: str,
    timeout_s: float,
    idempotent: bool,
    headers: Mapping[str, str] | None = None,
    json_body: object = None,
    data: bytes | None = None,
    reference: str | None = None,
) -> ProviderReply:
    """Send one request to a provider under ``asyncio.timeout`` and read the whole answer.

    Transport failures become ``ProviderUnavailable``. A connection that never opened is always
    retryable. A timeout or a broken connection after the request was sent is retryable only when
    the call is ``idempotent`` (a retry cannot charge twice); otherwise the outcome is unknown and
    the error says so with ``retryable=False``. HTTP error statuses are returned, not raised: the
    adapter knows what the provider means by them.
    """
    try:
        async with asyncio.timeout(timeout_s):
            async with session.request(
                method, url, headers=headers, json=json_body, data=data
            ) as response:
                body = await response.read()
                return ProviderReply(response.status, body, dict(response.headers))
    except aiohttp.ClientConnectorError as exc:
        raise ProviderUnavailable(
            f"cannot connect to {provider}: {exc.os_error}", provider=provider, reference=reference
        ) from exc
    except (TimeoutError, aiohttp.ClientError) as exc:
        what = "timed out" if isinstance(exc, TimeoutError) else f"failed: {exc!r}"
        if idempotent:
            message = f"{method} {url} {what}"
        else:
            message = f"{method} {url} {what} after sending: outcome unknown, not retrying"
        raise ProviderUnavailable(
            message, provider=provider, reference=reference, retryable=idempotent
        ) from exc
