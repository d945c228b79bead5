"""An Airtel Money collections simulator (``docs/protocols.md`` §3.2, §6.5).

- ``POST /auth/oauth2/token`` (JSON client credentials; short ``expires_in``, 180 s by default);
- ``POST /merchant/v1/payments/``: Bearer token, ``X-Country``/``X-Currency`` matching the wallet,
  a national ``msisdn`` (no country code), whole amounts, a unique ``transaction.id`` (a reused one
  is refused with ``ESB000041``); answers "in progress" (``DP00800001006``), then the payer acts
  and the callback ``{"transaction": {id, message, status_code, airtel_money_id}}`` is POSTed to
  ``callback_url`` (configured per app, as in Airtel's portal);
- ``GET /standard/v1/payments/{id}``: ``TS``/``TF``/``TIP`` with the response code;
- ``GET /_sim/ledger`` and ``GET /_sim/callbacks``; the demo's controls: ``GET|POST /_sim/faults``,
  ``POST /_sim/callbacks/release``, ``POST /_sim/payers`` (``{"msisdn", "action"}``),
  ``POST /_sim/payers/answer``, ``POST /_sim/payments/expire``, ``POST /_sim/release`` (hung calls).

The result and response codes are practitioner-sourced [P] (see the adapter). Airtel's callback
carries no amount, so there is no amount tampering here; ``faults.forge_success`` instead makes
callbacks claim success for payments that failed. Knobs are on ``AirtelSimulator.faults``.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import structlog
from aiohttp import web

from gateway.money import currency_exponent
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

_NATIONAL_LENGTH: Final = 9  # East African national significant numbers


class AirtelAction(StrEnum):
    """What the simulated payer does with the USSD push."""

    APPROVE = "approve"  # TS, DP00800001001
    WRONG_PIN = "wrong_pin"  # TF, DP00800001002
    NOT_ENOUGH_FUNDS = "not_enough_funds"  # TF, DP00800001007
    REFUSE = "refuse"  # TF, DP00800001008
    IGNORE = "ignore"  # TIP until expired, then TF, DP00800001024


_OUTCOMES: Final[dict[AirtelAction, tuple[str, str, str]]] = {
    AirtelAction.APPROVE: ("TS", "DP00800001001", "Transaction is successful"),
    AirtelAction.WRONG_PIN: ("TF", "DP00800001002", "Incorrect PIN"),
    AirtelAction.NOT_ENOUGH_FUNDS: ("TF", "DP00800001007", "Not enough balance"),
    AirtelAction.REFUSE: ("TF", "DP00800001008", "Refused by the payer"),
    AirtelAction.IGNORE: ("TF", "DP00800001024", "Transaction timed out"),
}


@dataclass(slots=True, kw_only=True)
class AirtelFaults:
    """Knobs for tests and the demo; mutate them at any time."""

    callbacks: CallbackFaults = field(default_factory=CallbackFaults)
    hold_payers: bool = False  # payers act only when ``answer_payers()`` is called
    forge_success: bool = False  # callbacks say TS whatever happened (money taken is real)
    request_errors: int = 0  # the next N payment requests answer 500 (nothing recorded)
    hang_requests: bool = False  # payment requests are recorded, then the answer hangs
    query_errors: int = 0  # the next N status calls answer 500
    hang_queries: bool = False  # status calls hang until ``release()``


@dataclass(slots=True, kw_only=True)
class _Payment:
    id: str
    msisdn: str
    amount: int
    reference: str
    status: str = "TIP"
    response_code: str = "DP00800001006"
    message: str = "Transaction in progress"
    airtel_money_id: str | None = None


def _json(payload: object, *, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload, separators=(",", ":")).encode(),
        content_type="application/json",
    )


def _status(
    *, success: bool, result_code: str, response_code: str = "", message: str = ""
) -> dict[str, Any]:
    return {
        "code": "200",
        "message": message or ("SUCCESS" if success else "FAILED"),
        "result_code": result_code,
        "response_code": response_code,
        "success": success,
    }


class AirtelSimulator(ProviderSimulator):
    """Airtel Money on loopback. Serve ``.app``; set ``callback_url`` as the app's portal does.

    Args:
        client_id, client_secret: the OAuth credentials it accepts.
        country, currency: the wallet's ``X-Country``/``X-Currency``.
        callback_url: where callbacks go (``None``: no callbacks, as before portal setup).
        token_ttl_s: access token lifetime. answer_delay_s: real seconds a payer takes (demo).
        prompt_timeout_s: real seconds before an ignored push fails (``None``: only when
            ``expire_payments()`` is called).
        clock: monotonic seconds for token expiry. seed: reproducible ids.
    """

    def __init__(  # noqa: PLR0913 - every knob is keyword-only with a default
        self,
        *,
        client_id: str = "sim-client-id",
        client_secret: str = "sim-client-secret",  # noqa: S107 - a simulator's fixed secret
        country: str = "UG",
        currency: str = "UGX",
        callback_url: str | None = None,
        token_ttl_s: float = 180.0,
        answer_delay_s: float = 0.0,
        prompt_timeout_s: float | None = 60.0,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.country = country
        self.currency = currency
        self.callback_url = callback_url
        self.token_ttl_s = token_ttl_s
        self.answer_delay_s = answer_delay_s
        self.prompt_timeout_s = prompt_timeout_s
        self.faults = AirtelFaults()
        self.money = MoneyRecord()
        self.token_grants = 0
        self.payments: dict[str, _Payment] = {}
        self._payers: dict[str, AirtelAction] = {}
        self._tokens: dict[str, float] = {}
        self._clock = clock
        self._random = random.Random(seed)  # ids for a simulator, not secrets
        self._tasks = TaskKeeper()
        self.courier = Courier(self.faults.callbacks, self._tasks, provider="airtel-sim")
        self._released = asyncio.Event()
        self._timers: list[asyncio.TimerHandle] = []
        self.app = self._build_app()

    def _build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/auth/oauth2/token", self._token)
        app.router.add_post("/merchant/v1/payments/", self._pay)
        app.router.add_get("/standard/v1/payments/{id}", self._query)
        app.router.add_get("/_sim/ledger", self._ledger)
        app.router.add_post("/_sim/payers", self._set_payer)
        app.router.add_post("/_sim/payers/answer", self._answer_payers)
        app.router.add_post("/_sim/payments/expire", self._expire)
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

    def set_payer(self, msisdn: str, action: AirtelAction) -> None:
        """Decide what the payer (national number, ``7XXXXXXXX``) does with pushes."""
        self._payers[msisdn] = action

    def release(self) -> None:
        """Let hanging requests and status calls answer."""
        self._released.set()

    async def answer_payers(self) -> None:
        """Every payment in progress is answered now by its payer."""
        for payment in list(self.payments.values()):
            self._answer(payment)
        await self.settle()

    async def expire_payments(self) -> None:
        """Every payment still in progress times out now."""
        for payment in list(self.payments.values()):
            if payment.status == "TIP":
                self._finish(payment, AirtelAction.IGNORE)
        await self.settle()

    def expire_tokens(self) -> None:
        """Every token handed out so far is now expired (401 on next use)."""
        self._tokens.clear()

    # -- API -----------------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        if (
            not isinstance(body, dict)
            or body.get("client_id") != self.client_id
            or body.get("client_secret") != self.client_secret
            or body.get("grant_type") != "client_credentials"
        ):
            return _json(
                {"error": "invalid_client", "error_description": "Client authentication failed"},
                status=401,
            )
        token = f"{self._random.getrandbits(192):048x}"
        self._tokens[token] = self._clock() + self.token_ttl_s
        self.token_grants += 1
        return _json(
            {
                "access_token": token,
                "expires_in": str(int(self.token_ttl_s)),
                "token_type": "bearer",
            }
        )

    def _refused(self, request: web.Request) -> web.Response | None:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        expiry = self._tokens.get(token)
        if expiry is None or self._clock() >= expiry:
            return _json({"error": "invalid_token", "error_description": "expired"}, status=401)
        if (
            request.headers.get("X-Country") != self.country
            or request.headers.get("X-Currency") != self.currency
        ):
            return _json(
                {
                    "status": _status(
                        success=False, result_code="ESB000034", message="Invalid country"
                    )
                },
                status=400,
            )
        return None

    def _invalid(self, body: object) -> str | None:
        """The ESB code refusing this payment request, or ``None``."""
        subscriber = body.get("subscriber") if isinstance(body, dict) else None
        transaction = body.get("transaction") if isinstance(body, dict) else None
        if not isinstance(subscriber, dict) or not isinstance(transaction, dict):
            return "ESB000008"  # field validation
        msisdn = subscriber.get("msisdn")
        if not isinstance(msisdn, str) or not msisdn.isdigit() or len(msisdn) != _NATIONAL_LENGTH:
            return "ESB000036"  # invalid MSISDN or length
        if (
            transaction.get("currency") != self.currency
            or subscriber.get("currency") != self.currency
        ):
            return "ESB000035"  # invalid currency
        amount = transaction.get("amount")
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            return "ESB000008"
        if not isinstance(transaction.get("id"), str) or not transaction["id"]:
            return "ESB000008"
        return None

    async def _pay(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        if self.faults.request_errors > 0:
            self.faults.request_errors -= 1
            return _json({"status": _status(success=False, result_code="ESB000001")}, status=500)
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        code = self._invalid(body)
        if code is not None:
            return _json({"status": _status(success=False, result_code=code)}, status=400)
        transaction = body["transaction"]
        if transaction["id"] in self.payments:
            return _json(
                {
                    "status": _status(
                        success=False,
                        result_code="ESB000041",
                        message="External Transaction ID already exists",
                    )
                }
            )
        payment = _Payment(
            id=transaction["id"],
            msisdn=body["subscriber"]["msisdn"],
            amount=transaction["amount"],
            reference=str(body.get("reference", "")),
        )
        self.payments[payment.id] = payment
        if not self.faults.hold_payers:
            if self.answer_delay_s > 0:
                loop = asyncio.get_running_loop()
                self._timers.append(loop.call_later(self.answer_delay_s, self._answer, payment))
            else:
                self._answer(payment)
        if self.faults.hang_requests:
            self._released.clear()
            await self._released.wait()
        return _json(
            {
                "data": {"transaction": {"id": payment.id, "status": "Success."}},
                "status": _status(
                    success=True,
                    result_code="ESB000010",
                    response_code="DP00800001006",
                    message="Success.",
                ),
            }
        )

    def _answer(self, payment: _Payment) -> None:
        action = self._payers.get(payment.msisdn, AirtelAction.APPROVE)
        if action is not AirtelAction.IGNORE:
            self._finish(payment, action)
        elif self.prompt_timeout_s is not None:
            loop = asyncio.get_running_loop()
            self._timers.append(
                loop.call_later(self.prompt_timeout_s, self._finish, payment, AirtelAction.IGNORE)
            )

    def _finish(self, payment: _Payment, action: AirtelAction) -> None:
        if payment.status != "TIP":
            return
        payment.status, payment.response_code, payment.message = _OUTCOMES[action]
        if action is AirtelAction.APPROVE:
            payment.airtel_money_id = f"MP{self._random.randint(10**9, 10**10 - 1)}"
            self.money.take(
                Charge(
                    reference=payment.id,
                    receipt=payment.airtel_money_id,
                    msisdn=payment.msisdn,
                    amount_minor=payment.amount * 10 ** currency_exponent(self.currency),
                    currency=self.currency,
                    account=payment.reference,
                )
            )
        if self.callback_url:
            status = "TS" if self.faults.forge_success else payment.status
            callback = {
                "transaction": {
                    "id": payment.id,
                    "message": payment.message,
                    "status_code": status,
                    "airtel_money_id": payment.airtel_money_id or "",
                }
            }
            raw = json.dumps(callback, separators=(",", ":")).encode()
            self.courier.send("POST", self.callback_url, raw)

    async def _query(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        if self.faults.hang_queries:
            self._released.clear()
            await self._released.wait()
        if self.faults.query_errors > 0:
            self.faults.query_errors -= 1
            return _json({"status": _status(success=False, result_code="ESB000014")}, status=500)
        payment = self.payments.get(request.match_info["id"])
        if payment is None:
            return _json(
                {
                    "status": _status(
                        success=False,
                        result_code="ESB000045",
                        message="No transaction found with provided transaction ID",
                    )
                }
            )
        return _json(
            {
                "data": {
                    "transaction": {
                        "airtel_money_id": payment.airtel_money_id or "",
                        "id": payment.id,
                        "message": payment.message,
                        "status": payment.status,
                    }
                },
                "status": _status(
                    success=True, result_code="ESB000010", response_code=payment.response_code
                ),
            }
        )

    async def _ledger(self, _request: web.Request) -> web.Response:
        return _json(self.money.to_json())

    async def _set_payer(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        try:
            self.set_payer(str(body["msisdn"]), AirtelAction(str(body["action"])))
        except (KeyError, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"msisdn and action ({list(AirtelAction)})\n") from exc
        return _json({"msisdn": body["msisdn"], "action": body["action"]})

    async def _answer_payers(self, _request: web.Request) -> web.Response:
        await self.answer_payers()
        return _json({"ok": True})

    async def _expire(self, _request: web.Request) -> web.Response:
        await self.expire_payments()
        return _json({"ok": True})

    async def _release(self, _request: web.Request) -> web.Response:
        self.release()
        return _json({"ok": True})


__all__ = ["AirtelAction", "AirtelFaults", "AirtelSimulator"]
