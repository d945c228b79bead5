"""Africa's Talking SMS: two ``SmsSender`` adapters and the delivery-report parser.

- :class:`AfricasTalkingSdkSender` uses the official synchronous ``africastalking`` SDK
  (2.0.3) through ``asyncio.to_thread``. The SDK has no base-URL option: to point it at the
  simulator we set its ``_baseUrl``/``_contentUrl`` after construction (docs/protocols.md §1.5).
- :class:`AfricasTalkingHttpSender` speaks the same API with a pooled ``aiohttp`` session:
  real async and connection reuse, for production.

Both bound every call with a timeout and translate everything into the ``gateway.sms.base``
tree. Whether a failure is worth retrying is decided here, once:

=====================  ==============================================  ==========
what                   AT says                                         retryable
=====================  ==============================================  ==========
accepted               statusCode 100 Processed, 101 Sent, 102 Queued  (sent)
provider trouble       500 InternalServerError, 501 GatewayError,      yes
                       HTTP 5xx/429, timeouts, connection errors,
                       a 2xx we cannot read
out of credit          405 InsufficientBalance                         yes: a top-up fixes it
                                                                       and a token must arrive
credentials refused    HTTP 401/403 (the SDK hides the status: any     yes: an operator fixes
                       SDK ``AfricasTalkingException``)                it; the outbox caps tries
this message refused   401 RiskHold, 402 InvalidSenderId,              no
                       403 InvalidPhoneNumber, 404 UnsupportedNumber-
                       Type, 406 UserInBlacklist, 407 CouldNotRoute,
                       409 DoNotDisturbRejection, 502 RejectedByGateway,
                       HTTP 400
=====================  ==============================================  ==========

A retried send after a timeout may deliver the SMS twice (AT's SMS API takes no idempotency
key); for a token SMS a duplicate is harmless, a missing one is not.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any, Final

import aiohttp
import structlog
from africastalking.Service import AfricasTalkingException
from africastalking.SMS import SMSService

from gateway.phone import Msisdn, masked
from gateway.sms import base
from gateway.sms.base import (
    DeliveryReport,
    DeliveryState,
    SentMessage,
    SmsRejected,
    SmsUnavailable,
)

log = structlog.get_logger()

PROVIDER: Final = "africastalking"
LIVE_URL: Final = "https://api.africastalking.com/version1"
SANDBOX_URL: Final = "https://api.sandbox.africastalking.com/version1"

_ACCEPTED: Final = {100: DeliveryState.QUEUED, 101: DeliveryState.SENT, 102: DeliveryState.QUEUED}
_RETRYABLE_CODES: Final = frozenset({405, 500, 501})
_DELIVERY_STATES: Final = {
    "Sent": DeliveryState.SENT,
    "Submitted": DeliveryState.SENT,
    "Buffered": DeliveryState.SENT,
    "Success": DeliveryState.DELIVERED,
    "Failed": DeliveryState.FAILED,
    "AbsentSubscriber": DeliveryState.FAILED,
    "Expired": DeliveryState.FAILED,
    "Rejected": DeliveryState.REJECTED,
}


class MalformedDeliveryReport(base.MalformedDeliveryReport):
    """An Africa's Talking delivery report we cannot read; ``field`` names what is wrong."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message, field=field, provider=PROVIDER)


def interpret_send_response(body: object, to: Msisdn) -> SentMessage:
    """Read AT's send response (``SMSMessageData.Recipients[]``) for recipient ``to``.

    Raises:
        SmsRejected: AT refused this message for good (the status code says which).
        SmsUnavailable: AT could not take it now, or the answer cannot be read.
    """
    try:
        data: Any = body["SMSMessageData"]  # type: ignore[index]
        recipients = data["Recipients"]
        summary = str(data.get("Message", ""))
    except (KeyError, TypeError) as exc:
        raise SmsUnavailable("unreadable send response", provider=PROVIDER) from exc
    if not isinstance(recipients, list) or not recipients:
        # AT answers an empty list with the reason in Message (e.g. "InvalidSenderId").
        raise SmsRejected(f"no recipient accepted: {summary[:80]!r}", provider=PROVIDER)
    entry = next((r for r in recipients if isinstance(r, dict) and r.get("number") == to), None)
    if entry is None:
        entry = recipients[0] if isinstance(recipients[0], dict) else {}
    try:
        code = int(entry.get("statusCode", -1))
    except (TypeError, ValueError):
        code = -1
    status = str(entry.get("status", ""))[:40]
    if code in _ACCEPTED:
        message_id = str(entry.get("messageId", ""))
        if not message_id or message_id == "None":
            raise SmsUnavailable(f"accepted ({code}) without a messageId", provider=PROVIDER)
        cost = entry.get("cost")
        return SentMessage(
            provider_message_id=message_id,
            state=_ACCEPTED[code],
            cost=str(cost)[:32] if cost is not None else None,
        )
    if code in _RETRYABLE_CODES:
        raise SmsUnavailable(f"statusCode {code} {status}", provider=PROVIDER)
    if code == -1:
        raise SmsUnavailable(f"recipient without statusCode: {status!r}", provider=PROVIDER)
    raise SmsRejected(f"statusCode {code} {status}", provider=PROVIDER)


class AfricasTalkingSdkSender:
    """``SmsSender`` on the official SDK, run in a worker thread, bounded by ``timeout_s``.

    Args:
        username: AT app username (``sandbox`` for the sandbox).
        api_key: AT API key; never logged.
        sender_id: registered shortcode or alphanumeric sender; None for AT's default.
        base_url: override the SDK's host (the simulator: ``http://127.0.0.1:PORT/version1``).
        timeout_s: the whole send, connect included.
    """

    def __init__(
        self,
        username: str,
        api_key: str,
        *,
        sender_id: str | None = None,
        base_url: str | None = None,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 3.05,
    ) -> None:
        self._service = SMSService(username, api_key)
        if base_url is not None:
            # The SDK's only hook: private attributes read on every call (docs/protocols.md §1.5).
            self._service._baseUrl = base_url  # noqa: SLF001
            self._service._contentUrl = base_url  # noqa: SLF001
        self._sender_id = sender_id
        self._timeout_s = timeout_s
        self._sdk_timeout = (connect_timeout_s, max(0.1, timeout_s - connect_timeout_s))

    async def send(self, to: Msisdn, text: str) -> SentMessage:
        """Send ``text`` to ``to`` through the SDK. See the module table for errors."""
        try:
            async with asyncio.timeout(self._timeout_s + 0.5):
                body = await asyncio.to_thread(
                    self._service.send, text, [to], self._sender_id, timeout=self._sdk_timeout
                )
        except AfricasTalkingException as exc:
            # Any non-2xx; the SDK keeps only the body, so 401 and 500 look alike: retry.
            raise SmsUnavailable(f"HTTP error: {str(exc)[:80]!r}", provider=PROVIDER) from exc
        except ValueError as exc:  # the SDK's own phone-number check
            raise SmsRejected(f"invalid recipient {masked(to)}", provider=PROVIDER) from exc
        except (TimeoutError, OSError) as exc:  # requests' errors are OSErrors
            raise SmsUnavailable(f"{type(exc).__name__} talking to AT", provider=PROVIDER) from exc
        if isinstance(body, str):  # a 2xx whose Content-Type was not exactly application/json
            try:
                body = json.loads(body)
            except ValueError as exc:
                raise SmsUnavailable("non-JSON send response", provider=PROVIDER) from exc
        sent = interpret_send_response(body, to)
        log.info("sms_sent", provider=PROVIDER, to=masked(to), message_id=sent.provider_message_id)
        return sent


class AfricasTalkingHttpSender:
    """``SmsSender`` speaking AT's HTTP API directly over a pooled ``aiohttp`` session.

    Args:
        session: a long-lived ``ClientSession`` owned by the caller (its connector pools
            connections); see :meth:`create` for one the sender owns.
        username, api_key, sender_id: as for :class:`AfricasTalkingSdkSender`.
        base_url: ``LIVE_URL``, ``SANDBOX_URL`` or the simulator's ``…/version1``.
        timeout_s: the whole send.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        username: str,
        api_key: str,
        *,
        sender_id: str | None = None,
        base_url: str = LIVE_URL,
        timeout_s: float = 10.0,
    ) -> None:
        self._session = session
        self._owns_session = False
        self._username = username
        self._headers = {"apiKey": api_key, "Accept": "application/json"}
        self._sender_id = sender_id
        self._url = base_url.rstrip("/") + "/messaging"
        self._timeout_s = timeout_s

    @classmethod
    def create(
        cls,
        username: str,
        api_key: str,
        *,
        sender_id: str | None = None,
        base_url: str = LIVE_URL,
        timeout_s: float = 10.0,
        pool_size: int = 16,
    ) -> AfricasTalkingHttpSender:
        """A sender with its own pooled session; call :meth:`close` when done."""
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=pool_size))
        sender = cls(
            session,
            username,
            api_key,
            sender_id=sender_id,
            base_url=base_url,
            timeout_s=timeout_s,
        )
        sender._owns_session = True
        return sender

    async def close(self) -> None:
        """Close the session if this sender created it."""
        if self._owns_session:
            await self._session.close()

    async def send(self, to: Msisdn, text: str) -> SentMessage:
        """POST ``/messaging`` and read the recipient's status. See the module table for errors."""
        form = {"username": self._username, "to": to, "message": text, "bulkSMSMode": "1"}
        if self._sender_id is not None:
            form["from"] = self._sender_id
        try:
            async with (
                asyncio.timeout(self._timeout_s),
                self._session.post(self._url, data=form, headers=self._headers) as response,
            ):
                status = response.status
                raw = await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise SmsUnavailable(f"{type(exc).__name__} talking to AT", provider=PROVIDER) from exc
        if status == 400:
            raise SmsRejected(f"HTTP 400: {raw[:80]!r}", provider=PROVIDER)
        if not 200 <= status < 300:
            # 401/403 (credentials), 429, 5xx: nothing about this message is wrong; retry.
            raise SmsUnavailable(f"HTTP {status}: {raw[:80]!r}", provider=PROVIDER)
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise SmsUnavailable("non-JSON send response", provider=PROVIDER) from exc
        sent = interpret_send_response(body, to)
        log.info("sms_sent", provider=PROVIDER, to=masked(to), message_id=sent.provider_message_id)
        return sent


def parse_delivery_report(form: Mapping[str, str], *, raw: bytes = b"") -> DeliveryReport:
    """AT's delivery-report callback (form fields ``id``, ``status``, ``failureReason`` …).

    ``Sent``/``Submitted``/``Buffered`` → SENT; ``Success`` → DELIVERED; ``Failed``,
    ``AbsentSubscriber``, ``Expired`` → FAILED; ``Rejected`` → REJECTED.

    Raises:
        MalformedDeliveryReport: ``id`` is missing or ``status`` is not one AT documents.
    """
    message_id = form.get("id", "")
    if not message_id or len(message_id) > 100 or not message_id.isprintable():
        raise MalformedDeliveryReport("delivery report without a usable id", field="id")
    status = form.get("status", "")
    state = _DELIVERY_STATES.get(status)
    if state is None:
        raise MalformedDeliveryReport(f"unknown delivery status {status[:40]!r}", field="status")
    reason = form.get("failureReason") or None
    return DeliveryReport(
        provider_message_id=message_id,
        state=state,
        failure_reason=reason[:100] if reason else None,
        raw=raw,
    )
