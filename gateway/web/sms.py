"""Inbound SMS from Africa's Talking: acknowledge at once, answer by SMS afterwards.

AT posts each incoming message as a form (``from``, ``to``, ``text``, ``id``, ``date``,
``linkId``, ``networkCode``; docs/protocols.md §1.2). The route answers 200 straight away; the
command runs as a follow-up, its reply is queued through ``CustomerServices.send_sms`` (the
outbox), and only then does any payment prompt start. AT's ``id`` deduplicates redeliveries
(kept in the session store for ``dedupe_ttl_s``) and keys the purchase, so one SMS never buys
twice.

Route (mounted by ``gateway/app.py``)::

    POST / sms / africastalking / inbound
"""

from __future__ import annotations

import uuid
from typing import Final

import structlog
from aiohttp import web

from flows.ports import SessionStore
from flows.sms_commands import SmsCommands
from gateway.phone import InvalidPhoneNumber, Msisdn, masked, parse_msisdn
from gateway.web.ussd import FollowUps

log = structlog.get_logger()

_MAX_TEXT: Final = 1600  # ten concatenated segments; longer is not an SMS


def sms_routes(
    commands: SmsCommands,
    follow_ups: FollowUps,
    store: SessionStore,
    *,
    path: str = "/sms/africastalking/inbound",
    default_region: str = "KE",
    dedupe_ttl_s: float = 86_400.0,
) -> list[web.RouteDef]:
    """The inbound-SMS route.

    Args:
        commands: the SMS command interpreter (its services send the replies).
        follow_ups: runs each command, its reply and any payment prompt after the 200.
        store: remembers AT message ids already handled.
        path: the route.
        default_region: for numbers AT sends without a country code (it should not).
        dedupe_ttl_s: how long a message id is remembered.
    """

    async def inbound(request: web.Request) -> web.StreamResponse:
        try:
            form = await request.post()
        except ValueError:
            return web.Response(status=400, text="unreadable body\n")
        sender, body, message_id = form.get("from"), form.get("text"), form.get("id")
        if not isinstance(sender, str) or not isinstance(body, str):
            return web.Response(status=400, text="from and text are required\n")
        try:
            phone = parse_msisdn(sender[:32], default_region)
        except InvalidPhoneNumber:
            log.warning("sms_inbound_bad_sender")
            return web.Response(text="")  # nobody to answer; AT must not retry
        if isinstance(message_id, str) and message_id and len(message_id) <= 100:
            if not await store.add(f"sms:in:{message_id}", "1", dedupe_ttl_s):
                log.info("sms_inbound_duplicate", message_id=message_id)
                return web.Response(text="")
        else:
            message_id = f"local-{uuid.uuid4().hex}"
        structlog.contextvars.bind_contextvars(channel="sms", message_id=message_id)
        log.info("sms_inbound", sender=masked(phone), chars=len(body))
        follow_ups.spawn(_Answer(commands, phone, body[:_MAX_TEXT], message_id), what="sms_command")
        return web.Response(text="")

    return [web.post(path, inbound)]


class _Answer:
    """Run one SMS command, queue its reply, then start any payment prompt."""

    def __init__(self, commands: SmsCommands, phone: Msisdn, text: str, message_id: str) -> None:
        self._commands = commands
        self._phone = phone
        self._text = text
        self._message_id = message_id

    async def __call__(self) -> None:
        outcome = await self._commands.handle(self._phone, self._text, self._message_id)
        if outcome.reply is not None:
            await self._commands.services.send_sms(self._phone, outcome.reply)
        if outcome.follow_up is not None:
            await outcome.follow_up()
