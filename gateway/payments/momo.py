"""MTN MoMo Collection: request-to-pay, its status, and its callback (``docs/protocols.md`` §3.1).

Idempotency is MoMo's own: the ``X-Reference-Id`` we choose *is* the resource id. We derive it as
a UUIDv5 of our purchase id (``reference_for``), so a retried request can never create a second
charge: MoMo answers ``409 RESOURCE_ALREADY_EXIST`` and we treat that as "already sent, query it".
That is why every failure of ``request_collection`` short of a refusal is retryable here.

MoMo's callback (``PUT``, sometimes ``POST``, to ``X-Callback-Url``) repeats the status body,
which carries our ``externalId`` (the purchase id) but not the ``X-Reference-Id``: the reference is
derived again from ``externalId``. The status ``GET`` answers 200 even for failures; its ``amount``,
``currency`` and ``payer`` are the proof.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Final

import aiohttp
import structlog

from gateway.money import Money
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
)
from gateway.phone import InvalidPhoneNumber, Msisdn, international_digits, parse_msisdn

log = structlog.get_logger()

REFERENCE_NAMESPACE: Final = uuid.UUID("6f1c1bb2-6a0e-5b8e-9a51-3c2f0d7e4a10")
"""The UUIDv5 namespace of our ``X-Reference-Id`` values. Never change it: retries of purchases
made before the change would get new ids, and could charge twice."""

MAX_NOTE: Final = 160  # payerMessage and payeeNote: at most 160 characters, no apostrophes

_STATUSES: Final = frozenset({"PENDING", "SUCCESSFUL", "FAILED"})
_CANCELLED_REASONS: Final = frozenset({"APPROVAL_REJECTED", "TRANSACTION_CANCELED", "REJECTED"})
_TIMEOUT_REASONS: Final = frozenset({"COULD_NOT_PERFORM_TRANSACTION", "EXPIRED", "TIMEOUT"})


def reference_for(purchase_id: str) -> ProviderReference:
    """The ``X-Reference-Id`` of ``purchase_id``: the same purchase always gets the same id."""
    return ProviderReference(str(uuid.uuid5(REFERENCE_NAMESPACE, purchase_id)))


def _note(text: str) -> str:
    """MoMo refuses apostrophes and more than 160 characters in payer/payee notes."""
    return text.replace("'", "").replace('"', "")[:MAX_NOTE]


def _reason(body: Mapping[str, object]) -> str:
    """``reason`` is a string in current MoMo, an object ``{code, message}`` in older answers."""
    reason = body.get("reason")
    if isinstance(reason, dict):
        return str(reason.get("code", ""))
    return str(reason) if isinstance(reason, str) else ""


def _state(status: str, reason: str) -> PaymentState:
    if status == "SUCCESSFUL":
        return PaymentState.SUCCEEDED
    if status == "PENDING":
        return PaymentState.PENDING
    if reason in _CANCELLED_REASONS:
        return PaymentState.CANCELLED
    if reason in _TIMEOUT_REASONS:
        return PaymentState.TIMED_OUT
    return PaymentState.FAILED


def _payer(body: Mapping[str, object]) -> Msisdn | None:
    payer = body.get("payer")
    party = payer.get("partyId") if isinstance(payer, dict) else None
    if not isinstance(party, str) or not party.isdigit():
        return None
    try:
        return parse_msisdn(party)
    except InvalidPhoneNumber:
        return None


class MomoProvider:
    """The ``PaymentProvider`` for MTN MoMo collections.

    Args:
        session: the HTTP client; the caller owns its lifetime.
        base_url: ``https://proxy.momoapi.mtn.com``, the sandbox, or a simulator.
        subscription_key: the Collection product's ``Ocp-Apim-Subscription-Key``.
        api_user, api_key: the API user (a UUID) and its key, for the Basic token request.
        target_environment: ``sandbox`` or ``mtn<country>`` (``mtnuganda``…).
        currency: the environment's currency (the sandbox takes EUR only).
        callback_url: ``X-Callback-Url`` (``…/payments/momo/<secret>/callback``); its host must be
            the API user's ``providerCallbackHost``. ``None`` sends no callback header.
        timeout_s: the deadline of every HTTP call. clock: monotonic seconds, for token expiry.
    """

    #: Whether sending the same collection request again is harmless (the saga never sends a second
    #: one when it is not). Here: the X-Reference-Id is derived from the purchase id: a repeat is
    #: refused (409) and queried.
    idempotent_requests = True

    def __init__(  # noqa: PLR0913 - all keyword-only settings
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        subscription_key: str,
        api_user: str,
        api_key: str,
        target_environment: str = "sandbox",
        currency: str = "EUR",
        callback_url: str | None = None,
        timeout_s: float = 10.0,
        name: str = "momo",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._subscription_key = subscription_key
        self._basic = base64.b64encode(f"{api_user}:{api_key}".encode()).decode()
        self._environment = target_environment
        self._currency = currency
        self._callback_url = callback_url
        self._timeout_s = timeout_s
        self._tokens = TokenCache(self._fetch_token, clock=clock)

    async def _fetch_token(self) -> tuple[str, float]:
        reply = await call_provider(
            self._session,
            "POST",
            f"{self._base_url}/collection/token/",
            provider=self.name,
            timeout_s=self._timeout_s,
            idempotent=True,
            headers={
                "Authorization": f"Basic {self._basic}",
                "Ocp-Apim-Subscription-Key": self._subscription_key,
            },
        )
        body = reply.json_object() or {}
        token = body.get("access_token")
        if reply.status != 200 or not isinstance(token, str) or not token:
            raise self._error(reply, None, what="token")
        try:
            lifetime_s = float(str(body.get("expires_in", 3600)))
        except ValueError:
            lifetime_s = 3600.0
        return token, lifetime_s

    async def _call(
        self,
        method: str,
        path: str,
        *,
        reference: str,
        headers: Mapping[str, str] | None = None,
        json_body: object = None,
    ) -> ProviderReply:
        """Send with the bearer token; a 401 refreshes the token and tries once more."""
        reply: ProviderReply | None = None
        for _ in range(2):
            token = await self._tokens.get()
            reply = await call_provider(
                self._session,
                method,
                f"{self._base_url}{path}",
                provider=self.name,
                timeout_s=self._timeout_s,
                idempotent=True,  # X-Reference-Id makes every call here safe to repeat
                headers={
                    "Authorization": f"Bearer {token}",
                    "X-Target-Environment": self._environment,
                    "Ocp-Apim-Subscription-Key": self._subscription_key,
                    **(headers or {}),
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
        code = str(body.get("code", body.get("statusCode", "")))
        message = str(body.get("message", reply.body[:200].decode(errors="replace")))
        text = f"{what}: HTTP {reply.status} {code} {message}".strip()
        if reply.status >= 500 or reply.status == 429:
            return ProviderUnavailable(text, provider=self.name, reference=reference)
        return PaymentDeclined(text, provider=self.name, reference=reference)

    async def request_collection(self, request: CollectionRequest) -> CollectionStarted:
        """Request-to-pay ``request.amount`` from ``request.payer``. Safe to retry, any time.

        Raises:
            PaymentDeclined: MoMo refused the request (400: currency, number, notes; 401, 403).
            ProviderUnavailable: MoMo is unreachable, slow or failing (always retryable).
        """
        reference = reference_for(request.purchase_id)
        if request.amount.currency != self._currency:
            raise PaymentDeclined(
                f"this MoMo environment takes {self._currency}, got {request.amount}",
                provider=self.name,
                reference=reference,
            )
        headers: dict[str, str] = {"X-Reference-Id": reference}
        if self._callback_url:
            headers["X-Callback-Url"] = self._callback_url
        body = {
            "amount": str(request.amount.major),
            "currency": request.amount.currency,
            "externalId": request.purchase_id,
            "payer": {"partyIdType": "MSISDN", "partyId": international_digits(request.payer)},
            "payerMessage": _note(f"{request.description} {request.account_reference}"),
            "payeeNote": _note(request.account_reference),
        }
        reply = await self._call(
            "POST",
            "/collection/v1_0/requesttopay",
            reference=reference,
            headers=headers,
            json_body=body,
        )
        if reply.status == 409:
            # RESOURCE_ALREADY_EXIST: an earlier attempt reached MoMo. Same id: query it.
            log.info("momo_request_already_sent", provider=self.name, reference=reference)
        elif reply.status != 202:
            raise self._error(reply, reference, what="request-to-pay refused")
        else:
            log.info("momo_request_sent", provider=self.name, reference=reference)
        return CollectionStarted(provider=self.name, reference=reference)

    async def query_status(self, reference: ProviderReference) -> PaymentStatus:
        """``GET /requesttopay/{reference}``: the provider's own account of the payment.

        Raises:
            ProviderUnavailable: MoMo did not answer usefully now (retryable), or refused our
                credentials or environment (4xx: ``retryable=False``).
            ForgedCallback: MoMo does not know ``reference`` (404).
        """
        reply = await self._call(
            "GET", f"/collection/v1_0/requesttopay/{reference}", reference=reference
        )
        if reply.status == 404:
            raise ForgedCallback(
                "MoMo does not know this request-to-pay", provider=self.name, reference=reference
            )
        body = reply.json_object()
        if reply.status != 200 or body is None:
            error = self._error(reply, reference, what="status")
            # 5xx, 429 or a garbled 200: try later. Other 4xx: our credentials or environment.
            retryable = reply.status == 200 or error.retryable
            raise ProviderUnavailable(
                error.args[0], provider=self.name, reference=reference, retryable=retryable
            ) from error
        status = str(body.get("status", ""))
        if status not in _STATUSES:
            raise ProviderUnavailable(
                f"status answered an unknown status {status!r}",
                provider=self.name,
                reference=reference,
            )
        reason = _reason(body)
        state = _state(status, reason)
        amount: Money | None = None
        try:
            amount = Money.of(str(body.get("amount")), str(body.get("currency")))
        except (ValueError, ArithmeticError):  # decimal.Overflow for absurd exponents
            amount = None
        return PaymentStatus(
            provider=self.name,
            reference=reference,
            state=state,
            amount=amount if state is PaymentState.SUCCEEDED else None,
            payer=_payer(body),
            receipt=str(body.get("financialTransactionId") or "") or None,
            reason=reason or None,
        )

    def parse_callback(self, body: bytes, headers: Mapping[str, str]) -> PaymentNotice:  # noqa: ARG002 - MoMo signs nothing
        """Read a MoMo callback (the status body) into a claim. Pure.

        Raises:
            ForgedCallback: not a JSON object with ``externalId``, ``status``, ``amount`` and
                ``currency`` as MoMo sends them.
        """
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise self._forged(f"not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise self._forged("expected a JSON object")
        external = obj.get("externalId")
        status = obj.get("status")
        amount_text = obj.get("amount")
        currency = obj.get("currency")
        if not isinstance(external, str) or not external:
            raise self._forged("externalId must be a non-empty string")
        reference = reference_for(external)
        if status not in _STATUSES:
            raise self._forged(f"status must be one of {sorted(_STATUSES)}", reference)
        if not isinstance(amount_text, str) or not isinstance(currency, str):
            raise self._forged("amount and currency must be strings", reference)
        try:
            amount = Money.of(amount_text, currency)
        except (ValueError, ArithmeticError) as exc:  # decimal.Overflow for absurd exponents
            raise self._forged(f"not an amount: {amount_text!r} {currency!r}", reference) from exc
        if amount.amount_minor <= 0:
            raise self._forged("amount must be positive", reference)
        receipt = obj.get("financialTransactionId")
        return PaymentNotice(
            provider=self.name,
            reference=reference,
            claimed_state=_state(str(status), _reason(obj)),
            amount=amount,
            payer=_payer(obj),
            receipt=receipt if isinstance(receipt, str) and receipt else None,
            raw=body,
        )

    def _forged(self, message: str, reference: str | None = None) -> ForgedCallback:
        return ForgedCallback(message, provider=self.name, reference=reference)

    def acknowledgement(self) -> CallbackAck:
        """MoMo only needs a 200; the body is ignored."""
        return CallbackAck(status=200, content_type="text/plain", body=b"")


__all__ = ["REFERENCE_NAMESPACE", "MomoProvider", "reference_for"]
