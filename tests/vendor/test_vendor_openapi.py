"""The OpenAPI 3.1 document kept in the repository matches the routes the gateway serves."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from pathlib import Path

from gateway.ledger import KeyRotation, MeterNumber, MeterStatus
from gateway.ledger.vendor import VendorStatus
from gateway.vendor.service import VendorService
from gateway.vendor_client import VendorClient
from gateway.web.vendor import (
    PREFIX,
    ROUTE_SCOPES,
    SIGNED_ROUTES,
    openapi_document,
    vendor_routes,
)
from tests.vendor.openapi_check import Exchange, problems
from tests.vendor.vendor_support import VendorWorld, unix

PROBLEM = "application/problem+json"


def _served(service: VendorService) -> set[tuple[str, str]]:
    return {(route.method.lower(), route.path) for route in vendor_routes(service)}


def _documented() -> set[tuple[str, str]]:
    document = json.loads(openapi_document())
    assert document["openapi"].startswith("3.1")
    return {
        (method, path)
        for path, operations in document["paths"].items()
        for method in operations
        if method in {"get", "post", "put", "patch", "delete"}
    }


async def test_every_route_documented_and_every_documented_route_served(
    world: VendorWorld,
) -> None:
    """The served (method, path) pairs and the documented ones are the same set."""
    assert _served(world.service) == _documented()


async def test_the_document_is_served_and_names_every_problem_code(world: VendorWorld) -> None:
    """``/vendor/v1/openapi.json`` answers without a signature; every code raised is listed."""
    async with world.client() as client:
        assert client._session is not None
        async with client._session.get(world.url + "/vendor/v1/openapi.json") as reply:
            assert reply.status == 200
            served = await reply.read()
    assert served == openapi_document()
    listed = set(
        json.loads(served)["components"]["schemas"]["Problem"]["properties"]["code"]["enum"]
    )
    root = Path(__file__).parents[2]
    source = "".join(
        (root / module).read_text(encoding="utf-8")
        for module in ("gateway/vendor/service.py", "gateway/web/vendor.py")
    )
    raised = set(re.findall(r'Problem\(\s*\d{3},\s*"([a-z_]+)"', source))
    raised |= {"signature_invalid", "timestamp_skew"}  # from signing.SignatureError
    assert raised <= listed, raised - listed


def test_each_operation_names_the_scopes_its_route_admits() -> None:
    """The document's per-operation security lists exactly the scopes the route accepts."""
    document = json.loads(openapi_document())
    for method, path, kind, _name in SIGNED_ROUTES:
        operation = document["paths"][PREFIX + path][method.lower()]
        listed = {scope for requirement in operation["security"]
                  for scope in requirement["vendorSignature"]}  # fmt: skip
        assert listed == ROUTE_SCOPES[kind], (method, path)


def test_the_check_refuses_what_the_document_does_not_allow() -> None:
    """The schema check can fail: a missing field, an undocumented status, no Retry-After."""
    good = {"vend_id": "P1", "status": "reversed", "refunded_minor": 0}
    path = "/vendor/v1/vends/{vend_id}/reversal"
    json_type = "application/json"

    def exchange(status: int, body: object, headers: dict[str, str] | None = None) -> Exchange:
        raw = json.dumps(body).encode()
        return Exchange("POST", path, status, json_type, headers or {}, raw)

    assert problems(exchange(200, good)) == []
    assert problems(exchange(200, {**good, "status": "done"}))
    assert problems(exchange(200, {"vend_id": "P1", "status": "reversed"}))
    assert problems(exchange(200, {**good, "token": "1" * 20}))  # nothing undocumented
    assert problems(exchange(418, good))
    limited = {"type": "x", "title": "x", "status": 429, "code": "rate_limited", "detail": "x"}
    assert problems(Exchange("POST", path, 429, PROBLEM, {}, json.dumps(limited).encode()))
    assert not problems(
        Exchange("POST", path, 429, PROBLEM, {"Retry-After": "3"}, json.dumps(limited).encode())
    )


#: Codes the walk below does not provoke, and where they are proven instead.
NOT_WALKED = {
    "vend_unavailable": "the ledger failing mid-vend (the 503 the vend's retry policy answers)",
}


async def test_a_walk_of_every_route_and_problem_conforms(world: VendorWorld) -> None:  # noqa: PLR0915 - one walk
    """Each operation's success and each problem code, all checked against the schemas.

    The world checks every answer at its end (``vendor_support.recorder``); here the walk
    shows it saw every operation succeed and every documented code.
    """
    drn, blocked_drn, kc_drn = world.drns
    record = await world.ledger.get_meter(blocked_drn)
    await world.ledger.put_meter(dataclasses.replace(record, status=MeterStatus.BLOCKED))
    rotation = KeyRotation(sgc="123457", from_krn=1, to_krn=2, to_base_date=2014)
    await world.ledger.plan_key_rotation(rotation, meters=[MeterNumber(kc_drn)], actor="test")
    day = world.clock.now.date().isoformat()
    meters_only = await world.service.add_key("shop", scopes=frozenset({"meters"}), actor="t")
    far = await world.service.register(
        "far", name="Far", currency="KES", ip_allowlist=("10.0.0.0/8",), actor="t"
    )
    async with (
        world.client() as c,
        world.client(terminal="till-9") as stranger,
        VendorClient(world.url, meters_only.key_id, meters_only.secret,
                     clock=unix(world.clock)) as scoped,
        VendorClient(world.url, far.key.key_id, far.key.secret, clock=unix(world.clock)) as away,
        VendorClient(world.url, world.key_id, "vsk_wrong", clock=unix(world.clock)) as forger,
    ):  # fmt: skip
        await c.confirm_meter(drn)
        await c.confirm_meter("01234567890")  # unknown_meter
        await c.quote(drn, 11_600)
        await c.quote(drn, 500)  # amount_out_of_range
        await c.request("POST", "/vendor/v1/quotes", b'{"meter":"%s","amount_minor":5000,'
                        b'"currency":"USD"}' % drn.encode())  # fmt: skip
        sold = (await c.vend(drn, 11_600, idempotency_key="w1")).json()
        await c.vend(drn, 20_000, idempotency_key="w1")  # idempotency_key_reused
        await c.vend(blocked_drn, 5000, idempotency_key="w2")  # meter_blocked
        await c.vend(drn, 500_000, idempotency_key="w3")  # insufficient_float
        await c.last_response(idempotency_key="w3")  # the stored 402 read back
        body = b'{"accept_key_change":false,"amount_minor":11600,"meter":"%s"}' % kc_drn.encode()
        await c.request("POST", "/vendor/v1/vends", body, headers={"Idempotency-Key": "w4"})
        await c.request("POST", "/vendor/v1/vends", b"[]", headers={"Idempotency-Key": "w5"})
        await c.request("POST", "/vendor/v1/vends", VendorClient.sale_body(drn, 5000))
        await c.request("POST", "/vendor/v1/quotes", b"x" * 20_000)  # body_too_large
        await c.last_response(idempotency_key="w1")
        await c.last_response(vend_id=sold["vend_id"])
        await c.last_response(idempotency_key="never")  # not_found
        await c.reprint(sold["vend_id"])
        await c.reversal(sold["vend_id"])  # token_already_issued
        await c.statement(day)
        await c.statement(day, form="csv")
        await c.statement("yesterday")  # invalid_request
        await stranger.confirm_meter(drn)  # unknown_terminal
        await scoped.quote(drn, 11_600)  # scope_denied
        await away.confirm_meter(drn)  # ip_not_allowed
        await forger.confirm_meter(drn)  # signature_invalid
        saved = c._clock
        c._clock = lambda: saved() + 301
        await c.confirm_meter(drn)  # timestamp_skew
        c._clock = saved
        target = f"/vendor/v1/meters/{drn}"
        await c.request("GET", target, nonce="walk-nonce-0123456789")
        await c.request("GET", target, nonce="walk-nonce-0123456789")  # replayed_request
        # A slow engine: 202, the same key meanwhile 409, a reversal before the token.
        world.engine.delay_s = 0.6
        world.service.engine_wait_s = 0.1
        pending = (await c.vend(drn, 11_600, idempotency_key="w6")).json()
        await c.vend(drn, 11_600, idempotency_key="w6")  # request_in_progress
        await c.request("GET", pending["status_url"])  # 202 read back
        await c.reversal(pending["vend_id"])  # reversed before its token: 200
        await asyncio.sleep(0.8)
        await c.vend(drn, 11_600, idempotency_key="w6")  # vend_reversed, stored
        world.engine.delay_s = 0.0
        await world.vendors.set_vendor_status("shop", VendorStatus.SUSPENDED, actor="t")
        await c.confirm_meter(drn)  # vendor_suspended
        await world.vendors.set_vendor_status("shop", VendorStatus.ACTIVE, actor="t")
        for _ in range(60):
            await c.confirm_meter(drn)  # past till-1's 60 a minute: rate_limited
        async with c._session.get(world.url + "/vendor/v1/openapi.json") as document:  # type: ignore[union-attr]
            assert document.status == 200
    operations = {(e.method, e.path) for e in world.exchanges if e.status < 300}
    documented = {
        (method.upper(), path)
        for path, ops in json.loads(openapi_document())["paths"].items()
        for method in ops
    }
    assert operations == documented
    seen = {json.loads(e.body)["code"] for e in world.exchanges if e.content_type == PROBLEM}
    listed = set(
        json.loads(openapi_document())["components"]["schemas"]["Problem"]["properties"]["code"][
            "enum"
        ]
    )
    assert seen == listed - set(NOT_WALKED)
    assert {e.status for e in world.exchanges} >= {200, 201, 202, 400, 401, 402, 403, 404, 409,
                                                   413, 422, 429}  # fmt: skip
    nonconforming = [p for e in world.exchanges for p in problems(e)]
    assert not nonconforming, "\n".join(nonconforming)
