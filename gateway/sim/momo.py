"""A faithful MTN MoMo Collection simulator (``docs/protocols.md`` §3.1, §6.4).

- provisioning as in the sandbox: ``POST /v1_0/apiuser`` (``X-Reference-Id``,
  ``providerCallbackHost``), ``GET /v1_0/apiuser/{id}``, ``POST /v1_0/apiuser/{id}/apikey``;
- ``POST /collection/token/`` (Basic api user:key and the subscription key);
- ``POST /collection/v1_0/requesttopay``: checks the subscription key, the token, a UUID
  ``X-Reference-Id`` (a reused one is ``409 RESOURCE_ALREADY_EXIST``), ``X-Target-Environment``
  and its currency (the sandbox takes EUR only), notes of at most 160 characters without
  apostrophes, an ``X-Callback-Url`` whose host is the API user's ``providerCallbackHost``;
  answers **202 with an empty body**; then the payer acts and the callback goes out (``PUT``);
- ``GET /collection/v1_0/requesttopay/{id}``: 200 with ``status`` and ``reason``, 404 if unknown;
- ``GET /_sim/ledger`` and ``GET /_sim/callbacks``; the demo's controls: ``GET|POST /_sim/faults``,
  ``POST /_sim/callbacks/release``, ``POST /_sim/payers`` (``{"msisdn", "action"}``),
  ``POST /_sim/payers/answer``, ``POST /_sim/requests/expire``, ``POST /_sim/release`` (hung calls).

The sandbox's documented test numbers decide outcomes (``SANDBOX_NUMBERS``); any other number
pays at once, unless ``set_payer`` says otherwise. Fault knobs are on ``MomoSimulator.faults``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from gateway.money import Money
from gateway.sim.courier import (
    CallbackFaults,
    Charge,
    Courier,
    MoneyRecord,
    ProviderSimulator,
    TaskKeeper,
    add_control_routes,
    read_json_object,
)

log = structlog.get_logger()


class PayerAction(StrEnum):
    """What the simulated payer does with a request-to-pay."""

    APPROVE = "approve"  # SUCCESSFUL
    FAIL = "fail"  # FAILED, INTERNAL_PROCESSING_ERROR
    REJECT = "reject"  # FAILED, APPROVAL_REJECTED
    NOT_ENOUGH_FUNDS = "not_enough_funds"  # FAILED, NOT_ENOUGH_FUNDS
    TIMEOUT = "timeout"  # PENDING until expired, then FAILED, COULD_NOT_PERFORM_TRANSACTION
    PENDING = "pending"  # PENDING forever


SANDBOX_NUMBERS: Final[dict[str, PayerAction]] = {
    "46733123450": PayerAction.FAIL,
    "46733123451": PayerAction.REJECT,
    "46733123452": PayerAction.TIMEOUT,
    "56733123453": PayerAction.APPROVE,
    "46733123454": PayerAction.PENDING,
}
"""The test numbers MoMo's sandbox documentation cites, and what they do."""

_REASONS: Final[dict[PayerAction, str]] = {
    PayerAction.FAIL: "INTERNAL_PROCESSING_ERROR",
    PayerAction.REJECT: "APPROVAL_REJECTED",
    PayerAction.NOT_ENOUGH_FUNDS: "NOT_ENOUGH_FUNDS",
    PayerAction.TIMEOUT: "COULD_NOT_PERFORM_TRANSACTION",
}


@dataclass(slots=True, kw_only=True)
class MomoFaults:
    """Knobs for tests and the demo; mutate them at any time."""

    callbacks: CallbackFaults = field(default_factory=CallbackFaults)
    hold_payers: bool = False  # payers act only when ``answer_payers()`` is called
    tamper_amount: str | None = None  # callbacks claim this ``amount`` (money taken is real)
    request_errors: int = 0  # the next N request-to-pay calls answer 503 (nothing recorded)
    hang_requests: bool = False  # request-to-pay is recorded, then the answer hangs
    query_errors: int = 0  # the next N status calls answer 500
    hang_queries: bool = False  # status calls hang until ``release()``


@dataclass(slots=True, kw_only=True)
class _Request:
    reference: str
    body: dict[str, Any]
    callback_url: str | None
    status: str = "PENDING"
    reason: str | None = None
    financial_id: str | None = None


def _json(payload: object, *, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload, separators=(",", ":")).encode(),
        content_type="application/json",
    )


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"code": code, "message": message}, status=status)


class MomoSimulator(ProviderSimulator):
    """MTN MoMo Collection on loopback. Serve ``.app``.

    Args:
        subscription_key: the ``Ocp-Apim-Subscription-Key`` it accepts.
        api_user, api_key: a provisioned API user (more can be made through ``/v1_0/apiuser``).
        callback_host: that user's ``providerCallbackHost``.
        target_environment, currency: the environment and the only currency it takes.
        token_ttl_s: access token lifetime. callback_method: ``PUT`` (usual) or ``POST``.
        answer_delay_s: real seconds a payer takes (demo); 0 answers at once.
        approval_timeout_s: real seconds before an unanswered TIMEOUT request fails
            (MoMo: about 5 minutes); ``None``: only when ``expire_requests()`` is called.
        clock: monotonic seconds for token expiry. seed: reproducible ids.
    """

    def __init__(  # noqa: PLR0913 - every knob is keyword-only with a default
        self,
        *,
        subscription_key: str = "sim-subscription-key",
        api_user: str = "0b0c7a38-5f1e-4d3c-9b0e-5a2f8e1d7c64",
        api_key: str = "sim-api-key",
        callback_host: str = "127.0.0.1",
        target_environment: str = "sandbox",
        currency: str = "EUR",
        token_ttl_s: float = 3600.0,
        callback_method: Literal["PUT", "POST"] = "PUT",
        answer_delay_s: float = 0.0,
        approval_timeout_s: float | None = 300.0,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        self.subscription_key = subscription_key
        self.api_user = api_user
        self.api_key = api_key
        self.target_environment = target_environment
        self.currency = currency
        self.token_ttl_s = token_ttl_s
        self.callback_method = callback_method
        self.answer_delay_s = answer_delay_s
        self.approval_timeout_s = approval_timeout_s
        self.faults = MomoFaults()
        self.money = MoneyRecord()
        self.token_grants = 0
        self.requests: dict[str, _Request] = {}
        self._users: dict[str, dict[str, str]] = {
            api_user: {"providerCallbackHost": callback_host, "apiKey": api_key}
        }
        self._payers: dict[str, PayerAction] = dict(SANDBOX_NUMBERS)
        self._tokens: dict[str, float] = {}
        self._clock = clock
        self._random = random.Random(seed)  # ids for a simulator, not secrets
        self._tasks = TaskKeeper()
        self.courier = Courier(self.faults.callbacks, self._tasks, provider="momo-sim")
        self._released = asyncio.Event()
        self._timers: list[asyncio.TimerHandle] = []
        self.app = self._build_app()

    def _build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1_0/apiuser", self._create_user)
        app.router.add_get("/v1_0/apiuser/{user}", self._get_user)
        app.router.add_post("/v1_0/apiuser/{user}/apikey", self._create_key)
        app.router.add_post("/collection/token/", self._token)
        app.router.add_post("/collection/v1_0/requesttopay", self._request_to_pay)
        app.router.add_get("/collection/v1_0/requesttopay/{reference}", self._status)
        app.router.add_get("/_sim/ledger", self._ledger)
        app.router.add_post("/_sim/payers", self._set_payer)
        app.router.add_post("/_sim/payers/answer", self._answer_payers)
        app.router.add_post("/_sim/requests/expire", self._expire)
        app.router.add_post("/_sim/release", self._release)
        add_control_routes(app, self)
        app.cleanup_ctx.append(self._lifetime)
        return app

    async def _lifetime(self, _app: web.Application) -> Any:  # noqa: ANN401 - aiohttp's cleanup_ctx
        await self.courier.open()
        yield
        self._released.set()
        for timer in self._timers:
            timer.cancel()
        await self._tasks.close()
        await self.courier.close()

    # -- knobs and inspection ------------------------------------------------------------------

    def set_payer(self, msisdn: str, action: PayerAction) -> None:
        """Decide what the payer ``msisdn`` (``256…`` or ``+256…``) does with requests."""
        self._payers[msisdn.removeprefix("+")] = action

    def release(self) -> None:
        """Let hanging requests and status calls answer."""
        self._released.set()

    async def answer_payers(self) -> None:
        """Every pending request is answered now by its payer (held ones included)."""
        for request in list(self.requests.values()):
            self._answer(request)
        await self.settle()

    async def expire_requests(self) -> None:
        """Every request still pending times out now (about five minutes on MoMo)."""
        for request in list(self.requests.values()):
            if request.status == "PENDING":
                self._finish(request, PayerAction.TIMEOUT)
        await self.settle()

    # -- provisioning and tokens -----------------------------------------------------------------

    def _subscribed(self, request: web.Request) -> bool:
        return request.headers.get("Ocp-Apim-Subscription-Key") == self.subscription_key

    @staticmethod
    def _denied() -> web.Response:
        return _json(
            {
                "statusCode": 401,
                "message": "Access denied due to invalid subscription key. Make sure to provide a"
                " valid key for an active subscription.",
            },
            status=401,
        )

    async def _create_user(self, request: web.Request) -> web.Response:
        if not self._subscribed(request):
            return self._denied()
        user = request.headers.get("X-Reference-Id", "")
        try:
            uuid.UUID(user)
            body = json.loads(await request.read())
            host = str(body["providerCallbackHost"])
        except (ValueError, KeyError, TypeError):
            return _error(400, "INVALID_REQUEST", "X-Reference-Id or providerCallbackHost")
        if user in self._users:
            return _error(409, "RESOURCE_ALREADY_EXIST", "Duplicated reference id.")
        self._users[user] = {"providerCallbackHost": host, "apiKey": ""}
        return web.Response(status=201)

    async def _get_user(self, request: web.Request) -> web.Response:
        user = self._users.get(request.match_info["user"])
        if not self._subscribed(request):
            return self._denied()
        if user is None:
            return _error(404, "RESOURCE_NOT_FOUND", "Requested resource was not found.")
        return _json(
            {
                "providerCallbackHost": user["providerCallbackHost"],
                "targetEnvironment": self.target_environment,
            }
        )

    async def _create_key(self, request: web.Request) -> web.Response:
        user = self._users.get(request.match_info["user"])
        if not self._subscribed(request):
            return self._denied()
        if user is None:
            return _error(404, "RESOURCE_NOT_FOUND", "Requested resource was not found.")
        user["apiKey"] = f"{self._random.getrandbits(128):032x}"
        return _json({"apiKey": user["apiKey"]}, status=201)

    def _basic_user(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        try:
            user, _, key = base64.b64decode(header.removeprefix("Basic ")).decode().partition(":")
        except ValueError:
            return None
        known = self._users.get(user)
        return user if known is not None and known["apiKey"] and known["apiKey"] == key else None

    async def _token(self, request: web.Request) -> web.Response:
        if not self._subscribed(request):
            return self._denied()
        user = self._basic_user(request)
        if user is None:
            return _error(401, "NOT_AUTHORIZED", "Authorization failed. Insufficient rights.")
        token = f"{self._random.getrandbits(256):064x}"
        self._tokens[token] = self._clock() + self.token_ttl_s
        self.token_grants += 1
        return _json(
            {
                "access_token": token,
                "token_type": "access_token",
                "expires_in": int(self.token_ttl_s),
            }
        )

    def expire_tokens(self) -> None:
        """Every token handed out so far is now expired (401 on next use)."""
        self._tokens.clear()

    def _authorised(self, request: web.Request) -> web.Response | None:
        if not self._subscribed(request):
            return self._denied()
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        expiry = self._tokens.get(token)
        if expiry is None or self._clock() >= expiry:
            return _error(401, "NOT_AUTHORIZED", "Access token is missing, invalid or expired.")
        if request.headers.get("X-Target-Environment") != self.target_environment:
            return _error(400, "INVALID_TARGET_ENVIRONMENT", "Unknown X-Target-Environment.")
        return None

    # -- request to pay --------------------------------------------------------------------------

    def _refusal(self, body: object, callback: str | None) -> web.Response | None:  # noqa: C901, PLR0911 - one answer per rule
        if not isinstance(body, dict):
            return _error(400, "INVALID_REQUEST", "Body is not a JSON object.")
        if body.get("currency") != self.currency:
            return _error(400, "INVALID_CURRENCY", "Currency not supported.")
        try:
            amount = Money.of(str(body.get("amount")), self.currency)
        except (ValueError, ArithmeticError):
            return _error(400, "INVALID_AMOUNT", "Amount is not valid.")
        if amount.amount_minor <= 0:
            return _error(400, "INVALID_AMOUNT", "Amount is not valid.")
        payer = body.get("payer")
        if not isinstance(payer, dict) or payer.get("partyIdType") != "MSISDN":
            return _error(400, "INVALID_PAYER", "Payer is not valid.")
        party = payer.get("partyId")
        if not isinstance(party, str) or not party.isdigit():
            return _error(400, "INVALID_PAYER", "Payer is not valid.")
        for key in ("payerMessage", "payeeNote"):
            note = body.get(key, "")
            if not isinstance(note, str) or len(note) > 160 or "'" in note:  # MoMo's limit
                return _error(400, "INVALID_REQUEST", f"{key} is not valid.")
        if callback is not None:
            host = urlsplit(callback).hostname
            allowed = {u["providerCallbackHost"] for u in self._users.values()}
            if not callback or host not in allowed:
                return _error(400, "INVALID_CALLBACK_URL_HOST", "Callback URL host is not valid.")
        return None

    async def _request_to_pay(self, request: web.Request) -> web.Response:
        denied = self._authorised(request)
        if denied is not None:
            return denied
        if self.faults.request_errors > 0:
            self.faults.request_errors -= 1
            return _error(503, "SERVICE_UNAVAILABLE", "Service is temporarily unavailable.")
        reference = request.headers.get("X-Reference-Id", "")
        try:
            uuid.UUID(reference)
        except ValueError:
            return _error(400, "INVALID_REFERENCE_ID", "X-Reference-Id is not a UUID.")
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        # Checked and taken with no await between: two requests racing with one reference (a
        # retry sent while the first is still in flight) get one 202 and one 409, as MoMo's
        # own resource store answers; never two charges.
        if reference in self.requests:
            return _error(
                409,
                "RESOURCE_ALREADY_EXIST",
                "Duplicated reference id. Creation of resource failed.",
            )
        callback = request.headers.get("X-Callback-Url")
        refusal = self._refusal(body, callback)
        if refusal is not None:
            return refusal
        record = _Request(reference=reference, body=body, callback_url=callback)
        self.requests[reference] = record
        if not self.faults.hold_payers:
            if self.answer_delay_s > 0:
                loop = asyncio.get_running_loop()
                self._timers.append(loop.call_later(self.answer_delay_s, self._answer, record))
            else:
                self._answer(record)
        if self.faults.hang_requests:
            self._released.clear()
            await self._released.wait()
        return web.Response(status=202)

    def _answer(self, record: _Request) -> None:
        if record.status != "PENDING":
            return
        payer = str(record.body["payer"]["partyId"])
        action = self._payers.get(payer, PayerAction.APPROVE)
        if action is PayerAction.TIMEOUT and self.approval_timeout_s is not None:
            loop = asyncio.get_running_loop()
            self._timers.append(
                loop.call_later(self.approval_timeout_s, self._finish, record, PayerAction.TIMEOUT)
            )
        if action in {PayerAction.TIMEOUT, PayerAction.PENDING}:
            return
        self._finish(record, action)

    def _finish(self, record: _Request, action: PayerAction) -> None:
        if record.status != "PENDING":
            return
        if action is PayerAction.APPROVE:
            record.status = "SUCCESSFUL"
            record.financial_id = str(self._random.randint(10**8, 10**9 - 1))
            amount = Money.of(str(record.body["amount"]), self.currency)
            self.money.take(
                Charge(
                    reference=record.reference,
                    receipt=record.financial_id,
                    msisdn=str(record.body["payer"]["partyId"]),
                    amount_minor=amount.amount_minor,
                    currency=self.currency,
                    account=str(record.body.get("externalId", "")),
                )
            )
        else:
            record.status = "FAILED"
            record.reason = _REASONS.get(action, "INTERNAL_PROCESSING_ERROR")
        if record.callback_url:
            body = self._view(record)
            if self.faults.tamper_amount is not None:
                body["amount"] = self.faults.tamper_amount
            raw = json.dumps(body, separators=(",", ":")).encode()
            self.courier.send(self.callback_method, record.callback_url, raw)

    def _view(self, record: _Request) -> dict[str, Any]:
        """The request as MoMo shows it in the status answer and the callback."""
        view: dict[str, Any] = {
            "financialTransactionId": record.financial_id,
            "externalId": record.body.get("externalId"),
            "amount": record.body.get("amount"),
            "currency": record.body.get("currency"),
            "payer": record.body.get("payer"),
            "payerMessage": record.body.get("payerMessage"),
            "payeeNote": record.body.get("payeeNote"),
            "status": record.status,
        }
        if record.financial_id is None:
            del view["financialTransactionId"]
        if record.reason is not None:
            view["reason"] = record.reason
        return view

    async def _status(self, request: web.Request) -> web.Response:
        denied = self._authorised(request)
        if denied is not None:
            return denied
        if self.faults.hang_queries:
            self._released.clear()
            await self._released.wait()
        if self.faults.query_errors > 0:
            self.faults.query_errors -= 1
            return _error(500, "INTERNAL_PROCESSING_ERROR", "An internal error occurred.")
        record = self.requests.get(request.match_info["reference"])
        if record is None:
            return _error(404, "RESOURCE_NOT_FOUND", "Requested resource was not found.")
        return _json(self._view(record))

    async def _ledger(self, _request: web.Request) -> web.Response:
        return _json(self.money.to_json())

    async def _set_payer(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        try:
            self.set_payer(str(body["msisdn"]), PayerAction(str(body["action"])))
        except (KeyError, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"msisdn and action ({list(PayerAction)})\n") from exc
        return _json({"msisdn": body["msisdn"], "action": body["action"]})

    async def _answer_payers(self, _request: web.Request) -> web.Response:
        await self.answer_payers()
        return _json({"ok": True})

    async def _expire(self, _request: web.Request) -> web.Response:
        await self.expire_requests()
        return _json({"ok": True})

    async def _release(self, _request: web.Request) -> web.Response:
        self.release()
        return _json({"ok": True})


__all__ = ["SANDBOX_NUMBERS", "MomoFaults", "MomoSimulator", "PayerAction"]
