"""Airtel Money collections (Open API): USSD push, its status, and its callback.

Formats from docs/protocols.md §3.2, which marks them practitioner-sourced: treat the result-code
tables below as [P/I] until checked against Airtel's portal. The subscriber ``msisdn`` is the
national number without country code; the ``transaction.id`` is ours, so we use the purchase id:
a retry reuses it and Airtel refuses the duplicate (``ESB000041``), which we read as "already
sent: query it". That makes every transport failure of ``request_collection`` retryable.

Airtel's status and callback carry no amount. The push asks for the amount we set and the payer
cannot change it, so ``PaymentStatus.amount`` is that requested amount when this process sent the
push, ``None`` otherwise (the saga compares with the purchase's own amount).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Final

import aiohttp
import structlog

from gateway.money import Money, currency_exponent
from gateway.payments.base import (
    CallbackAck,
    CollectionRequest,
    CollectionStarted,
    ForgedCallback,
    PaymentDeclined,
    PaymentError,
    PaymentNotice,
    PaymentState,
    PaymentStatus,
    ProviderReference,
    ProviderReply,
    ProviderUnavailable,
    TokenCache,
    call_provider,
    remember,
)
from gateway.phone import national_significant

log = structlog.get_logger()

DUPLICATE_ID: Final = "ESB000041"  # "External Transaction ID already exists" [P]
NOT_FOUND: Final = "ESB000045"  # "No transaction found with provided transaction ID" [P]
MAX_ID_LENGTH: Final = 64

# transaction.status / status_code → our state. TA (ambiguous) is not final: keep polling.
_STATUS_STATES: Final[Mapping[str, PaymentState]] = {
    "TS": PaymentState.SUCCEEDED,
    "TF": PaymentState.FAILED,
    "TIP": PaymentState.PENDING,
    "TA": PaymentState.PENDING,
}
# Failure response codes that say more than "failed" [P].
_FAILURE_STATES: Final[Mapping[str, PaymentState]] = {
    "DP00800001024": PaymentState.TIMED_OUT,  # transaction timed out
    "DP00800001029": PaymentState.TIMED_OUT,  # transaction expired
    "DP00800001008": PaymentState.CANCELLED,  # refused by the payer
}


def _state(status: str, response_code: str) -> PaymentState:
    state = _STATUS_STATES[status]
    if state is PaymentState.FAILED:
        return _FAILURE_STATES.get(response_code, PaymentState.FAILED)
    return state


def _dig(obj: Mapping[str, object], *keys: str) -> object:
    value: object = obj
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


class AirtelProvider:
    """The ``PaymentProvider`` for Airtel Money collections.

    Args:
        session: the HTTP client; the caller owns its lifetime.
        base_url: ``https://openapi.airtel.africa``, UAT, or a simulator.
        client_id, client_secret: the app's OAuth credentials.
        country, currency: ``X-Country``/``X-Currency`` of the wallet (``UG``/``UGX``…).
        timeout_s: the deadline of every HTTP call. clock: monotonic seconds, for token expiry.

    The callback URL is configured per app in Airtel's portal, not per request.
    """

    #: Whether sending the same collection request again is harmless (the saga never sends a second
    #: one when it is not). Here: the transaction id is ours: Airtel refuses a repeat as a
    #: duplicate.
    idempotent_requests = True

    def __init__(  # noqa: PLR0913 - all keyword-only settings
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        client_id: str,
        client_secret: str,
        country: str = "UG",
        currency: str = "UGX",
        timeout_s: float = 10.0,
        name: str = "airtel",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._client_id = client_id
        self._client_secret = client_secret
        self._country = country
        self._currency = currency
        self._timeout_s = timeout_s
        self._tokens = TokenCache(self._fetch_token, clock=clock)
        self._requested: dict[str, Money] = {}

    async def _fetch_token(self) -> tuple[str, float]:
        reply = await call_provider(
            self._session,
            "POST",
            f"{self._base_url}/auth/oauth2/token",
            provider=self.name,
            timeout_s=self._timeout_s,
            idempotent=True,
            json_body={
                "client_id": self._client_id,
                "client_secret": self._client_secret,
                "grant_type": "client_credentials",
            },
        )
        body = reply.json_object() or {}
        token = body.get("access_token")
        if reply.status != 200 or not isinstance(token, str) or not token:
            raise self._error(reply, None, what="token")
        try:
            lifetime_s = float(str(body.get("expires_in", 180)))
        except ValueError:
            lifetime_s = 180.0
        return token, lifetime_s

    async def _call(
        self, method: str, path: str, *, reference: str, json_body: object = None
    ) -> ProviderReply:
        """Send with the bearer token and wallet headers; a 401 refreshes the token once."""
        reply: ProviderReply | None = None
        for _ in range(2):
            token = await self._tokens.get()
            reply = await call_provider(
                self._session,
                method,
                f"{self._base_url}{path}",
                provider=self.name,
                timeout_s=self._timeout_s,
                idempotent=True,  # our transaction.id makes a repeat harmless
                headers={
                    "Authorization": f"Bearer {token}",
                    "X-Country": self._country,
                    "X-Currency": self._currency,
                    "Accept": "*/*",
                },
                json_body=json_body,
                reference=reference,
            )
            if reply.status != 401:
                return reply
            self._tokens.invalidate()
        assert reply is not None  # noqa: S101 - the loop ran at least once
        return reply

    def _error(self, reply: ProviderReply, reference: str | None, *, what: str) -> PaymentError:
        body = reply.json_object() or {}
        codes = " ".join(
            str(_dig(body, "status", key) or "") for key in ("result_code", "response_code")
        ).strip()
        message = str(
            _dig(body, "status", "message")
            or body.get("error_description")
            or reply.body[:200].decode(errors="replace")
        )
        text = f"{what}: HTTP {reply.status} {codes} {message}".strip()
        if reply.status >= 500 or reply.status == 429:
            return ProviderUnavailable(text, provider=self.name, reference=reference)
        return PaymentDeclined(text, provider=self.name, reference=reference)

    async def request_collection(self, request: CollectionRequest) -> CollectionStarted:
        """Push a payment prompt to ``request.payer``. Safe to retry: ``transaction.id`` is ours.

        Raises:
            PaymentDeclined: Airtel refused the request (number, currency, amount), or the
                amount is not whole units of the wallet's currency.
            ProviderUnavailable: Airtel is unreachable, slow or failing (retryable).
        """
        reference = ProviderReference(request.purchase_id)
        amount = request.amount
        unit = 10 ** currency_exponent(amount.currency)
        if amount.currency != self._currency or amount.amount_minor % unit:
            raise PaymentDeclined(
                f"this Airtel wallet takes whole {self._currency}, got {amount}",
                provider=self.name,
                reference=reference,
            )
        if not reference or len(reference) > MAX_ID_LENGTH:
            raise PaymentDeclined(
                "purchase id unusable as transaction.id", provider=self.name, reference=reference
            )
        body = {
            "reference": request.description[:64] or "Payment",
            "subscriber": {
                "country": self._country,
                "currency": self._currency,
                "msisdn": national_significant(request.payer),
            },
            "transaction": {
                "amount": amount.amount_minor // unit,
                "country": self._country,
                "currency": self._currency,
                "id": reference,
            },
        }
        reply = await self._call(
            "POST", "/merchant/v1/payments/", reference=reference, json_body=body
        )
        reply_body = reply.json_object() or {}
        result_code = str(_dig(reply_body, "status", "result_code") or "")
        if result_code == DUPLICATE_ID:
            log.info("airtel_request_already_sent", provider=self.name, reference=reference)
        elif reply.status != 200 or _dig(reply_body, "status", "success") is not True:
            raise self._error(reply, reference, what="payment request refused")
        else:
            log.info("airtel_request_sent", provider=self.name, reference=reference)
        remember(self._requested, reference, amount)
        return CollectionStarted(provider=self.name, reference=reference)

    async def query_status(self, reference: ProviderReference) -> PaymentStatus:
        """``GET /standard/v1/payments/{id}``: Airtel's own account of the payment.

        Raises:
            ProviderUnavailable: Airtel did not answer usefully now (retryable), or refused our
                credentials or wallet headers (4xx: ``retryable=False``).
            ForgedCallback: Airtel does not know ``reference``.
        """
        reply = await self._call("GET", f"/standard/v1/payments/{reference}", reference=reference)
        body = reply.json_object() or {}
        if str(_dig(body, "status", "result_code") or "") == NOT_FOUND or reply.status == 404:
            raise ForgedCallback(
                "Airtel does not know this transaction", provider=self.name, reference=reference
            )
        status = _dig(body, "data", "transaction", "status")
        if reply.status != 200 or status not in _STATUS_STATES:
            error = self._error(reply, reference, what="status")
            # 5xx, 429 or a garbled 200: try later. Other 4xx: our credentials or wallet headers.
            retryable = reply.status == 200 or error.retryable
            raise ProviderUnavailable(
                error.args[0], provider=self.name, reference=reference, retryable=retryable
            ) from error
        response_code = str(_dig(body, "status", "response_code") or "")
        state = _state(str(status), response_code)
        receipt = _dig(body, "data", "transaction", "airtel_money_id")
        message = _dig(body, "data", "transaction", "message")
        failure = f"{response_code} {message}".strip()
        return PaymentStatus(
            provider=self.name,
            reference=reference,
            state=state,
            amount=self._requested.get(reference) if state is PaymentState.SUCCEEDED else None,
            receipt=receipt if isinstance(receipt, str) and receipt else None,
            reason=None if state is PaymentState.SUCCEEDED else failure,
        )

    def parse_callback(self, body: bytes, headers: Mapping[str, str]) -> PaymentNotice:  # noqa: ARG002 - Airtel signs nothing we verify
        """Read ``{"transaction": {id, message, status_code, airtel_money_id}}``. Pure.

        Raises:
            ForgedCallback: not that shape.
        """
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise ForgedCallback(f"not JSON: {exc}", provider=self.name) from exc
        transaction = obj.get("transaction") if isinstance(obj, dict) else None
        if not isinstance(transaction, dict):
            raise ForgedCallback("no transaction object", provider=self.name)
        reference = transaction.get("id")
        status = transaction.get("status_code")
        receipt = transaction.get("airtel_money_id")
        if not isinstance(reference, str) or not reference or len(reference) > MAX_ID_LENGTH:
            raise ForgedCallback("transaction.id must be a short string", provider=self.name)
        if not isinstance(status, str) or status not in _STATUS_STATES:
            raise ForgedCallback(
                f"status_code must be one of {sorted(_STATUS_STATES)}",
                provider=self.name,
                reference=reference,
            )
        if receipt is not None and not isinstance(receipt, str):
            raise ForgedCallback(
                "airtel_money_id must be a string", provider=self.name, reference=reference
            )
        return PaymentNotice(
            provider=self.name,
            reference=ProviderReference(reference),
            claimed_state=_STATUS_STATES[status],
            receipt=receipt or None,
            raw=body,
        )

    def acknowledgement(self) -> CallbackAck:
        """Airtel only needs a 200."""
        return CallbackAck(status=200, content_type="application/json", body=b"{}")


__all__ = ["AirtelProvider"]
