"""Fuzzing every inbound route of the composed gateway with hypothesis.

The app is ``build_app`` on the embedded defaults (temp data directory, in-process simulators
whose callbacks go to a dead port). Each route gets garbage: random form fields, random bytes,
random JSON, and payloads shaped like the provider's own with random values. After every request:
no 5xx, and nothing that moves money or tokens changed in the ledger (no purchase created or
moved, no payment attached to a purchase, no vend, no token or reprint message). What garbage may
leave behind is evidence: an unattached notice row and its event (a claim nobody can vend on), a
USSD session, and, for a well-formed SMS with a nonsense command, the help text sent back.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import RUNTIME, build_app
from gateway.config import Config

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[[web.Application], Awaitable[Client]]

pytestmark = pytest.mark.slow

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

STK_ITEMS = ["Amount", "MpesaReceiptNumber", "Balance", "TransactionDate", "PhoneNumber"]
STATUS_RESULT_KEYS = [
    "ResultType",
    "ResultCode",
    "ResultDesc",
    "OriginatorConversationID",
    "ConversationID",
    "TransactionID",
    "ResultParameters",
]

# --- strategies ----------------------------------------------------------------------------------

texts = st.text(max_size=80)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=12,
)
phones = st.one_of(
    texts,
    st.from_regex(r"\+?2547\d{8}", fullmatch=True),
    st.sampled_from(["", "+", "0712345678", "+999", "2547****149"]),
)


def forms(keys: list[str]) -> st.SearchStrategy[dict[str, str]]:
    """A form with some of ``keys`` (random values, phone-ish ones included) and random extras."""
    known = st.fixed_dictionaries({}, optional={key: st.one_of(texts, phones) for key in keys})
    extra = st.dictionaries(texts, texts, max_size=3)
    return st.builds(lambda a, b: {**b, **a}, known, extra)


def bodies(shaped: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[bytes, str]]:
    """A request body with its content type: shaped JSON, any JSON, raw bytes, or a form."""
    return st.one_of(
        shaped.map(lambda v: (json.dumps(v).encode(), "application/json")),
        json_values.map(lambda v: (json.dumps(v).encode(), "application/json")),
        st.binary(max_size=200).map(lambda b: (b, "application/json")),
        st.binary(max_size=200).map(lambda b: (b, "application/x-www-form-urlencoded")),
    )


stk_callbacks = st.fixed_dictionaries(
    {
        "Body": st.fixed_dictionaries(
            {
                "stkCallback": st.fixed_dictionaries(
                    {
                        "MerchantRequestID": texts,
                        "CheckoutRequestID": st.one_of(texts, st.just("ws_CO_0000")),
                        "ResultCode": st.one_of(st.integers(), texts),
                        "ResultDesc": texts,
                    },
                    optional={
                        "CallbackMetadata": st.fixed_dictionaries(
                            {
                                "Item": st.lists(
                                    st.fixed_dictionaries(
                                        {"Name": st.sampled_from(STK_ITEMS)},
                                        optional={"Value": scalars},
                                    ),
                                    max_size=6,
                                )
                            }
                        )
                    },
                )
            }
        )
    }
)
c2b_payloads = st.fixed_dictionaries(
    {},
    optional={
        "TransactionType": st.sampled_from(["Pay Bill", "Buy Goods", ""]),
        "TransID": texts,
        "TransTime": st.one_of(texts, st.from_regex(r"\d{14}", fullmatch=True)),
        "TransAmount": st.one_of(texts, st.integers().map(str), st.floats().map(str)),
        "BusinessShortCode": st.one_of(texts, st.just("174379")),
        # Random account numbers: never one of the demo meters, so nothing may be sold.
        "BillRefNumber": st.one_of(texts, st.from_regex(r"9\d{10}", fullmatch=True)),
        "InvoiceNumber": texts,
        "OrgAccountBalance": texts,
        "ThirdPartyTransID": texts,
        "MSISDN": phones,
        "FirstName": texts,
    },
)
momo_callbacks = st.fixed_dictionaries(
    {},
    optional={
        "financialTransactionId": texts,
        "externalId": texts,
        "amount": st.one_of(texts, st.integers().map(str)),
        "currency": st.sampled_from(["EUR", "KES", "", "XXX"]),
        "payer": st.fixed_dictionaries({}, optional={"partyIdType": texts, "partyId": phones}),
        "status": st.sampled_from(["SUCCESSFUL", "FAILED", "PENDING", "", "x"]),
        "reason": texts,
    },
)
airtel_callbacks = st.fixed_dictionaries(
    {
        "transaction": st.fixed_dictionaries(
            {},
            optional={
                "id": texts,
                "message": texts,
                "status_code": st.sampled_from(["TS", "TF", "TIP", "TA", "", "x"]),
                "airtel_money_id": texts,
            },
        )
    }
)
status_results = st.fixed_dictionaries(
    {
        "Result": st.dictionaries(
            st.sampled_from(STATUS_RESULT_KEYS),
            json_values,
        )
    }
)

# --- the ledger's money-moving state -----------------------------------------------------------


def money_state(db: Path) -> dict[str, Any]:
    """Everything garbage must not change.

    Purchases and their states, payments attached to a purchase, vends, events of purchases, and
    messages other than replies to an SMS command.
    """
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return {
            "purchases": conn.execute(
                "SELECT purchase_id, state FROM purchases ORDER BY purchase_id"
            ).fetchall(),
            "attached_payments": conn.execute(
                "SELECT COUNT(*) FROM payments WHERE purchase_id IS NOT NULL"
            ).fetchone(),
            "vends": conn.execute("SELECT COUNT(*) FROM vends").fetchone(),
            "messages": conn.execute(
                "SELECT COUNT(*) FROM outbox WHERE kind <> 'reply'"
            ).fetchone(),
            "purchase_events": conn.execute(
                "SELECT COUNT(*) FROM events WHERE purchase_id IS NOT NULL"
            ).fetchone(),
        }


@pytest.fixture
async def gateway(aiohttp_client: ClientFactory, tmp_path: Path) -> tuple[Client, str, Path]:
    """The composed gateway, its callback secret, and its database file."""
    config = Config.load(
        env={},
        overrides={
            "data_dir": tmp_path,
            "public_url": "http://127.0.0.1:9",  # simulators' callbacks go nowhere
            "log_level": "critical",
        },
    )
    app = await build_app(config)
    client = await aiohttp_client(app)
    return client, app[RUNTIME].callback_secret.reveal(), tmp_path / "gateway.db"


async def _post_and_check(
    gateway: tuple[Client, str, Path],
    method: str,
    path: str,
    body: bytes,
    content_type: str,
) -> int:
    client, _, db = gateway
    before = money_state(db)
    response = await client.request(method, path, data=body, headers={"Content-Type": content_type})
    await response.read()
    assert response.status < 500, (path, body[:200], response.status)
    assert money_state(db) == before, (path, body[:200])
    return response.status


# --- the routes --------------------------------------------------------------------------------

USSD_FIELDS = ["sessionId", "serviceCode", "phoneNumber", "networkCode", "text"]
EVENT_FIELDS = ["sessionId", "status", "phoneNumber", "input", "hopsCount", "durationInMillis"]
SMS_FIELDS = ["from", "to", "text", "id", "date", "linkId", "networkCode"]
DLR_FIELDS = ["id", "status", "phoneNumber", "networkCode", "failureReason", "retryCount"]


def _form_bytes(form: dict[str, str]) -> bytes:
    from urllib.parse import urlencode  # noqa: PLC0415 - only the fuzz helpers need it

    return urlencode(form).encode("utf-8", "surrogatepass")


@FUZZ
@given(form=forms(USSD_FIELDS), raw=st.binary(max_size=200), use_raw=st.booleans())
async def test_garbage_ussd_hops_never_fail_or_touch_money(
    gateway: tuple[Client, str, Path], form: dict[str, str], raw: bytes, use_raw: bool
) -> None:
    """Any USSD hop answers below 500 with CON/END when 200, and moves no money or token."""
    body = raw if use_raw else _form_bytes(form)
    client, _, db = gateway
    before = money_state(db)
    response = await client.post(
        "/ussd/africastalking",
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    text = await response.text(errors="replace")
    assert response.status < 500
    if response.status == 200:
        assert text.startswith(("CON ", "END "))
        assert len(text) <= 182
    assert money_state(db) == before


@FUZZ
@given(form=forms(EVENT_FIELDS), raw=st.binary(max_size=200), use_raw=st.booleans())
async def test_garbage_ussd_session_events_never_fail_or_touch_money(
    gateway: tuple[Client, str, Path], form: dict[str, str], raw: bytes, use_raw: bool
) -> None:
    """Any end-of-session notification answers below 500 and moves no money or token."""
    body = raw if use_raw else _form_bytes(form)
    await _post_and_check(
        gateway, "POST", "/ussd/africastalking/events", body, "application/x-www-form-urlencoded"
    )


@FUZZ
@given(form=forms(SMS_FIELDS), raw=st.binary(max_size=200), use_raw=st.booleans())
async def test_garbage_inbound_sms_never_fails_or_touches_money(
    gateway: tuple[Client, str, Path], form: dict[str, str], raw: bytes, use_raw: bool
) -> None:
    """Any inbound SMS answers below 500 and moves no money or token (a reply may be sent)."""
    body = raw if use_raw else _form_bytes(form)
    await _post_and_check(
        gateway, "POST", "/sms/africastalking/inbound", body, "application/x-www-form-urlencoded"
    )


@FUZZ
@given(form=forms(DLR_FIELDS), raw=st.binary(max_size=200), use_raw=st.booleans())
async def test_garbage_delivery_reports_never_fail_or_touch_money(
    gateway: tuple[Client, str, Path], form: dict[str, str], raw: bytes, use_raw: bool
) -> None:
    """Any delivery report answers below 500 and changes no message or purchase."""
    body = raw if use_raw else _form_bytes(form)
    await _post_and_check(
        gateway,
        "POST",
        "/sms/africastalking/delivery",
        body,
        "application/x-www-form-urlencoded",
    )


PAYMENT_ROUTES: list[tuple[str, str, st.SearchStrategy[Any]]] = [
    ("POST", "daraja/{secret}/stk", stk_callbacks),
    ("POST", "daraja/{secret}/c2b/validation", c2b_payloads),
    ("POST", "daraja/{secret}/c2b/confirmation", c2b_payloads),
    ("POST", "daraja/{secret}/status/result", status_results),
    ("POST", "daraja/{secret}/status/timeout", status_results),
    ("PUT", "momo/{secret}/callback", momo_callbacks),
    ("POST", "momo/{secret}/callback", momo_callbacks),
    ("POST", "airtel/{secret}/callback", airtel_callbacks),
]


@settings(FUZZ, max_examples=250)
@given(
    route=st.sampled_from(PAYMENT_ROUTES).flatmap(
        lambda r: st.tuples(st.just(r[0]), st.just(r[1]), bodies(r[2]))
    ),
    wrong_secret=st.booleans(),
)
async def test_garbage_payment_callbacks_never_fail_or_touch_money(
    gateway: tuple[Client, str, Path],
    route: tuple[str, str, tuple[bytes, str]],
    wrong_secret: bool,
) -> None:
    """Any body on any provider callback route answers below 500 and never pays or vends."""
    method, template, (body, content_type) = route
    secret = "not-the-secret" if wrong_secret else gateway[1]
    status = await _post_and_check(
        gateway, method, "/payments/" + template.format(secret=secret), body, content_type
    )
    if wrong_secret:
        assert status == 404
