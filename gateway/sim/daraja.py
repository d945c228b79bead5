"""A faithful Daraja (M-Pesa) simulator: OAuth, STK push and query, C2B, Transaction Status.

It speaks Daraja 3.0's wire formats (``docs/protocols.md`` §2, §6.3) on loopback so that
``gateway.payments.daraja.DarajaProvider`` runs against it unchanged:

- ``GET /oauth/v1/generate?grant_type=client_credentials`` (Basic auth; tokens expire by ``clock``;
  an expired or unknown token answers ``404.001.03``);
- ``POST /mpesa/stkpush/v1/processrequest``: checks the Bearer token, the JSON content type, the
  shortcode, recomputes ``Password`` from the passkey and ``Timestamp``, the integer ``Amount``
  1 to 250,000, the ``2547…``/``2541…`` MSISDN, one open prompt per subscriber; answers the
  acknowledgement, then the simulated customer acts (``CustomerAction``) and the callback goes to
  ``CallBackURL`` (``AccountReference`` over 12 characters fails with 1025, as on Daraja);
- ``POST /mpesa/stkpushquery/v1/query``: "being processed" while the prompt is open, then the
  final ``ResultCode`` (a string);
- ``POST /mpesa/c2b/v1/registerurl`` (and ``v2``), ``POST /mpesa/c2b/v1/simulate``, and
  ``pay_bill()``: a payment "from the SIM menu" that runs validation (8 s timeout → the registered
  ``ResponseType`` default) then confirmation, the MSISDN masked as Daraja does;
- ``POST /pulltransactions/v1/register`` (the shortcode's one-time registration: "1000", then
  "1001" already registered) and ``POST /pulltransactions/v1/query`` (the completed payments);
- ``POST /mpesa/transactionstatus/v1/query``: acknowledgement, then the ``Result`` posted to
  ``ResultURL``. A receipt it never issued answers ``ResultCode`` 2032 (our choice [I]: the real
  code for an unknown receipt is not documented in the pages we read). Its ``ReasonType`` tells
  the kind of payment, as Daraja's does: ``Pay Bill Online`` for an STK push, ``Pay Bill`` for a
  payment from the SIM menu;
- ``GET /_sim/ledger`` (money actually taken), ``GET /_sim/callbacks`` (deliveries), and the
  demo's controls: ``GET|POST /_sim/faults``, ``POST /_sim/callbacks/release``,
  ``POST /_sim/customers`` (``{"msisdn", "action"}``), ``POST /_sim/prompts/answer|expire``,
  ``POST /_sim/queries/release``, ``POST /_sim/c2b/pay`` (``{"msisdn", "bill_ref", "amount"}``).

Fault knobs (``DarajaSimulator.faults``): hold / drop / duplicate / reorder callbacks, hold
prompts, tamper the callback amount, 5xx or hanging queries, refused pushes. Nothing sleeps in
tests: prompts are answered at once (or when ``answer_prompts``/``expire_prompts`` is called), and
the real-time delays (``answer_delay_s``, ``prompt_timeout_s``) are for the demo.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import hashlib
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import Any, Final, Literal

import structlog
from aiohttp import web

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

EAT: Final = timezone(timedelta(hours=3), "EAT")
_MSISDN: Final = re.compile(r"254[17]\d{8}")
_TIMESTAMP: Final = re.compile(r"\d{14}")
_PULL_DATE: Final = "%Y-%m-%d %H:%M:%S"  # Pull Transactions' StartDate/EndDate (EAT)
_PULL_PAGE: Final = 1000  # transactions per Pull answer; OffSetValue pages on
_TRANSACTION_TYPES: Final = frozenset({"CustomerPayBillOnline", "CustomerBuyGoodsOnline"})


class CustomerAction(StrEnum):
    """What the simulated customer does with an STK prompt."""

    APPROVE = "approve"  # enters the right PIN: ResultCode 0
    CANCEL = "cancel"  # 1032 Request cancelled by user
    WRONG_PIN = "wrong_pin"  # 2001 The initiator information is invalid
    INSUFFICIENT_FUNDS = "insufficient_funds"  # 1 The balance is insufficient
    IGNORE = "ignore"  # never answers: 1037 when the prompt expires


_RESULTS: Final[dict[CustomerAction, tuple[int, str]]] = {
    CustomerAction.APPROVE: (0, "The service request is processed successfully."),
    CustomerAction.CANCEL: (1032, "Request cancelled by user"),
    CustomerAction.WRONG_PIN: (2001, "The initiator information is invalid."),
    CustomerAction.INSUFFICIENT_FUNDS: (1, "The balance is insufficient for the transaction."),
    CustomerAction.IGNORE: (1037, "DS timeout user cannot be reached"),
}


def _completed_at(record: tuple[datetime, Charge]) -> datetime:
    """A completed payment's time as Pull compares it (whole seconds)."""
    return record[0].replace(microsecond=0)


@dataclass(slots=True, kw_only=True)
class DarajaFaults:
    """Knobs for tests and the demo; mutate them at any time."""

    callbacks: CallbackFaults = field(default_factory=CallbackFaults)
    hold_prompts: bool = False  # customers answer only when ``answer_prompts()`` is called
    tamper_amount_kes: int | None = None  # STK callbacks claim this Amount (money taken is real)
    push_errors: int = 0  # the next N pushes answer HTTP 500 500.003.02 (Spike Arrest)
    query_errors: int = 0  # the next N STK queries answer HTTP 500 500.003.1001
    hang_queries: bool = False  # STK queries hang until ``release_queries()``


@dataclass(slots=True, kw_only=True)
class _Push:
    merchant_id: str
    checkout_id: str
    msisdn: str
    amount_kes: int
    account: str
    callback_url: str
    result: tuple[int, str] | None = None  # (ResultCode, ResultDesc) once final
    receipt: str | None = None
    timer: asyncio.TimerHandle | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class C2BOutcome:
    """What happened to a payment made from the SIM menu."""

    accepted: bool
    trans_id: str
    result_code: str  # "0", or the validation's reject code, or "default:Cancelled"


def _error(status: int, code: str, message: str) -> web.Response:
    body = {"requestId": f"sim-{random.getrandbits(32):08x}", "errorCode": code}
    body["errorMessage"] = message
    return _json(body, status=status)


def _json(payload: object, *, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload, separators=(",", ":")).encode(),
        content_type="application/json",
    )


class DarajaSimulator(ProviderSimulator):
    """Daraja on loopback. Serve ``.app`` (e.g. ``aiohttp.test_utils.TestServer(sim.app)``).

    Args:
        consumer_key, consumer_secret: the OAuth credentials it accepts.
        shortcode, passkey: the paybill and the passkey ``Password`` is checked against.
        initiator, security_credential: what Transaction Status accepts.
        token_ttl_s: access token lifetime (Daraja: 3599).
        prompt_timeout_s: an ignored prompt fails with 1037 after this many real seconds
            (``None``: only when ``expire_prompts()`` is called).
        answer_delay_s: real seconds a customer takes to answer (demo); 0 answers at once.
        validation_timeout_s: how long C2B validation may take before the default applies.
        c2b_msisdn: how C2B payloads show the payer: ``masked`` (Daraja's default), ``hashed``
            (SHA-256 hex) or ``plain``.
        external_validation: whether C2B payments are validated at the registered URL.
        confirmation_retries: further attempts at a C2B confirmation our side did not answer 200.
        clock: monotonic seconds for token expiry. now: the wall clock for timestamps.
        seed: seeds receipt numbers and ids, so runs are reproducible.
    """

    def __init__(  # noqa: PLR0913 - every knob is keyword-only with a default
        self,
        *,
        consumer_key: str = "sim-consumer-key",
        consumer_secret: str = "sim-consumer-secret",  # noqa: S107 - a simulator's fixed secret
        shortcode: str = "174379",
        passkey: str = "sim-passkey",
        initiator: str = "testapi",
        security_credential: str = "sim-security-credential",
        token_ttl_s: float = 3599.0,
        prompt_timeout_s: float | None = 60.0,
        answer_delay_s: float = 0.0,
        validation_timeout_s: float = 8.0,
        c2b_msisdn: Literal["masked", "hashed", "plain"] = "masked",
        external_validation: bool = True,
        confirmation_retries: int = 2,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] | None = None,
        seed: int | None = None,
    ) -> None:
        self.shortcode = shortcode
        self.passkey = passkey
        self.consumer_key = consumer_key
        self.consumer_secret = consumer_secret
        self.initiator = initiator
        self.security_credential = security_credential
        self.token_ttl_s = token_ttl_s
        self.prompt_timeout_s = prompt_timeout_s
        self.answer_delay_s = answer_delay_s
        self.validation_timeout_s = validation_timeout_s
        self.c2b_msisdn = c2b_msisdn
        self.external_validation = external_validation
        self.confirmation_retries = confirmation_retries
        self.faults = DarajaFaults()
        self.money = MoneyRecord()
        self.token_grants = 0
        self.push_requests: list[dict[str, Any]] = []  # every push body that was accepted
        self._clock = clock
        self._now = now or (lambda: datetime.now(EAT))
        self._random = random.Random(seed)  # ids for a simulator, not secrets
        self._tasks = TaskKeeper()
        self.courier = Courier(self.faults.callbacks, self._tasks, provider="daraja-sim")
        self._tokens: dict[str, float] = {}
        self._customers: dict[str, CustomerAction] = {}
        self._pushes: dict[str, _Push] = {}
        self._c2b_urls: dict[str, dict[str, str]] = {}
        self._receipts: dict[str, Charge] = {}
        # (when, charge) in time order, for Pull's binary search by StartDate/EndDate.
        self._completed: list[tuple[datetime, Charge]] = []
        self.pull_requests = 0  # Pull Transactions queries answered (tests count lookups)
        # shortcode → the Pull registration's body (NominatedNumber, CallBackURL): one-time
        self.pull_registrations: dict[str, dict[str, str]] = {}
        self._queries_released = asyncio.Event()
        self.app = self._build_app()

    # -- the app -------------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/oauth/v1/generate", self._oauth)
        app.router.add_post("/mpesa/stkpush/v1/processrequest", self._stk_push)
        app.router.add_post("/mpesa/stkpushquery/v1/query", self._stk_query)
        app.router.add_post("/mpesa/c2b/v1/registerurl", self._register_urls)
        app.router.add_post("/mpesa/c2b/v2/registerurl", self._register_urls)
        app.router.add_post("/mpesa/c2b/v1/simulate", self._c2b_simulate)
        app.router.add_post("/mpesa/transactionstatus/v1/query", self._transaction_status)
        app.router.add_post("/pulltransactions/v1/query", self._pull_transactions)
        app.router.add_post("/pulltransactions/v1/register", self._pull_register)
        app.router.add_get("/_sim/ledger", self._ledger)
        app.router.add_post("/_sim/customers", self._set_customer)
        app.router.add_post("/_sim/prompts/answer", self._answer_prompts)
        app.router.add_post("/_sim/prompts/expire", self._expire_prompts)
        app.router.add_post("/_sim/queries/release", self._release_queries)
        app.router.add_post("/_sim/c2b/pay", self._sim_menu_payment)
        add_control_routes(app, self)
        app.cleanup_ctx.append(self._lifetime)
        return app

    async def _lifetime(self, _app: web.Application) -> Any:  # noqa: ANN401 - aiohttp's cleanup_ctx
        await self.courier.open()
        yield
        self._queries_released.set()
        for push in self._pushes.values():
            if push.timer is not None:
                push.timer.cancel()
        await self._tasks.close()
        await self.courier.close()

    # -- knobs and inspection ------------------------------------------------------------------

    def set_customer(self, msisdn: str, action: CustomerAction) -> None:
        """Decide what the customer with ``msisdn`` (``2547…`` or ``+2547…``) does with prompts."""
        self._customers[msisdn.removeprefix("+")] = action

    def release_queries(self) -> None:
        """Let hanging STK queries (``faults.hang_queries``) answer."""
        self._queries_released.set()

    async def answer_prompts(self) -> None:
        """Every open prompt is answered now by its customer (held or delayed ones included)."""
        for push in list(self._pushes.values()):
            if push.result is None:
                self._answer(push)
        await self.settle()

    async def expire_prompts(self) -> None:
        """Every prompt still open times out now (1037), as Daraja does after about a minute."""
        for push in list(self._pushes.values()):
            if push.result is None:
                self._finish(push, CustomerAction.IGNORE)
        await self.settle()

    # -- OAuth ---------------------------------------------------------------------------------

    async def _oauth(self, request: web.Request) -> web.Response:
        if request.query.get("grant_type") != "client_credentials":
            return _error(400, "400.008.02", "Invalid grant type passed")
        expected = base64.b64encode(f"{self.consumer_key}:{self.consumer_secret}".encode())
        if request.headers.get("Authorization", "") != f"Basic {expected.decode()}":
            return _error(400, "400.008.01", "Invalid Authentication passed")
        token = "".join(self._random.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnop", k=28))
        self._tokens[token] = self._clock() + self.token_ttl_s
        self.token_grants += 1
        return _json({"access_token": token, "expires_in": str(int(self.token_ttl_s))})

    def _authorised(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        expiry = self._tokens.get(header.removeprefix("Bearer "))
        return header.startswith("Bearer ") and expiry is not None and self._clock() < expiry

    def expire_tokens(self) -> None:
        """Every access token handed out so far is now expired (``404.001.03`` on next use)."""
        self._tokens.clear()

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        if not self._authorised(request):
            return _error(404, "404.001.03", "Invalid Access Token")
        if request.content_type != "application/json":
            return _error(400, "400.002.02", "Bad Request - Invalid BusinessShortCode")
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "400.002.02", "Bad Request - Invalid JSON")
        if not isinstance(body, dict):
            return _error(400, "400.002.02", "Bad Request - Invalid JSON")
        return body

    def _password_ok(self, body: dict[str, Any]) -> bool:
        timestamp = str(body.get("Timestamp", ""))
        if not _TIMESTAMP.fullmatch(timestamp):
            return False
        try:
            datetime.strptime(timestamp, "%Y%m%d%H%M%S")  # noqa: DTZ007 - a format check only
        except ValueError:
            return False
        expected = base64.b64encode(f"{self.shortcode}{self.passkey}{timestamp}".encode())
        return str(body.get("Password", "")) == expected.decode()

    # -- STK push --------------------------------------------------------------------------------

    def _push_refusal(self, body: dict[str, Any]) -> web.Response | None:  # noqa: PLR0911 - one answer per rule
        """The error Daraja answers for this push, or ``None`` when it is acceptable."""
        if self.faults.push_errors > 0:
            self.faults.push_errors -= 1
            return _error(500, "500.003.02", "Spike Arrest Violation")
        if str(body.get("BusinessShortCode")) != self.shortcode:
            return _error(500, "500.001.1001", "Merchant does not exist")
        if not self._password_ok(body):
            return _error(500, "500.001.1001", "Wrong credentials")
        amount = body.get("Amount")
        if isinstance(amount, bool) or not isinstance(amount, int) or not 1 <= amount <= 250_000:
            return _error(400, "400.002.02", "Bad Request - Invalid Amount")
        phone = str(body.get("PhoneNumber", ""))
        if not _MSISDN.fullmatch(phone) or not _MSISDN.fullmatch(str(body.get("PartyA", ""))):
            return _error(400, "400.002.02", "Bad Request - Invalid PhoneNumber")
        if body.get("TransactionType") not in _TRANSACTION_TYPES:
            return _error(400, "400.002.02", "Bad Request - Invalid TransactionType")
        callback = str(body.get("CallBackURL", ""))
        if not callback.startswith(("http://", "https://")) or " " in callback:
            return _error(400, "400.002.02", "Bad Request - Invalid CallBackURL")
        if any(p.msisdn == phone and p.result is None for p in self._pushes.values()):
            return _error(
                500,
                "500.001.1001",
                "Unable to lock subscriber, a transaction is already in process for the current"
                " subscriber",
            )
        return None

    async def _stk_push(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        if isinstance(body.get("Amount"), str) and str(body["Amount"]).isdigit():
            body["Amount"] = int(body["Amount"])  # Daraja also takes the amount as digits
        refusal = self._push_refusal(body)
        if refusal is not None:
            return refusal
        push = _Push(
            merchant_id=f"{self._random.randint(1000, 99999)}-{self._random.randint(10**6, 10**8)}"
            "-1",
            checkout_id=f"ws_CO_{self._now().strftime('%d%m%Y%H%M%S')}"
            f"{self._random.randint(10**8, 10**9 - 1)}",
            msisdn=str(body["PhoneNumber"]),
            amount_kes=int(body["Amount"]),
            account=str(body.get("AccountReference", "")),
            callback_url=str(body["CallBackURL"]),
        )
        self._pushes[push.checkout_id] = push
        self.push_requests.append(body)
        if len(push.account) > 12:  # Daraja's AccountReference limit
            self._finish(push, None, result=(1025, "An error occurred while sending push request"))
        elif (
            body["TransactionType"] == "CustomerPayBillOnline" and body["PartyB"] != self.shortcode
        ):
            self._finish(
                push,
                None,
                result=(2028, "The request is not permitted according to product assignment"),
            )
        elif not self.faults.hold_prompts:
            if self.answer_delay_s > 0:
                loop = asyncio.get_running_loop()
                push.timer = loop.call_later(self.answer_delay_s, self._answer, push)
            else:
                self._answer(push)
        message = "Success. Request accepted for processing"
        return _json(
            {
                "MerchantRequestID": push.merchant_id,
                "CheckoutRequestID": push.checkout_id,
                "ResponseCode": "0",
                "ResponseDescription": message,
                "CustomerMessage": message,
            }
        )

    def _answer(self, push: _Push) -> None:
        if push.result is not None:
            return
        if push.timer is not None:  # the answer delay has run out, or someone answers early
            push.timer.cancel()
            push.timer = None
        action = self._customers.get(push.msisdn, CustomerAction.APPROVE)
        if action is CustomerAction.IGNORE:
            if self.prompt_timeout_s is not None:
                loop = asyncio.get_running_loop()
                push.timer = loop.call_later(
                    self.prompt_timeout_s, self._finish, push, CustomerAction.IGNORE
                )
            return
        self._finish(push, action)

    def _finish(
        self,
        push: _Push,
        action: CustomerAction | None,
        *,
        result: tuple[int, str] | None = None,
    ) -> None:
        if push.result is not None:
            return
        if push.timer is not None:
            push.timer.cancel()
        push.result = result or _RESULTS[action or CustomerAction.IGNORE]
        code, desc = push.result
        stk: dict[str, Any] = {
            "MerchantRequestID": push.merchant_id,
            "CheckoutRequestID": push.checkout_id,
            "ResultCode": code,
            "ResultDesc": desc,
        }
        if code == 0:
            push.receipt = self._receipt()
            charge = Charge(
                reference=push.checkout_id,
                receipt=push.receipt,
                msisdn=push.msisdn,
                amount_minor=push.amount_kes * 100,
                currency="KES",
                account=push.account,
            )
            self.money.take(charge)
            self._receipts[push.receipt] = charge
            self._record_completed(charge)
            claimed = self.faults.tamper_amount_kes or push.amount_kes
            stk["CallbackMetadata"] = {
                "Item": [
                    {"Name": "Amount", "Value": float(claimed)},
                    {"Name": "MpesaReceiptNumber", "Value": push.receipt},
                    {"Name": "Balance"},
                    {"Name": "TransactionDate", "Value": int(self._stamp())},
                    {"Name": "PhoneNumber", "Value": int(push.msisdn)},
                ]
            }
        body = json.dumps({"Body": {"stkCallback": stk}}, separators=(",", ":")).encode()
        self.courier.send("POST", push.callback_url, body)

    def _receipt(self) -> str:
        while True:
            receipt = "".join(self._random.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", k=10))
            if receipt not in self._receipts:
                return receipt

    def _stamp(self) -> str:
        return self._now().astimezone(EAT).strftime("%Y%m%d%H%M%S")

    async def _stk_query(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        if self.faults.hang_queries:
            self._queries_released.clear()
            await self._queries_released.wait()
        if self.faults.query_errors > 0:
            self.faults.query_errors -= 1
            return _error(500, "500.003.1001", "Internal Server Error")
        if str(body.get("BusinessShortCode")) != self.shortcode or not self._password_ok(body):
            return _error(500, "500.001.1001", "Wrong credentials")
        push = self._pushes.get(str(body.get("CheckoutRequestID", "")))
        if push is None:
            return _error(400, "400.002.02", "Bad Request - Invalid CheckoutRequestID")
        if push.result is None:
            return _error(500, "500.001.1001", "The transaction is being processed")
        code, desc = push.result
        return _json(
            {
                "ResponseCode": "0",
                "ResponseDescription": "The service request has been accepted successsfully",
                "MerchantRequestID": push.merchant_id,
                "CheckoutRequestID": push.checkout_id,
                "ResultCode": str(code),
                "ResultDesc": desc,
            }
        )

    # -- Pull Transactions (reconciliation) --------------------------------------------------
    def _record_completed(self, charge: Charge) -> None:
        """Keep a completed payment for Pull, in time order (insorted: the clock may step back)."""
        bisect.insort(self._completed, (self._now(), charge), key=_completed_at)

    async def _pull_transactions(self, request: web.Request) -> web.Response:
        """The shortcode's completed transactions in ``[StartDate, EndDate]`` (EAT), by page.

        The answer's shape follows Safaricom's Pull Transactions page as practitioners quote
        it [I]: ``Response`` is a list holding one list of ``{transactionId, trxDate, msisdn,
        sender, transactiontype, billreference, amount, organizationname}``; no
        CheckoutRequestID (the receipt is the only handle).
        """
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        if str(body.get("ShortCode")) != self.shortcode:
            return _error(400, "400.002.02", "Bad Request - Invalid ShortCode")
        try:
            start = datetime.strptime(str(body.get("StartDate")), _PULL_DATE).replace(tzinfo=EAT)
            end = datetime.strptime(str(body.get("EndDate")), _PULL_DATE).replace(tzinfo=EAT)
            offset = int(str(body.get("OffSetValue", "0")))
        except ValueError:
            return _error(400, "400.002.02", "Bad Request - Invalid date or offset")
        self.pull_requests += 1
        # Binary search: the records are in time order, compared at whole seconds as Pull's are.
        first = bisect.bisect_left(self._completed, start, key=_completed_at)
        last = bisect.bisect_right(self._completed, end, key=_completed_at)
        found = [
            {
                "transactionId": charge.receipt,
                "trxDate": when.astimezone(EAT).replace(microsecond=0).isoformat(),
                "msisdn": int(charge.msisdn),
                "sender": "MPESA",
                "transactiontype": "c2b-pay-bill-debit",
                "billreference": charge.account,
                "amount": str(charge.amount_minor // 100),
                "organizationname": "Sim Electricity",
            }
            for when, charge in self._completed[first:last][
                max(0, offset) : max(0, offset) + _PULL_PAGE
            ]
        ]
        return _json(
            {
                "ResponseRefID": f"{self._random.getrandbits(64):016x}",
                "ResponseCode": "1000",
                "ResponseMessage": "Success",
                "Response": [found],
            }
        )

    async def _pull_register(self, request: web.Request) -> web.Response:
        """``POST /pulltransactions/v1/register``: the shortcode's one-time Pull registration.

        Body ``{ShortCode, RequestType: "Pull", NominatedNumber, CallBackURL}`` as practitioners
        quote Safaricom's page [I]; the answer ``{ResponseRefID, ResponseStatus: "1000",
        ShortCode, ResponseDescription: "Shortcode Registered Successfully"}``, and "1001" for a
        shortcode registered before (kept as first registered: production registration is
        one-time).
        """
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        shortcode = str(body.get("ShortCode", ""))
        if shortcode != self.shortcode:
            return _error(400, "400.002.02", "Bad Request - Invalid ShortCode")
        if body.get("RequestType") != "Pull":
            return _error(400, "400.002.02", "Bad Request - Invalid RequestType")
        nominated = str(body.get("NominatedNumber", ""))
        if not _MSISDN.fullmatch(nominated):
            return _error(400, "400.002.02", "Bad Request - Invalid NominatedNumber")
        callback = str(body.get("CallBackURL", ""))
        if not callback.startswith(("https://", "http://")):
            return _error(400, "400.002.02", "Bad Request - Invalid CallBackURL")
        before = shortcode in self.pull_registrations
        said = "Shortcode already registered" if before else "Shortcode Registered Successfully"
        if not before:
            self.pull_registrations[shortcode] = {
                "NominatedNumber": nominated,
                "CallBackURL": callback,
            }
        return _json(
            {
                "ResponseRefID": f"{self._random.getrandbits(64):016x}",
                "ResponseStatus": "1001" if before else "1000",
                "ShortCode": shortcode,
                "ResponseDescription": said,
            }
        )

    # -- C2B -----------------------------------------------------------------------------------

    async def _register_urls(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        if str(body.get("ShortCode")) != self.shortcode:
            return _error(400, "400.002.02", "Bad Request - Invalid ShortCode")
        if body.get("ResponseType") not in {"Completed", "Cancelled"}:
            return _error(400, "400.002.02", "Bad Request - Invalid ResponseType")
        self._c2b_urls[self.shortcode] = {
            "ValidationURL": str(body.get("ValidationURL", "")),
            "ConfirmationURL": str(body.get("ConfirmationURL", "")),
            "ResponseType": str(body["ResponseType"]),
        }
        return _json(
            {
                "OriginatorCoversationID": f"{self._random.randint(10**4, 10**5)}-sim",
                "ResponseCode": "0",
                "ResponseDescription": "success",
            }
        )

    def register_urls(
        self, *, validation_url: str, confirmation_url: str, response_type: str = "Completed"
    ) -> None:
        """Register C2B URLs directly, as an operator does once in production."""
        self._c2b_urls[self.shortcode] = {
            "ValidationURL": validation_url,
            "ConfirmationURL": confirmation_url,
            "ResponseType": response_type,
        }

    async def _c2b_simulate(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        try:
            amount = int(str(body.get("Amount")))
        except ValueError:
            return _error(400, "400.002.02", "Bad Request - Invalid Amount")
        msisdn = str(body.get("Msisdn", ""))
        self._tasks.spawn(self._pay_bill_quietly(msisdn, str(body.get("BillRefNumber")), amount))
        return _json(
            {
                "OriginatorCoversationID": f"{self._random.randint(10**4, 10**5)}-sim",
                "ResponseCode": "0",
                "ResponseDescription": "Accept the service request successfully.",
            }
        )

    async def _pay_bill_quietly(self, msisdn: str, bill_ref: str, amount_kes: int) -> None:
        await self.pay_bill(msisdn, bill_ref, amount_kes)

    def _shown_msisdn(self, msisdn: str) -> str:
        if self.c2b_msisdn == "plain":
            return msisdn
        if self.c2b_msisdn == "hashed":
            return hashlib.sha256(msisdn.encode()).hexdigest()
        return f"{msisdn[:5]}****{msisdn[-3:]}"

    async def pay_bill(self, msisdn: str, bill_ref: str, amount_kes: int) -> C2BOutcome:
        """A customer pays ``amount_kes`` to the paybill, account ``bill_ref``, from the SIM menu.

        Runs validation (when enabled and registered) and waits for its answer, takes the money
        when accepted, then sends the confirmation (through the callback faults). Returns what
        happened; the confirmation itself is delivered in the background (``settle()``).
        """
        msisdn = msisdn.removeprefix("+")
        urls = self._c2b_urls.get(self.shortcode)
        trans_id = self._receipt()
        if urls is None:
            return C2BOutcome(accepted=False, trans_id=trans_id, result_code="no URLs registered")
        payload: dict[str, Any] = {
            "TransactionType": "Pay Bill",
            "TransID": trans_id,
            "TransTime": self._stamp(),
            "TransAmount": str(amount_kes),
            "BusinessShortCode": self.shortcode,
            "BillRefNumber": bill_ref,
            "InvoiceNumber": "",
            "OrgAccountBalance": "",
            "ThirdPartyTransID": "",
            "MSISDN": self._shown_msisdn(msisdn),
            "FirstName": "John",
            "MiddleName": "",
            "LastName": "",
        }
        result_code = "0"
        if self.external_validation and urls["ValidationURL"]:
            raw = json.dumps(payload, separators=(",", ":")).encode()
            answer = await self.courier.post_now(
                urls["ValidationURL"], raw, timeout_s=self.validation_timeout_s
            )
            result_code = self._validation_result(answer.status, answer.answer, urls)
        if result_code != "0":
            log.info("sim_c2b_rejected", trans_id=trans_id, result_code=result_code)
            return C2BOutcome(accepted=False, trans_id=trans_id, result_code=result_code)
        charge = Charge(
            reference=trans_id,
            receipt=trans_id,
            msisdn=msisdn,
            amount_minor=amount_kes * 100,
            currency="KES",
            account=bill_ref,
        )
        self.money.take(charge)
        self._receipts[trans_id] = charge
        self._record_completed(charge)
        balance = sum(c.amount_minor for c in self.money.charges) // 100
        payload["OrgAccountBalance"] = f"{balance}.00"
        raw = json.dumps(payload, separators=(",", ":")).encode()
        self.courier.send("POST", urls["ConfirmationURL"], raw, retries=self.confirmation_retries)
        return C2BOutcome(accepted=True, trans_id=trans_id, result_code="0")

    @staticmethod
    def _validation_result(status: int | None, answer: bytes, urls: dict[str, str]) -> str:
        default = "0" if urls["ResponseType"] == "Completed" else "default:Cancelled"
        if status != 200:
            return default
        try:
            reply = json.loads(answer)
        except ValueError:
            return default
        code = str(reply.get("ResultCode")) if isinstance(reply, dict) else ""
        if code == "0":
            return "0"
        return code if code.startswith("C2B") else default

    # -- Transaction Status --------------------------------------------------------------------

    async def _transaction_status(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        for key in ("ResultURL", "QueueTimeOutURL", "TransactionID", "Initiator"):
            if not str(body.get(key, "")):
                return _error(400, "400.002.02", f"Bad Request - Invalid {key}")
        conversation = f"AG_{self._stamp()[:8]}_{self._random.getrandbits(64):016x}"
        originator = f"{self._random.randint(10**4, 10**5)}-{self._random.randint(10**6, 10**7)}-1"
        self._tasks.spawn(self._send_status_result(body, conversation, originator))
        return _json(
            {
                "OriginatorConversationID": originator,
                "ConversationID": conversation,
                "ResponseCode": "0",
                "ResponseDescription": "Accept the service request successfully.",
            }
        )

    async def _send_status_result(
        self, body: dict[str, Any], conversation: str, originator: str
    ) -> None:
        await asyncio.sleep(0)  # the acknowledgement goes out first, as on Daraja
        trans_id = str(body["TransactionID"])
        result: dict[str, Any] = {
            "ConversationID": conversation,
            "OriginatorConversationID": originator,
            "ReferenceData": {"ReferenceItem": {"Key": "Occasion", "Value": body.get("Occasion")}},
            "ResultType": 0,
            "TransactionID": trans_id,
        }
        charge = self._receipts.get(trans_id)
        if (
            body.get("Initiator") != self.initiator
            or body.get("SecurityCredential") != self.security_credential
        ):
            result["ResultCode"] = 2001
            result["ResultDesc"] = "The initiator information is invalid."
        elif charge is None:
            result["ResultCode"] = 2032
            result["ResultDesc"] = "The transaction receipt number does not exist."
        else:
            result["ResultCode"] = 0
            result["ResultDesc"] = "The service request is processed successfully."
            stamp = int(self._stamp())
            reason_type = "Pay Bill" if charge.reference == charge.receipt else "Pay Bill Online"
            result["ResultParameters"] = {
                "ResultParameter": [
                    {"Key": "DebitPartyName", "Value": f"{charge.msisdn} - John Doe"},
                    {"Key": "CreditPartyName", "Value": f"{self.shortcode} - Sim Utility"},
                    {"Key": "OriginatorConversationID", "Value": originator},
                    {"Key": "InitiatedTime", "Value": stamp},
                    {"Key": "DebitAccountType", "Value": "MMF Account For Customer"},
                    {"Key": "DebitPartyCharges", "Value": ""},
                    {"Key": "TransactionReason", "Value": ""},
                    # An STK push is "Pay Bill Online"; a payment from the SIM menu "Pay Bill".
                    {"Key": "ReasonType", "Value": reason_type},
                    {"Key": "TransactionStatus", "Value": "Completed"},
                    {"Key": "FinalisedTime", "Value": stamp},
                    {"Key": "Amount", "Value": charge.amount_minor / 100},
                    {"Key": "ConversationID", "Value": conversation},
                    {"Key": "ReceiptNo", "Value": charge.receipt},
                ]
            }
        raw = json.dumps({"Result": result}, separators=(",", ":")).encode()
        self.courier.send("POST", str(body["ResultURL"]), raw)

    # -- inspection endpoints ------------------------------------------------------------------

    async def _ledger(self, _request: web.Request) -> web.Response:
        return _json(self.money.to_json())

    async def _set_customer(self, request: web.Request) -> web.Response:
        body = await read_json_object(request)
        try:
            self.set_customer(str(body["msisdn"]), CustomerAction(str(body["action"])))
        except (KeyError, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"msisdn and action ({list(CustomerAction)})\n") from exc
        return _json({"msisdn": body["msisdn"], "action": body["action"]})

    async def _answer_prompts(self, _request: web.Request) -> web.Response:
        await self.answer_prompts()
        return _json({"ok": True})

    async def _expire_prompts(self, _request: web.Request) -> web.Response:
        await self.expire_prompts()
        return _json({"ok": True})

    async def _release_queries(self, _request: web.Request) -> web.Response:
        self.release_queries()
        return _json({"ok": True})

    async def _sim_menu_payment(self, request: web.Request) -> web.Response:
        """The SIM menu: ``{"msisdn", "bill_ref", "amount"}`` → what happened."""
        body = await read_json_object(request)
        amount = body.get("amount")
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            raise web.HTTPBadRequest(text="amount: whole KES\n")
        outcome = await self.pay_bill(str(body.get("msisdn")), str(body.get("bill_ref")), amount)
        return _json(
            {
                "accepted": outcome.accepted,
                "trans_id": outcome.trans_id,
                "result_code": outcome.result_code,
            }
        )


__all__ = ["C2BOutcome", "CustomerAction", "DarajaFaults", "DarajaSimulator"]
