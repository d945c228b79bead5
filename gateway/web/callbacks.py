"""Mobile-money callback routes: translate provider HTTP into ``PaymentEvents`` calls and back.

A callback is a claim, never proof: these handlers only parse it with the provider's adapter and
hand the notice to the saga (``PaymentEvents.on_payment_notice``), which confirms it with
``query_status`` before anything is vended. Whatever happens, the provider gets the answer it
expects, so that it stops retrying: a forged or malformed body is logged as a security event with
the raw payload and acknowledged, and nothing else happens. Only when the saga could not record a
notice at all (a ``GatewayError`` such as ``LedgerError``) do we answer 503, so the provider sends
it again.

Routes (mounted by ``gateway/app.py``; ``<secret>`` is the configured callback secret)::

    POST      /payments/<daraja>/<secret>/stk                 STK callbacks (CallBackURL)
    POST      /payments/<daraja>/<secret>/c2b/validation      C2B validation: accept or reject
    POST      /payments/<daraja>/<secret>/c2b/confirmation    C2B confirmation: a claim
    POST      /payments/<daraja>/<secret>/status/result       Transaction Status results
    POST      /payments/<daraja>/<secret>/status/timeout      Transaction Status queue timeouts
    PUT|POST  /payments/<momo>/<secret>/callback              MoMo request-to-pay callbacks
    POST      /payments/<airtel>/<secret>/callback            Airtel callbacks (and any other)

A wrong secret is answered 404 (and logged: someone is probing); a source address outside
``allow_from`` is answered 403 (and logged). ``<daraja>`` etc. are the keys of ``providers``.
Behind a reverse proxy ``request.remote`` is the proxy unless the app trusts forwarded headers;
the proxy's own allowlist (``deploy/``) is then the one that counts.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final

import structlog
from aiohttp import web

from gateway.errors import GatewayError
from gateway.payments.base import (
    CallbackAck,
    CustomerPaymentRefusal,
    ForgedCallback,
    PaybillProvider,
    PaymentEvents,
    PaymentNotice,
    PaymentProvider,
    StatusResultOutcome,
)
from gateway.web.keys import METRICS

log = structlog.get_logger()

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Background = Callable[[Callable[[], Awaitable[None]]], None]
"""Runs work after the route answered (``FollowUps.spawn``: tracked, drained on shutdown)."""

MAX_LOGGED_PAYLOAD: Final = 4096  # bytes of a suspicious body kept in the security log


def _answer(ack: CallbackAck) -> web.Response:
    return web.Response(status=ack.status, body=ack.body, content_type=ack.content_type)


def _raw(body: bytes) -> str:
    return body[:MAX_LOGGED_PAYLOAD].decode("utf-8", "replace")


def _security_event(event: str, request: web.Request, provider: str, **fields: object) -> None:
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.security_events.labels(kind=event).inc()
    log.warning(
        event,
        security_event=True,
        provider=provider,
        remote=request.remote,
        method=request.method,
        **fields,
    )


def _forged(request: web.Request, provider: str, body: bytes, reason: str) -> None:
    _security_event("payment_callback_forged", request, provider, reason=reason, raw=_raw(body))


def payment_routes(
    providers: Mapping[str, PaymentProvider],
    events: PaymentEvents,
    *,
    secret: str,
    allow_from: Sequence[Network] | None = None,
    background: Background | None = None,
) -> list[web.RouteDef]:
    """Every provider's callback routes under ``/payments/<name>/<secret>/…``.

    Args:
        providers: the adapters by the name used in their URLs (``daraja``, ``momo``, ``airtel``).
        events: where notices go (the purchase saga).
        secret: the unguessable path segment; compared in constant time.
        allow_from: when given, only these source networks may call back (others get 403).
        background: where a C2B confirmation's check and vend run once the claim is recorded
            (the route answers Daraja at once); None: before the route answers.

    Raises:
        ValueError: ``secret`` is empty.
    """
    if not secret:
        raise ValueError("the callback secret must not be empty")
    expected = secret.encode()

    def guarded(name: str, handler: Handler) -> Handler:
        async def guard(request: web.Request) -> web.StreamResponse:
            presented = request.match_info["secret"].encode()
            if not hmac.compare_digest(presented, expected):
                _security_event("payment_callback_wrong_secret", request, name)
                raise web.HTTPNotFound
            if allow_from is not None and not _allowed(request.remote, allow_from):
                _security_event("payment_callback_source_refused", request, name)
                raise web.HTTPForbidden
            return await handler(request)

        return guard

    routes: list[web.RouteDef] = []
    for name, provider in providers.items():
        base = f"/payments/{name}/{{secret}}"
        if isinstance(provider, PaybillProvider):
            paybill = _PaybillRoutes(name, provider, events, background)
            routes += [
                web.post(f"{base}/stk", guarded(name, paybill.stk)),
                web.post(f"{base}/c2b/validation", guarded(name, paybill.validation)),
                web.post(f"{base}/c2b/confirmation", guarded(name, paybill.confirmation)),
                web.post(f"{base}/status/result", guarded(name, paybill.status_result)),
                web.post(f"{base}/status/timeout", guarded(name, paybill.status_timeout)),
            ]
        else:
            handler = guarded(name, _notice_handler(name, provider, events))
            routes += [web.post(f"{base}/callback", handler), web.put(f"{base}/callback", handler)]
    return routes


def _allowed(remote: str | None, networks: Sequence[Network]) -> bool:
    if remote is None:
        return False
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return False
    return any(address in network for network in networks)


async def _hand_over(
    request: web.Request,
    name: str,
    notice: PaymentNotice,
    events: PaymentEvents,
    ack: CallbackAck,
    background: Background | None = None,
) -> web.Response:
    """Give ``notice`` to the saga; 503 only when it could not be recorded (provider retries).

    With ``background`` the saga answers once the claim is recorded and confirms it there.
    """
    try:
        await events.on_payment_notice(notice, background=background)
    except GatewayError as exc:
        log.exception(
            "payment_notice_not_recorded",
            provider=name,
            reference=notice.reference,
            error=str(exc),
            retryable=exc.retryable,
        )
        return web.Response(status=503, text="try again later\n")
    log.info(
        "payment_notice_received",
        provider=name,
        reference=notice.reference,
        claimed_state=str(notice.claimed_state),
        remote=request.remote,
    )
    return _answer(ack)


def _notice_handler(name: str, provider: PaymentProvider, events: PaymentEvents) -> Handler:
    async def callback(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            notice = provider.parse_callback(body, request.headers)
        except ForgedCallback as exc:
            _security_event(
                "payment_callback_forged", request, name, reason=str(exc), raw=_raw(body)
            )
            return _answer(provider.acknowledgement())
        return await _hand_over(request, name, notice, events, provider.acknowledgement())

    return callback


class _PaybillRoutes:
    """Daraja's five callback kinds, each with the answer Daraja expects."""

    def __init__(
        self,
        name: str,
        provider: PaybillProvider,
        events: PaymentEvents,
        background: Background | None,
    ) -> None:
        self._name = name
        self._provider = provider
        self._events = events
        self._background = background

    def _forged(self, request: web.Request, body: bytes, reason: str) -> None:
        _security_event(
            "payment_callback_forged", request, self._name, reason=reason, raw=_raw(body)
        )

    async def _notice(
        self, request: web.Request, *, customer_initiated: bool, ack: CallbackAck
    ) -> web.StreamResponse:
        body = await request.read()
        try:
            notice = self._provider.parse_callback(body, request.headers)
        except ForgedCallback as exc:
            self._forged(request, body, str(exc))
            return _answer(ack)
        if notice.is_customer_initiated != customer_initiated:
            kind = "a C2B confirmation" if notice.is_customer_initiated else "an STK callback"
            self._forged(request, body, f"{kind} posted to the wrong route")
            return _answer(ack)
        background = self._background if customer_initiated else None
        return await _hand_over(request, self._name, notice, self._events, ack, background)

    async def stk(self, request: web.Request) -> web.StreamResponse:
        """An STK callback: a claim about a push we sent."""
        ack = self._provider.acknowledgement()
        return await self._notice(request, customer_initiated=False, ack=ack)

    async def confirmation(self, request: web.Request) -> web.StreamResponse:
        """A C2B confirmation: money was taken for the account (meter) the customer typed.

        Answered as soon as the claim is recorded; Daraja's record of it, the purchase and the
        vend follow in the background (when the app gave one).
        """
        ack = self._provider.customer_confirmation_answer()
        return await self._notice(request, customer_initiated=True, ack=ack)

    async def validation(self, request: web.Request) -> web.StreamResponse:
        """A C2B validation: accept or reject before money moves (unknown meter, amount)."""
        body = await request.read()
        try:
            notice = self._provider.parse_customer_validation(body)
        except ForgedCallback as exc:
            self._forged(request, body, str(exc))
            return _answer(self._provider.customer_validation_answer(CustomerPaymentRefusal.OTHER))
        assert notice.amount is not None  # noqa: S101 - parse_customer_validation always sets it
        try:
            refusal = await self._events.validate_customer_payment(
                self._provider.name,
                notice.account_reference or "",
                notice.amount,
                notice.payer,
                reference=notice.reference,
            )
        except GatewayError as exc:
            # We cannot check the meter now: refusing is safe, no money has moved yet.
            log.exception("c2b_validation_failed", provider=self._name, error=str(exc))
            refusal = CustomerPaymentRefusal.OTHER
        log.info(
            "c2b_validated",
            provider=self._name,
            reference=notice.reference,
            account=notice.account_reference,
            refusal=refusal,
        )
        return _answer(self._provider.customer_validation_answer(refusal))

    async def status_result(self, request: web.Request) -> web.StreamResponse:
        """A Transaction Status result: handed to the query that asked for it, else an event.

        Results bound to no outstanding query of ours are ``transaction_status_result_unmatched``
        and those naming another transaction ``transaction_status_result_contradicted``.
        """
        body = await request.read()
        try:
            outcome = await self._provider.deliver_status_result(body)
        except ForgedCallback as exc:
            self._forged(request, body, str(exc))
        else:
            if outcome in {StatusResultOutcome.DELIVERED, StatusResultOutcome.HELD}:
                log.info("transaction_status_result_received", provider=self._name, outcome=outcome)
            else:
                # No outstanding query of ours asked for it (or it names another transaction):
                # never proof. A genuine late result lands here too; a burst is an attack.
                _security_event(
                    f"transaction_status_result_{outcome}",
                    request,
                    self._name,
                    raw=_raw(body),
                )
        return _answer(self._provider.acknowledgement())

    async def status_timeout(self, request: web.Request) -> web.StreamResponse:
        """Daraja's queue timeout for a Transaction Status query: the query will time out too."""
        body = await request.read()
        log.warning("transaction_status_queue_timeout", provider=self._name, raw=_raw(body))
        return _answer(self._provider.acknowledgement())


__all__ = ["payment_routes"]
