"""``/vendor/v1``: the vendor API for banks, agents and sales points (JSON over HTTP).

Each handler reads the request, has ``VendorService`` authenticate it (every request is
signed, see ``gateway/vendor/signing.py``) and answer, and writes the ``Answer`` back; every
refusal is ``application/problem+json`` with a stable ``code``. The rules live in
``gateway/vendor/service.py``; the routes are documented in ``gateway/vendor/openapi.json``
(served at ``/vendor/v1/openapi.json``).
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import json
from collections.abc import Awaitable, Callable
from datetime import date
from typing import Any, Final

import structlog
from aiohttp import web

from gateway.vendor.service import Answer, Caller, Problem, VendorService
from gateway.vendor.statement import render_statement

log = structlog.get_logger()

PREFIX: Final = "/vendor/v1"
MAX_BODY: Final = 16 * 1024

Handler = Callable[[web.Request, Caller, bytes], Awaitable[Answer]]


def _response(answer: Answer) -> web.Response:
    return web.Response(
        status=answer.status,
        body=answer.body,
        headers={"Content-Type": answer.content_type, **answer.headers},
    )


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Problem(400, "invalid_request", "the body is not JSON") from exc
    if not isinstance(data, dict):
        raise Problem(400, "invalid_request", "the body is a JSON object")
    return data


def openapi_document() -> bytes:
    """The OpenAPI 3.1 document kept in the repository (``gateway/vendor/openapi.json``)."""
    return importlib.resources.files("gateway.vendor").joinpath("openapi.json").read_bytes()


def _client_address(request: web.Request) -> str | None:
    """The caller's address: the TCP peer, or behind a local/private proxy its last forward.

    ``deploy/``'s Caddy replaces ``X-Forwarded-For`` with its own TCP peer, so the last entry
    is the vendor's address as the proxy saw it.
    """
    remote = request.remote
    try:
        proxied = remote is not None and ipaddress.ip_address(remote).is_private
    except ValueError:
        proxied = False
    forwarded = request.headers.get("X-Forwarded-For", "")
    if proxied and forwarded:
        return forwarded.rsplit(",", 1)[-1].strip()[:64] or remote
    return remote


async def _read_body(request: web.Request) -> bytes:
    body = await request.content.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise Problem(413, "body_too_large", f"at most {MAX_BODY} bytes")
    return body


def _signed(
    service: VendorService, scope: str, handler: Handler
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``handler`` behind the signature check for keys with one of ``scope``'s scopes."""
    return _signed_any(service, ROUTE_SCOPES[scope], handler)


#: The scopes that admit each kind of route (a key needs one of them).
ROUTE_SCOPES: Final[dict[str, frozenset[str]]] = {
    "meters": frozenset({"meters"}),
    "vend": frozenset({"vend"}),
    "read": frozenset({"read", "vend"}),
    "statement": frozenset({"statement"}),
}


def _signed_any(
    service: VendorService, scopes: frozenset[str], handler: Handler
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``handler`` behind the signature check, its problems as ``application/problem+json``."""

    async def handle(request: web.Request) -> web.Response:
        try:
            body = await _read_body(request)
            caller = await service.authenticate(
                headers=request.headers,
                method=request.method,
                target=request.raw_path,
                body=body,
                remote=_client_address(request),
                scopes=scopes,
            )
            answer = await handler(request, caller, body)
        except Problem as problem:
            if problem.status in {401, 403, 429}:
                log.warning("vendor_refused", code=problem.code, path=request.path)
            answer = problem.answer()
        return _response(answer)

    return handle


class _Handlers:
    """One method per route: HTTP in, a ``VendorService`` call, its ``Answer`` out."""

    def __init__(self, service: VendorService) -> None:
        self._service = service

    async def meter(self, request: web.Request, caller: Caller, _body: bytes) -> Answer:
        return await self._service.confirm_meter(caller, request.match_info["meter"])

    async def quote(self, _request: web.Request, caller: Caller, body: bytes) -> Answer:
        return await self._service.quote(caller, _json_body(body))

    async def vend(self, request: web.Request, caller: Caller, body: bytes) -> Answer:
        data = _json_body(body)
        return await self._service.vend(caller, request.headers.get("Idempotency-Key"), body, data)

    async def by_key(self, request: web.Request, caller: Caller, _body: bytes) -> Answer:
        key = request.query.get("idempotency_key")
        if not key:
            raise Problem(400, "invalid_request", "idempotency_key: the query parameter")
        return await self._service.last_response(caller, idempotency_key=key)

    async def by_id(self, request: web.Request, caller: Caller, _body: bytes) -> Answer:
        return await self._service.last_response(caller, vend_id=request.match_info["vend_id"])

    async def reprint(self, request: web.Request, caller: Caller, _body: bytes) -> Answer:
        return await self._service.reprint(caller, request.match_info["vend_id"])

    async def reversal(self, request: web.Request, caller: Caller, _body: bytes) -> Answer:
        return await self._service.reversal(caller, request.match_info["vend_id"])

    async def statement(self, request: web.Request, caller: Caller, _body: bytes) -> Answer:
        try:
            day = date.fromisoformat(request.match_info["day"])
        except ValueError as exc:
            raise Problem(400, "invalid_request", "the day is YYYY-MM-DD") from exc
        form = request.query.get("format", "jsonl")
        if form not in {"csv", "jsonl"}:
            raise Problem(400, "invalid_request", "format: csv or jsonl")
        found = await self._service.statement(caller.vendor.vendor_id, day)
        media = "text/csv" if form == "csv" else "application/jsonl"
        return Answer(status=200, body=render_statement(found, form), content_type=media)


async def _openapi(_request: web.Request) -> web.Response:
    return web.Response(body=openapi_document(), content_type="application/json")


#: The signed routes: method, path under ``PREFIX``, the scope kind (``ROUTE_SCOPES``), handler.
SIGNED_ROUTES: Final = (
    ("GET", "/meters/{meter}", "meters", "meter"),
    ("POST", "/quotes", "vend", "quote"),
    ("POST", "/vends", "vend", "vend"),
    ("GET", "/vends", "read", "by_key"),
    ("GET", "/vends/{vend_id}", "read", "by_id"),
    ("GET", "/vends/{vend_id}/reprint", "read", "reprint"),
    ("POST", "/vends/{vend_id}/reversal", "vend", "reversal"),
    ("GET", "/statements/{day}", "statement", "statement"),
)


def vendor_routes(service: VendorService) -> list[web.RouteDef]:
    """The vendor API's routes over ``service``."""
    h = _Handlers(service)
    routes = [web.get(f"{PREFIX}/openapi.json", _openapi)]
    for method, path, scope, name in SIGNED_ROUTES:
        handler = _signed(service, scope, getattr(h, name))
        routes.append(web.route(method, PREFIX + path, handler))
    return routes
