"""Safaricom M-Pesa Daraja: STK push (M-Pesa Express), C2B paybill, STK query, Transaction Status.

Wire formats are Daraja 3.0's (``docs/protocols.md`` §2). Daraja's words stay in this module:
``CheckoutRequestID`` (an STK push, our ``ProviderReference`` for it), ``TransID`` (a C2B payment's
M-Pesa receipt, the reference of a customer-initiated payment), ``BillRefNumber`` (the account
number the customer typed on the SIM menu: the meter number).

Confirmation (``query_status``):

- an STK push is confirmed with STK Query. Its answer carries a ``ResultCode`` but neither amount
  nor receipt; Daraja does not let the payer change the amount of a push, so a success means the
  amount requested was paid. ``PaymentStatus.amount`` is that requested amount when this process
  sent the push, ``None`` otherwise (the saga compares with the purchase's own amount).
- a C2B payment (reference = ``TransID``) is confirmed with Transaction Status, whose result comes
  back **asynchronously** to ``status_result_url``. ``query_status`` sends the query and waits (up
  to ``status_result_wait_s``) for the callback route to hand the result to
  ``deliver_status_result``; a result that does not come in time is ``ProviderUnavailable``
  (retryable), so the sweeper simply asks again.

  The result route knows the callback secret, and so may an attacker: a result is bound to the
  exact request that asked for it. Daraja's acknowledgement of our query names the request
  (``ConversationID``, ``OriginatorConversationID``); a result is accepted only when both ids
  are those of an outstanding query of this process, once, and its ``TransactionID`` (and
  ``ReceiptNo``) is the transaction that query asked about. Anything else is ``UNMATCHED`` or
  ``CONTRADICTED`` (security events for the route), never proof. With a ``status_store`` (the
  ledger) the query and its result are kept there: a result posted to any instance is accepted
  against the stored query, once, and the waiting instance reads it (a result reaching the
  waiting instance itself wakes it at once; otherwise it looks every ``status_poll_s``).

  Daraja posts the result within moments of acknowledging the query, often before the query is
  recorded (we learn its ids only from the acknowledgement). Such a result is held in the store
  (capped in count and size) and judged when the query is recorded; both writes take one named
  lock, so neither misses the other, whichever instance receives the result. The result's route
  waits up to ``status_hold_s`` for that judgement to answer ``DELIVERED``, ``UNMATCHED`` or
  ``CONTRADICTED``; past it the result stays held for the query but the route says
  ``UNMATCHED`` (forged results with made-up ids end there).

Retrying an STK push: Daraja has no idempotency key, so a push whose outcome is unknown (timeout
after sending) is reported ``retryable=False``: a blind retry could prompt, and charge, twice.
A push this process already started for the same purchase is answered from memory.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Final

import aiohttp
import structlog

from gateway.money import Money
from gateway.payments.base import (
    CallbackAck,
    CollectionRequest,
    CollectionStarted,
    CustomerPaymentRefusal,
    ForgedCallback,
    PaymentDeclined,
    PaymentError,
    PaymentNotice,
    PaymentState,
    PaymentStatus,
    ProviderReference,
    ProviderReply,
    ProviderUnavailable,
    StatusQueryStore,
    StatusResultOutcome,
    TokenCache,
    call_provider,
    remember,
)
from gateway.phone import InvalidPhoneNumber, Msisdn, international_digits, parse_msisdn

log = structlog.get_logger()

EAT: Final = timezone(timedelta(hours=3), "EAT")
"""Daraja timestamps are Kenyan time (UTC+3)."""

MAX_ACCOUNT_REFERENCE: Final = 12  # longer → ResultCode 1025 (the prompt exceeds 182 characters)
MAX_TRANSACTION_DESC: Final = 13
MIN_AMOUNT_KES: Final = 1
MAX_AMOUNT_KES: Final = 250_000

STK_PREFIX: Final = "ws_CO_"
"""Every ``CheckoutRequestID`` starts so; anything else we are asked about is a C2B ``TransID``."""

# STK ResultCode → our state (docs/protocols.md §2.2, the official table); unlisted non-zero
# is FAILED.
_RESULT_STATES: Final[Mapping[int, PaymentState]] = {
    0: PaymentState.SUCCEEDED,
    1032: PaymentState.CANCELLED,  # cancelled by user
    1037: PaymentState.TIMED_OUT,  # DS timeout, user cannot be reached
    1019: PaymentState.TIMED_OUT,  # transaction expired
}

# Error codes (HTTP error bodies) worth retrying later: throttling, quota, internal errors.
_RETRYABLE_ERRORS: Final = frozenset({"500.003.02", "500.003.03", "500.003.1001", "503.001.01"})
_INVALID_TOKEN: Final = "404.001.03"  # noqa: S105 - an error code, not a secret

# C2B validation reject codes (docs/protocols.md §2.4).
_REJECT_CODES: Final[Mapping[str, str]] = {
    CustomerPaymentRefusal.INVALID_PAYER: "C2B00011",
    CustomerPaymentRefusal.UNKNOWN_ACCOUNT: "C2B00012",
    CustomerPaymentRefusal.AMOUNT_OUT_OF_RANGE: "C2B00013",
}
_REJECT_OTHER: Final = "C2B00016"

# Transaction Status result codes that mean our initiator setup is wrong, not that the payment is.
_INITIATOR_ERRORS: Final = frozenset({2001, 8006})

_RECEIPT: Final = re.compile(r"[A-Z0-9]{8,12}")
_PULL_DATE: Final = "%Y-%m-%d %H:%M:%S"  # Pull Transactions' StartDate/EndDate, in EAT
_PULL_PAGE: Final = 1000  # rows per Pull answer; a full page means ask again from OffSetValue
_MINUTE: Final = timedelta(minutes=1)
# Pull lookups share one pull per minute window: a minute pulled this long after its end is final
# (kept); one that was still open is pulled again when a lookup needs it this long after.
_PULL_SETTLE: Final = timedelta(minutes=1)
_PULL_REFRESH_S: Final = 60.0
_PULL_KEEP_MINUTES: Final = 24 * 60  # pulled minutes kept (the oldest dropped first)


_HELD_RESULTS: Final = 64  # results kept while a query's acknowledgement is on its way
# What the status store's refusals mean for the result's route.
_STORE_ANSWERS: Final[Mapping[str, StatusResultOutcome]] = {
    "held": StatusResultOutcome.HELD,
    "contradicted": StatusResultOutcome.CONTRADICTED,
}


@dataclass(frozen=True, slots=True)
class _StatusRequest:
    """One Transaction Status query of ours that Daraja acknowledged, waiting for its result."""

    transaction_id: str
    originator: str  # OriginatorConversationID of Daraja's acknowledgement
    result: asyncio.Future[PaymentStatus]


@dataclass(frozen=True, slots=True)
class _ParsedResult:
    """A Transaction Status ``Result``: the request's ids, the transaction, what it says."""

    conversation: str
    originator: str
    transaction_id: str
    receipt: str | None
    outcome: PaymentStatus | PaymentError
    raw: bytes = field(repr=False, default=b"")


_PULL_REGISTERED: Final = "1000"  # Pull Transactions register: "Shortcode Registered Successfully"
_PULL_ALREADY_REGISTERED: Final = "1001"  # the shortcode was registered before


@dataclass(frozen=True, slots=True, kw_only=True)
class PullRegistration:
    """Daraja's answer to a Pull Transactions registration."""

    shortcode: str
    status: str  # ResponseStatus: "1000" registered, "1001" already registered
    description: str
    reference: str  # ResponseRefID
    already_registered: bool


@dataclass(frozen=True, slots=True)
class _PulledMinute:
    """The shortcode's completed payments of one minute as Pull listed them, and when."""

    rows: tuple[tuple[datetime, PaymentStatus, str], ...]  # (when, payment, billreference)
    pulled_at: float  # monotonic seconds
    final: bool  # pulled after the minute settled: never pulled again


def _minute_of(moment: datetime) -> datetime:
    """The start of ``moment``'s minute, in UTC."""
    return moment.astimezone(UTC).replace(second=0, microsecond=0)


def stk_password(shortcode: str, passkey: str, timestamp: str) -> str:
    """``base64(shortcode + passkey + timestamp)``: Daraja's ``Password`` for STK push and query."""
    return base64.b64encode(f"{shortcode}{passkey}{timestamp}".encode()).decode("ascii")


def stk_timestamp(moment: datetime) -> str:
    """``YYYYMMDDHHmmss`` in Kenyan time, as ``Timestamp`` must be."""
    return moment.astimezone(EAT).strftime("%Y%m%d%H%M%S")


def fit_account_reference(text: str) -> str:
    """The account reference Daraja will show: alphanumerics only, the last 12 kept.

    Meter numbers are 11 or 13 digits; keeping the tail keeps the digits people compare.
    """
    cleaned = "".join(ch for ch in text if ch.isascii() and ch.isalnum())
    return cleaned[-MAX_ACCOUNT_REFERENCE:] or "PAYMENT"


def _forged(message: str, reference: str | None = None) -> ForgedCallback:
    return ForgedCallback(message, provider="daraja", reference=reference)


def _json_object(body: bytes) -> dict[str, object]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise _forged(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise _forged(f"expected a JSON object, got {type(value).__name__}")
    return value


def _text(obj: Mapping[str, object], key: str, *, required: bool = True) -> str:
    value = obj.get(key)
    if isinstance(value, str) and (value or not required):
        return value
    if value is None and not required:
        return ""
    raise _forged(f"{key} must be a non-empty string, got {type(value).__name__}")


def _integer(value: object, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _forged(f"{key} must be a JSON integer, got {type(value).__name__}")


def _kes(value: object, key: str) -> Money:
    """A positive KES amount from a JSON number or a numeric string."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _forged(f"{key} must be a number, got {type(value).__name__}")
    try:
        amount = Money.of(Decimal(str(value)), "KES")
    except (ValueError, ArithmeticError) as exc:
        raise _forged(f"{key} is not a KES amount: {value!r}") from exc
    if amount.amount_minor <= 0:
        raise _forged(f"{key} must be positive, got {value!r}")
    return amount


def _payer(text: str) -> Msisdn | None:
    """The payer when Daraja shows it in clear; C2B masks (``25470****149``) or hashes it."""
    if not text.isdigit():
        return None
    try:
        return parse_msisdn(text, "KE")
    except InvalidPhoneNumber:
        return None


def _json_ack(payload: Mapping[str, object]) -> CallbackAck:
    return CallbackAck(body=json.dumps(payload, separators=(",", ":")).encode())


class DarajaProvider:
    """The ``PaymentProvider`` for M-Pesa Daraja (STK push; C2B paybill; reconciliation).

    Args:
        session: the HTTP client; the caller owns its lifetime.
        base_url: ``https://api.safaricom.co.ke``, the sandbox, or a simulator.
        consumer_key, consumer_secret: the Daraja app's OAuth credentials.
        shortcode: the paybill (``BusinessShortCode`` and, for paybills, ``PartyB``).
        passkey: the Lipa na M-Pesa Online passkey (for ``Password``).
        callback_url: where STK callbacks go (``…/payments/daraja/<secret>/stk``).
        transaction_type: ``CustomerPayBillOnline`` or ``CustomerBuyGoodsOnline``.
        party_b: the till number for buy-goods; defaults to ``shortcode``.
        initiator, security_credential: the API operator and its RSA-encrypted password, for
            Transaction Status (C2B confirmation). Without them C2B payments cannot be confirmed.
        status_result_url, status_timeout_url: where Transaction Status results and queue
            timeouts go (``…/payments/daraja/<secret>/status/result`` and ``…/status/timeout``).
        status_result_wait_s: how long ``query_status`` waits for an asynchronous result.
        status_store: where our acknowledged Transaction Status queries and their results are
            kept (the ledger), so that a result posted to any instance reaches the one waiting;
            without it, results bind to this process's queries only. Assignable after
            construction (the composition root opens the ledger).
        status_poll_s: how often a waiting query looks in ``status_store`` for its result.
        status_hold_s: how long the result route waits for a held result's query to be recorded.
        timeout_s: the deadline of every HTTP call.
        clock: monotonic seconds, for token expiry. now: the wall clock, for ``Timestamp``.
    """

    #: Whether sending the same collection request again is harmless (the saga never sends a second
    #: one when it is not). Here: STK push has no idempotency key: a repeat is a second prompt and
    #: may charge twice.
    idempotent_requests = False

    def __init__(  # noqa: PLR0913 - Daraja needs this many settings; all keyword-only
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        consumer_key: str,
        consumer_secret: str,
        shortcode: str,
        passkey: str,
        callback_url: str,
        transaction_type: str = "CustomerPayBillOnline",
        party_b: str | None = None,
        initiator: str | None = None,
        security_credential: str | None = None,
        status_result_url: str | None = None,
        status_timeout_url: str | None = None,
        status_result_wait_s: float = 30.0,
        status_store: StatusQueryStore | None = None,
        status_poll_s: float = 0.25,
        status_hold_s: float = 1.0,
        timeout_s: float = 10.0,
        name: str = "daraja",
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.name = name
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._basic = base64.b64encode(f"{consumer_key}:{consumer_secret}".encode()).decode()
        self._shortcode = shortcode
        self._passkey = passkey
        self._callback_url = callback_url
        self._transaction_type = transaction_type
        self._party_b = party_b or shortcode
        self._initiator = initiator
        self._security_credential = security_credential
        self._status_result_url = status_result_url
        self._status_timeout_url = status_timeout_url
        self._status_result_wait_s = status_result_wait_s
        self.status_store = status_store
        self._status_poll_s = status_poll_s
        self._status_hold_s = status_hold_s
        self._timeout_s = timeout_s
        self._now = now or (lambda: datetime.now(EAT))
        self._clock = clock
        self._tokens = TokenCache(self._fetch_token, clock=clock)
        self._pull_cache: dict[datetime, _PulledMinute] = {}  # UTC minute → payments; oldest first
        self._pull_lock = asyncio.Lock()
        self._started: dict[str, CollectionStarted] = {}  # purchase id → push already accepted
        self._requested: dict[str, Money] = {}  # CheckoutRequestID → amount we asked for
        # ConversationID → our acknowledged Transaction Status query waiting for its result
        self._status_requests: dict[str, _StatusRequest] = {}
        self._status_unacknowledged = 0  # queries sent whose acknowledgement is not read yet
        self._held_results: dict[str, _ParsedResult] = {}  # ConversationID → result, meanwhile

    # -- OAuth -------------------------------------------------------------------------------

    async def _fetch_token(self) -> tuple[str, float]:
        reply = await call_provider(
            self._session,
            "GET",
            f"{self._base_url}/oauth/v1/generate?grant_type=client_credentials",
            provider=self.name,
            timeout_s=self._timeout_s,
            idempotent=True,
            headers={"Authorization": f"Basic {self._basic}"},
        )
        body = reply.json_object() or {}
        token = body.get("access_token")
        if reply.status != 200 or not isinstance(token, str) or not token:
            raise self._error(reply, None, what="OAuth")
        try:
            lifetime_s = float(str(body.get("expires_in", "3599")))
        except ValueError:
            lifetime_s = 3599.0
        return token, lifetime_s

    async def _call(
        self, path: str, payload: Mapping[str, object], *, idempotent: bool, reference: str | None
    ) -> ProviderReply:
        """POST JSON with the bearer token; on ``404.001.03`` refresh the token, try once more."""
        reply: ProviderReply | None = None
        for _ in range(2):
            token = await self._tokens.get()
            reply = await call_provider(
                self._session,
                "POST",
                f"{self._base_url}{path}",
                provider=self.name,
                timeout_s=self._timeout_s,
                idempotent=idempotent,
                headers={"Authorization": f"Bearer {token}"},
                json_body=payload,
                reference=reference,
            )
            if (reply.json_object() or {}).get("errorCode") != _INVALID_TOKEN:
                return reply
            self._tokens.invalidate()
        assert reply is not None  # noqa: S101 - the loop ran at least once
        return reply

    def _error(self, reply: ProviderReply, reference: str | None, *, what: str) -> PaymentError:
        """Daraja's error body (``errorCode``/``errorMessage``) as our error tree."""
        body = reply.json_object() or {}
        code = str(body.get("errorCode", ""))
        message = str(body.get("errorMessage", reply.body[:200].decode(errors="replace")))
        text = f"{what}: HTTP {reply.status} {code} {message}".strip()
        retryable = (
            code in _RETRYABLE_ERRORS
            # a push is already open on the payer's phone: try again in a minute or so
            or "lock subscriber" in message.lower()
            # 500.001.1001 is also "wrong credentials" / "merchant does not exist": final
            or (reply.status >= 500 and not code.startswith("500.001"))
            or reply.status == 429
        )
        if retryable:
            return ProviderUnavailable(text, provider=self.name, reference=reference)
        return PaymentDeclined(text, provider=self.name, reference=reference)

    def _password(self) -> tuple[str, str]:
        timestamp = stk_timestamp(self._now())
        return stk_password(self._shortcode, self._passkey, timestamp), timestamp

    # -- STK push ------------------------------------------------------------------------------

    async def request_collection(self, request: CollectionRequest) -> CollectionStarted:
        """Send an STK push asking ``request.payer`` to pay ``request.amount`` (whole KES).

        A push already accepted for the same purchase (in this process) is not sent again.

        Raises:
            PaymentDeclined: Daraja refused the request (bad field, credentials), or the amount is
                not whole KES between 1 and 250,000.
            ProviderUnavailable: Daraja is busy or unreachable (retryable), or the push timed out
                after it was sent (``retryable=False``: it may have reached the phone).
        """
        if request.purchase_id in self._started:
            return self._started[request.purchase_id]
        amount = request.amount
        if amount.currency != "KES" or amount.amount_minor % 100:
            raise PaymentDeclined(
                f"M-Pesa takes whole KES, got {amount}", provider=self.name, reference=None
            )
        shillings = amount.amount_minor // 100
        if not MIN_AMOUNT_KES <= shillings <= MAX_AMOUNT_KES:
            raise PaymentDeclined(
                f"M-Pesa takes KES 1 to 250,000 per payment, got {amount}", provider=self.name
            )
        password, timestamp = self._password()
        phone = international_digits(request.payer)
        payload = {
            "BusinessShortCode": self._shortcode,
            "Password": password,
            "Timestamp": timestamp,
            "TransactionType": self._transaction_type,
            "Amount": shillings,
            "PartyA": phone,
            "PartyB": self._party_b,
            "PhoneNumber": phone,
            "CallBackURL": self._callback_url,
            "AccountReference": fit_account_reference(request.account_reference),
            "TransactionDesc": request.description[:MAX_TRANSACTION_DESC] or "Payment",
        }
        reply = await self._call(
            "/mpesa/stkpush/v1/processrequest", payload, idempotent=False, reference=None
        )
        body = reply.json_object() or {}
        checkout = body.get("CheckoutRequestID")
        if reply.status != 200 or str(body.get("ResponseCode")) != "0" or not checkout:
            raise self._error(reply, None, what="STK push refused")
        reference = ProviderReference(str(checkout))
        started = CollectionStarted(
            provider=self.name,
            reference=reference,
            customer_message=str(body.get("CustomerMessage", "")) or None,
        )
        remember(self._started, request.purchase_id, started)
        remember(self._requested, reference, amount)
        log.info("stk_push_sent", provider=self.name, reference=reference, amount=str(amount))
        return started

    # -- confirmation --------------------------------------------------------------------------

    async def query_status(self, reference: ProviderReference) -> PaymentStatus:
        """Ask Daraja about an STK push (STK Query) or a C2B receipt (Transaction Status).

        Returns ``PENDING`` while the customer has not answered the prompt.

        Raises:
            ProviderUnavailable: Daraja did not answer usefully now (retryable), or Transaction
                Status is not configured (``retryable=False``).
            ForgedCallback: Daraja does not know ``reference``.
        """
        if reference.startswith(STK_PREFIX):
            return await self._stk_query(reference)
        return await self._transaction_status(reference)

    async def _stk_query(self, reference: ProviderReference) -> PaymentStatus:
        password, timestamp = self._password()
        payload = {
            "BusinessShortCode": self._shortcode,
            "Password": password,
            "Timestamp": timestamp,
            "CheckoutRequestID": reference,
        }
        reply = await self._call(
            "/mpesa/stkpushquery/v1/query", payload, idempotent=True, reference=reference
        )
        body = reply.json_object() or {}
        message = str(body.get("errorMessage", ""))
        if "being processed" in message.lower():
            return PaymentStatus(
                provider=self.name, reference=reference, state=PaymentState.PENDING
            )
        result = body.get("ResultCode")
        if reply.status != 200 or result is None:
            error = self._error(reply, reference, what="STK query")
            if not isinstance(error, PaymentDeclined):
                raise error
            if "checkoutrequestid" in message.lower() or body.get("errorCode") == "404.001.01":
                raise _forged(f"Daraja does not know this push: {error.args[0]}", reference)
            # Wrong credentials or shortcode: our configuration, not the payment, is at fault.
            raise ProviderUnavailable(
                error.args[0], provider=self.name, reference=reference, retryable=False
            ) from error
        try:
            code = int(str(result))
        except ValueError as exc:
            raise ProviderUnavailable(
                f"STK query answered ResultCode {result!r}", provider=self.name, reference=reference
            ) from exc
        state = _RESULT_STATES.get(code, PaymentState.FAILED)
        return PaymentStatus(
            provider=self.name,
            reference=reference,
            state=state,
            amount=self._requested.get(reference) if state is PaymentState.SUCCEEDED else None,
            reason=None if code == 0 else f"{code} {body.get('ResultDesc', '')}".strip(),
        )

    async def verify_receipt(self, receipt: str) -> PaymentStatus:
        """Daraja's own record of an M-Pesa receipt (Transaction Status): an STK callback's claim.

        A string that is not a receipt at all is FAILED without asking.

        Raises:
            ProviderUnavailable: as ``query_status`` for a C2B receipt.
        """
        if not _RECEIPT.fullmatch(receipt) or receipt.startswith(STK_PREFIX):
            return PaymentStatus(
                provider=self.name,
                reference=ProviderReference(receipt),
                state=PaymentState.FAILED,
                reason="not an M-Pesa receipt",
            )
        return await self._transaction_status(ProviderReference(receipt))

    async def _transaction_status(self, reference: ProviderReference) -> PaymentStatus:
        if not (
            self._initiator
            and self._security_credential
            and self._status_result_url
            and self._status_timeout_url
        ):
            raise ProviderUnavailable(
                "Transaction Status is not configured (initiator, security credential, URLs)",
                provider=self.name,
                reference=reference,
                retryable=False,
            )
        payload = {
            "Initiator": self._initiator,
            "SecurityCredential": self._security_credential,
            "CommandID": "TransactionStatusQuery",
            "TransactionID": reference,
            "OriginalConversationID": "",
            "PartyA": self._shortcode,
            "IdentifierType": "4",
            "ResultURL": self._status_result_url,
            "QueueTimeOutURL": self._status_timeout_url,
            "Remarks": "reconciliation",
            "Occasion": "",
        }
        started = self._clock()
        # Without a store: until the query is acknowledged, a result for ids we do not know yet
        # may be ours: it is held in this process (deliver_status_result) and claimed below.
        # With one, the store holds it and judges it when the query is recorded.
        self._status_unacknowledged += 1
        try:
            conversation, request = await self._ask_status(payload, reference)
            held = self._held_results.pop(conversation, None)
            if held is not None:
                try:
                    await self._bind(held)
                except BaseException:
                    self._status_requests.pop(conversation, None)
                    raise
        finally:
            self._status_unacknowledged -= 1
        try:
            async with asyncio.timeout(self._status_result_wait_s):
                status = await self._status_answer(conversation, request)
        except TimeoutError as exc:
            raise ProviderUnavailable(
                "Transaction Status result did not arrive in time",
                provider=self.name,
                reference=reference,
            ) from exc
        finally:
            self._status_requests.pop(conversation, None)
            if not self._status_unacknowledged:
                self._held_results.clear()  # no query can claim them any more
        log.info(
            "transaction_status_answered",
            provider=self.name,
            reference=reference,
            state=str(status.state),
            ms=round((self._clock() - started) * 1000, 1),
        )
        return status

    async def _ask_status(
        self, payload: Mapping[str, object], reference: ProviderReference
    ) -> tuple[str, _StatusRequest]:
        """Send the query; register (and store) it under Daraja's acknowledged ids."""
        reply = await self._call(
            "/mpesa/transactionstatus/v1/query", payload, idempotent=True, reference=reference
        )
        body = reply.json_object() or {}
        if reply.status != 200 or str(body.get("ResponseCode")) != "0":
            error = self._error(reply, reference, what="Transaction Status")
            if isinstance(error, ProviderUnavailable):
                raise error
            raise ProviderUnavailable(
                error.args[0], provider=self.name, reference=reference, retryable=False
            ) from error
        conversation = str(body.get("ConversationID") or "")
        originator = str(body.get("OriginatorConversationID") or "")
        if not conversation or not originator:
            # Without the request's ids no result can be bound to it: never wait for one.
            raise ProviderUnavailable(
                "Transaction Status acknowledged without ConversationID/OriginatorConversationID",
                provider=self.name,
                reference=reference,
            )
        request = _StatusRequest(
            transaction_id=reference,
            originator=originator,
            result=asyncio.get_running_loop().create_future(),
        )
        self._status_requests[conversation] = request
        if self.status_store is not None:
            try:
                early = await self.status_store.record_status_query(
                    provider=self.name,
                    conversation_id=conversation,
                    originator_id=originator,
                    transaction_id=reference,
                )
            except BaseException:
                del self._status_requests[conversation]
                raise
            if early is not None:  # its result came first (to any instance) and is now judged
                log.info("transaction_status_result_came_first", outcome=early, reference=reference)
        return conversation, request

    # -- Pull Transactions (reconciliation of a push whose reference was lost) -----------------

    async def register_pull(
        self, *, nominated_number: Msisdn, callback_url: str, shortcode: str | None = None
    ) -> PullRegistration:
        """Register the shortcode for Pull Transactions, once (``gateway daraja pull-register``).

        ``POST /pulltransactions/v1/register`` with ``ShortCode``, ``RequestType`` "Pull",
        ``NominatedNumber`` (the Safaricom number nominated for the shortcode, ``2547…``) and
        ``CallBackURL``; the answer's ``ResponseStatus`` is "1000" when registered, "1001" when
        it already was [I: the shapes practitioners quote; ``docs/protocols.md`` §2.4].

        Raises:
            ProviderUnavailable: Daraja did not answer usefully (retryable on 5xx/timeouts), or
                refused the registration (``retryable=False``: the message says why).
        """
        code = shortcode or self._shortcode
        payload = {
            "ShortCode": code,
            "RequestType": "Pull",
            "NominatedNumber": international_digits(nominated_number),
            "CallBackURL": callback_url,
        }
        reply = await self._call(
            "/pulltransactions/v1/register", payload, idempotent=True, reference=None
        )
        body = reply.json_object() or {}
        status = str(body.get("ResponseStatus", ""))
        if reply.status != 200 or status not in {_PULL_REGISTERED, _PULL_ALREADY_REGISTERED}:
            error = self._error(reply, None, what="Pull Transactions registration")
            raise ProviderUnavailable(
                error.args[0], provider=self.name, retryable=error.retryable
            ) from error
        return PullRegistration(
            shortcode=str(body.get("ShortCode") or code),
            status=status,
            description=str(body.get("ResponseDescription", "")),
            reference=str(body.get("ResponseRefID", "")),
            already_registered=status == _PULL_ALREADY_REGISTERED,
        )

    async def find_payments(
        self,
        payer: Msisdn,
        amount: Money,
        since: datetime,
        until: datetime,
        *,
        account_reference: str | None = None,
    ) -> list[PaymentStatus]:
        """Completed payments by ``payer`` of exactly ``amount`` in ``[since, until]`` (Pull API).

        ``POST /pulltransactions/v1/query`` (``ShortCode``, ``StartDate``/``EndDate`` in EAT as
        ``YYYY-MM-DD HH:MM:SS``, ``OffSetValue``), paged until a short page. Its rows carry the
        receipt (``transactionId``), ``trxDate``, ``msisdn`` and ``amount`` [I: the response shape
        is as practitioners quote Safaricom's page; it names no CheckoutRequestID]. The receipt is
        each result's reference. Rows that are malformed, of another payer or amount, outside
        the window, or (with ``account_reference``) whose ``billreference`` is not the one a push
        for it carries (``fit_account_reference``) are skipped.

        Lookups share one pull per minute window: the window is covered by whole minutes, each
        pulled once (contiguous missing minutes in one request) and kept, so many purchases
        reconciled together cost one pull, not one each. A minute still open when pulled is
        pulled again by a lookup at least a minute later; one pulled a minute after it ended is
        final. Minutes not yet begun are not asked for.

        Raises:
            ProviderUnavailable: Daraja did not answer usefully (retryable on 5xx/timeouts).
        """
        bill = None if account_reference is None else fit_account_reference(account_reference)
        since, until = since.astimezone(UTC), until.astimezone(UTC)
        minutes = await self._pull_minutes(_minute_of(since), _minute_of(until))
        return [
            status
            for minute in minutes
            for when, status, billreference in minute.rows
            if status.payer == payer
            and status.amount == amount
            and (bill is None or billreference == bill)
            and since <= when <= until
        ]

    async def _pull_minutes(self, first: datetime, last: datetime) -> list[_PulledMinute]:
        """The pulled minutes ``first`` to ``last`` (UTC), pulling those missing or stale."""
        async with self._pull_lock:  # a lookup waiting here finds what the one ahead pulled
            now = self._now().astimezone(UTC)
            wanted = []
            minute = first
            while minute <= last and minute <= now:
                wanted.append(minute)
                minute += _MINUTE
            stale = [m for m in wanted if not self._pull_fresh(m)]
            runs: list[list[datetime]] = []
            for minute in stale:
                if runs and runs[-1][-1] + _MINUTE == minute:
                    runs[-1].append(minute)
                else:
                    runs.append([minute])
            for run in runs:
                await self._pull_run(run[0], run[-1] + _MINUTE)
            return [self._pull_cache[m] for m in wanted if m in self._pull_cache]

    def _pull_fresh(self, minute: datetime) -> bool:
        pulled = self._pull_cache.get(minute)
        return pulled is not None and (
            pulled.final or self._clock() - pulled.pulled_at < _PULL_REFRESH_S
        )

    async def _pull_run(self, start: datetime, end: datetime) -> None:
        """Pull ``[start, end)`` (whole minutes, UTC), paged, and keep each minute's payments."""
        last_second = end - timedelta(seconds=1)
        by_minute: dict[datetime, list[tuple[datetime, PaymentStatus, str]]] = {}
        offset = 0
        while True:
            payload = {
                "ShortCode": self._shortcode,
                "StartDate": start.astimezone(EAT).strftime(_PULL_DATE),
                "EndDate": last_second.astimezone(EAT).strftime(_PULL_DATE),
                "OffSetValue": str(offset),
            }
            reply = await self._call(
                "/pulltransactions/v1/query", payload, idempotent=True, reference=None
            )
            body = reply.json_object() or {}
            rows = body.get("Response")
            if reply.status != 200 or not isinstance(rows, list):
                error = self._error(reply, None, what="Pull Transactions")
                raise ProviderUnavailable(
                    error.args[0], provider=self.name, retryable=error.retryable
                ) from error
            page = [row for group in rows if isinstance(group, list) for row in group]
            for row in page:
                found = self._pulled(row, start, end - timedelta(microseconds=1))
                if found is not None:
                    when, status, billreference = found
                    by_minute.setdefault(_minute_of(when), []).append((when, status, billreference))
            if len(page) < _PULL_PAGE or not page:
                break
            offset += len(page)
        pulled_at = self._clock()
        now = self._now().astimezone(UTC)
        minute = start
        while minute < end:
            self._pull_cache.pop(minute, None)  # re-inserted last: the dict stays oldest-first
            self._pull_cache[minute] = _PulledMinute(
                tuple(by_minute.get(minute, ())),
                pulled_at=pulled_at,
                final=now >= minute + _MINUTE + _PULL_SETTLE,
            )
            minute += _MINUTE
        while len(self._pull_cache) > _PULL_KEEP_MINUTES:
            del self._pull_cache[next(iter(self._pull_cache))]

    def _pulled(
        self, row: object, since: datetime, until: datetime
    ) -> tuple[datetime, PaymentStatus, str] | None:
        """One Pull row as (when, a success, its billreference); None if malformed or outside."""
        if not isinstance(row, dict):
            return None
        receipt = str(row.get("transactionId", ""))
        try:
            when = datetime.fromisoformat(str(row.get("trxDate", "")))
            paid = _kes(row.get("amount"), "amount")
        except (ValueError, ForgedCallback):
            return None
        if not _RECEIPT.fullmatch(receipt) or when.tzinfo is None or not since <= when <= until:
            return None
        payer = _payer(str(row.get("msisdn", "")))
        if payer is None:
            return None
        status = PaymentStatus(
            provider=self.name,
            reference=ProviderReference(receipt),
            state=PaymentState.SUCCEEDED,
            amount=paid,
            payer=payer,
            receipt=receipt,
        )
        return when.astimezone(UTC), status, str(row.get("billreference", ""))

    async def _status_answer(self, conversation: str, request: _StatusRequest) -> PaymentStatus:
        """The query's result: handed over in this process, or (with a store) read from it."""
        store = self.status_store
        if store is None:
            return await request.result
        while True:
            # The ledger is the truth (the result may have reached any instance, or come first
            # and been bound as the query was recorded); a result reaching this instance wakes
            # the wait at once.
            raw = await store.status_query_result(conversation)
            if raw is not None:
                outcome = self._parse_status_result(raw).outcome
                if isinstance(outcome, PaymentStatus):
                    return outcome
                raise outcome
            done, _ = await asyncio.wait({request.result}, timeout=self._status_poll_s)
            if done:
                return request.result.result()

    async def deliver_status_result(self, body: bytes) -> StatusResultOutcome:
        """Hand a Transaction Status ``Result`` (posted to ``status_result_url``) to its query.

        Accepted (``DELIVERED``) only when its ``ConversationID`` and ``OriginatorConversationID``
        are those Daraja acknowledged for an outstanding query (of this process, or with a
        ``status_store`` of any instance), and its ``TransactionID`` (and ``ReceiptNo``, when
        given) is the transaction that query asked about; the query is then answered, once.
        Otherwise ``UNMATCHED`` (late, another's, or forged) or ``CONTRADICTED`` (our request's
        ids, another transaction): never proof, and the query keeps waiting for the real one.

        A result for ids no query has yet may be for a query whose acknowledgement is still
        being read and recorded: with a store it is held there (see the module's notes) and
        this waits up to ``status_hold_s`` for the verdict; without one it is ``HELD`` in this
        process for the queries outstanding here (a few, briefly).

        A result saying our initiator setup is wrong reaches the waiting query as a
        non-retryable ``ProviderUnavailable``.

        Raises:
            ForgedCallback: the body is not a Transaction Status result.
        """
        parsed = self._parse_status_result(body)
        outcome = await self._bind(parsed)
        if self.status_store is not None:
            if outcome is StatusResultOutcome.HELD:
                outcome = await self._held_verdict(parsed)
            return outcome
        if outcome is StatusResultOutcome.UNMATCHED and self._status_unacknowledged:
            # Perhaps for a query of ours whose acknowledgement is still being read: kept for it.
            self._held_results.pop(parsed.conversation, None)
            if len(self._held_results) < _HELD_RESULTS:
                self._held_results[parsed.conversation] = parsed
                return StatusResultOutcome.HELD
        return outcome

    async def _held_verdict(self, parsed: _ParsedResult) -> StatusResultOutcome:
        """What the store made of a held result once its query was recorded (or UNMATCHED)."""
        assert self.status_store is not None  # noqa: S101 - only called with a store
        deadline = self._clock() + self._status_hold_s
        while True:
            verdict = await self.status_store.held_status_outcome(parsed.conversation)
            if verdict is not None or self._clock() >= deadline:
                break
            await asyncio.sleep(min(self._status_poll_s, 0.05))
        if verdict == "accepted":
            request = self._status_requests.get(parsed.conversation)
            if request is not None and not request.result.done():  # the waiting query is here
                if isinstance(parsed.outcome, PaymentStatus):
                    request.result.set_result(parsed.outcome)
                else:
                    request.result.set_exception(parsed.outcome)
            return StatusResultOutcome.DELIVERED
        if verdict == "contradicted":
            return StatusResultOutcome.CONTRADICTED
        # Still no query with its ids (kept a while for one all the same), or refused.
        return StatusResultOutcome.UNMATCHED

    async def _bind(self, parsed: _ParsedResult) -> StatusResultOutcome:
        """Accept ``parsed`` for the query it names (in the store, if any), once; hand it over."""
        if parsed.receipt not in {None, parsed.transaction_id}:
            return StatusResultOutcome.CONTRADICTED  # a receipt other than the transaction
        request = self._status_requests.get(parsed.conversation)
        if self.status_store is not None:
            answer = await self.status_store.answer_status_query(
                provider=self.name,
                conversation_id=parsed.conversation,
                originator_id=parsed.originator,
                transaction_id=parsed.transaction_id,
                result=parsed.raw,
            )
            if answer != "accepted":
                return _STORE_ANSWERS.get(answer, StatusResultOutcome.UNMATCHED)
        elif request is None or request.result.done() or parsed.originator != request.originator:
            return StatusResultOutcome.UNMATCHED
        elif parsed.transaction_id != request.transaction_id:
            return StatusResultOutcome.CONTRADICTED
        if request is not None and not request.result.done():  # the waiting query is here
            if isinstance(parsed.outcome, PaymentStatus):
                request.result.set_result(parsed.outcome)
            else:
                request.result.set_exception(parsed.outcome)
        return StatusResultOutcome.DELIVERED

    def _parse_status_result(self, body: bytes) -> _ParsedResult:
        try:
            result = _json_object(body).get("Result")
            if not isinstance(result, dict):
                raise _forged("no Result object")
            conversation = _text(result, "ConversationID")
            originator = _text(result, "OriginatorConversationID")
            reference = _text(result, "TransactionID", required=False)
            code = _integer(result.get("ResultCode"), "ResultCode")
            params = result.get("ResultParameters")
            items = params.get("ResultParameter") if isinstance(params, dict) else None
            values: dict[str, object] = {}
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and isinstance(item.get("Key"), str):
                    values[str(item["Key"])] = item.get("Value")
            receipt = str(values["ReceiptNo"]) if values.get("ReceiptNo") else None
            reference = reference or receipt or ""
            if not reference:
                raise _forged("Transaction Status result names no transaction")
            return _ParsedResult(
                conversation=conversation,
                originator=originator,
                transaction_id=reference,
                receipt=receipt,
                outcome=self._status_outcome(reference, code, result, values),
                raw=body,
            )
        except ForgedCallback:
            raise
        except (ValueError, TypeError, ArithmeticError) as exc:
            raise _forged(f"malformed Transaction Status result: {exc}") from exc

    def _status_outcome(
        self,
        reference: str,
        code: int,
        result: Mapping[str, object],
        values: Mapping[str, object],
    ) -> PaymentStatus | PaymentError:
        desc = str(result.get("ResultDesc", ""))
        if code in _INITIATOR_ERRORS:
            return ProviderUnavailable(
                f"Transaction Status refused our initiator: {code} {desc}",
                provider=self.name,
                reference=reference,
                retryable=False,
            )
        if code != 0:
            return PaymentStatus(
                provider=self.name,
                reference=ProviderReference(reference),
                state=PaymentState.FAILED,
                reason=f"{code} {desc}".strip(),
            )
        completed = str(values.get("TransactionStatus", "")) == "Completed"
        debit = str(values.get("DebitPartyName", ""))
        # "Pay Bill Online" / "Buy Goods Online": an STK push; "Pay Bill", "Pay Utility" …: C2B.
        reason_type = str(values.get("ReasonType") or "").strip().lower()
        return PaymentStatus(
            provider=self.name,
            reference=ProviderReference(reference),
            state=PaymentState.SUCCEEDED if completed else PaymentState.FAILED,
            amount=_kes(values.get("Amount"), "Amount"),
            payer=_payer(debit.split(" - ", 1)[0].strip()),
            receipt=str(values.get("ReceiptNo", reference)),
            reason=None if completed else str(values.get("TransactionStatus", "")),
            customer_initiated=("online" not in reason_type) if reason_type else None,
        )

    # -- callbacks -----------------------------------------------------------------------------

    def parse_callback(self, body: bytes, headers: Mapping[str, str]) -> PaymentNotice:  # noqa: ARG002 - Daraja signs nothing
        """Read an STK callback or a C2B confirmation into a claim. Pure.

        Raises:
            ForgedCallback: the body is neither, or breaks their documented shape.
        """
        try:
            obj = _json_object(body)
            if "Body" in obj:
                return self._parse_stk(obj, body)
            if "TransID" in obj:
                return self._parse_c2b(obj, body, claimed=PaymentState.SUCCEEDED)
            raise _forged("neither an STK callback nor a C2B confirmation")
        except ForgedCallback:
            raise
        except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:
            raise _forged(f"malformed callback: {exc!r}") from exc

    def parse_customer_validation(self, body: bytes) -> PaymentNotice:
        """Read a C2B validation request (money has not moved yet: ``claimed_state`` PENDING).

        Raises:
            ForgedCallback: the body is not a C2B request of our shortcode.
        """
        try:
            obj = _json_object(body)
            return self._parse_c2b(obj, body, claimed=PaymentState.PENDING)
        except ForgedCallback:
            raise
        except (ValueError, TypeError, ArithmeticError, RecursionError) as exc:
            raise _forged(f"malformed C2B validation: {exc!r}") from exc

    def _parse_stk(self, obj: Mapping[str, object], raw: bytes) -> PaymentNotice:
        outer = obj.get("Body")
        stk = outer.get("stkCallback") if isinstance(outer, dict) else None
        if not isinstance(stk, dict):
            raise _forged("Body.stkCallback is missing")
        reference = _text(stk, "CheckoutRequestID")
        _text(stk, "MerchantRequestID")
        code = _integer(stk.get("ResultCode"), "ResultCode")
        _text(stk, "ResultDesc", required=False)
        state = _RESULT_STATES.get(code, PaymentState.FAILED)
        if state is not PaymentState.SUCCEEDED:
            return PaymentNotice(
                provider=self.name,
                reference=ProviderReference(reference),
                claimed_state=state,
                raw=raw,
            )
        meta = stk.get("CallbackMetadata")
        items = meta.get("Item") if isinstance(meta, dict) else None
        if not isinstance(items, list):
            raise _forged("a successful STK callback must carry CallbackMetadata.Item", reference)
        values: dict[str, object] = {}
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("Name"), str):
                raise _forged("CallbackMetadata.Item entries are Name/Value pairs", reference)
            values[str(item["Name"])] = item.get("Value")
        receipt = values.get("MpesaReceiptNumber")
        if not isinstance(receipt, str) or not _RECEIPT.fullmatch(receipt):
            raise _forged(f"MpesaReceiptNumber is not a receipt: {receipt!r}", reference)
        _integer(values.get("TransactionDate"), "TransactionDate")
        phone = _integer(values.get("PhoneNumber"), "PhoneNumber")
        payer = _payer(str(phone))
        if payer is None:
            raise _forged(f"PhoneNumber is not a mobile number: {phone}", reference)
        return PaymentNotice(
            provider=self.name,
            reference=ProviderReference(reference),
            claimed_state=state,
            amount=_kes(values.get("Amount"), "Amount"),
            payer=payer,
            receipt=receipt,
            raw=raw,
        )

    def _parse_c2b(
        self, obj: Mapping[str, object], raw: bytes, *, claimed: PaymentState
    ) -> PaymentNotice:
        trans_id = _text(obj, "TransID")
        if not _RECEIPT.fullmatch(trans_id):
            raise _forged(f"TransID is not a receipt: {trans_id!r}")
        shortcode = _text(obj, "BusinessShortCode")
        if shortcode != self._shortcode:
            raise _forged(f"paid to shortcode {shortcode}, ours is {self._shortcode}", trans_id)
        account = _text(obj, "BillRefNumber", required=False).strip()
        amount = _kes(_text(obj, "TransAmount"), "TransAmount")
        _text(obj, "TransTime")
        payer = _payer(_text(obj, "MSISDN", required=False))
        return PaymentNotice(
            provider=self.name,
            reference=ProviderReference(trans_id),
            claimed_state=claimed,
            amount=amount,
            payer=payer,
            receipt=trans_id,
            account_reference=account,
            is_customer_initiated=True,
            raw=raw,
        )

    def acknowledgement(self) -> CallbackAck:
        """``{"ResultCode":0,"ResultDesc":"Accepted"}``: Daraja only needs a quick 200."""
        return _json_ack({"ResultCode": 0, "ResultDesc": "Accepted"})

    def customer_validation_answer(self, refusal: str | None) -> CallbackAck:
        """Daraja's C2B validation answer: accept (``None``) or reject with its ``C2B000xx`` code.

        ``refusal`` is what ``PaymentEvents.validate_customer_payment`` returned; a
        ``CustomerPaymentRefusal`` maps to its own code, any other text to ``C2B00016`` (other).
        """
        if refusal is None:
            return _json_ack({"ResultCode": "0", "ResultDesc": "Accepted"})
        code = _REJECT_CODES.get(refusal, _REJECT_OTHER)
        return _json_ack({"ResultCode": code, "ResultDesc": "Rejected"})

    def customer_confirmation_answer(self) -> CallbackAck:
        """``{"ResultCode":0,"ResultDesc":"Success"}``, what Daraja expects for a confirmation."""
        return _json_ack({"ResultCode": 0, "ResultDesc": "Success"})


__all__ = [
    "EAT",
    "DarajaProvider",
    "PullRegistration",
    "fit_account_reference",
    "stk_password",
    "stk_timestamp",
]
