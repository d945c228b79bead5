"""SMS delivery reports from Africa's Talking, handed to the ledger.

AT posts a form per status change (``id``, ``status``, ``phoneNumber``, ``networkCode``,
``failureReason``, ``retryCount``; docs/protocols.md §1.2), possibly late, duplicated or out of
order: the ledger's ``apply_delivery_report`` must tolerate all three. Unknown ids are the
ledger's business too; this route answers 200 for anything it could read, 400 for what it
could not, and 503 only when the ledger asks for a retry (``retryable``).

Route (mounted by ``gateway/app.py``)::

    POST / sms / africastalking / delivery
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from gateway.errors import GatewayError
from gateway.sms.base import DeliveryReport, DeliveryReportParser, MalformedDeliveryReport

log = structlog.get_logger()

ApplyReport = Callable[[DeliveryReport], Awaitable[object]]
"""The ledger's ``apply_delivery_report``: idempotent, tolerant of unknown ids and disorder."""


def delivery_routes(
    apply: ApplyReport,
    *,
    parse: DeliveryReportParser,
    path: str = "/sms/africastalking/delivery",
) -> list[web.RouteDef]:
    """The delivery-report route; ``parse`` reads each report, ``apply`` records it.

    ``parse`` is the SMS adapter's parser (``gateway.sms.africastalking.parse_delivery_report``),
    handed over by the composition root.
    """

    async def delivery(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            form = await request.post()
        except ValueError:
            return web.Response(status=400, text="unreadable body\n")
        fields = {key: value for key, value in form.items() if isinstance(value, str)}
        try:
            report = parse(fields, raw=raw[:4096])
        except MalformedDeliveryReport as exc:
            log.warning("delivery_report_malformed", field=exc.field)
            return web.Response(status=400, text=f"{exc.field} missing or malformed\n")
        try:
            await apply(report)
        except GatewayError as exc:
            log.warning(
                "delivery_report_not_applied",
                message_id=report.provider_message_id,
                error=type(exc).__name__,
                retryable=exc.retryable,
            )
            if exc.retryable:
                return web.Response(status=503, text="try again later\n")
            return web.Response(text="")
        log.info(
            "delivery_report_received",
            message_id=report.provider_message_id,
            state=report.state.value,
            reason=report.failure_reason,
        )
        return web.Response(text="")

    return [web.post(path, delivery)]
