"""Check vendor API responses against ``gateway/vendor/openapi.json`` (JSON Schema 2020-12).

OpenAPI 3.1's schemas are JSON Schema 2020-12: each response body is validated by
``jsonschema`` against the schema the document gives its operation, status and media type,
with the document itself as the ``$ref`` target. Declared required headers are checked too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from gateway.web.vendor import openapi_document

_BASE = "urn:sts-gateway:vendor-openapi"


@dataclass(frozen=True)
class Exchange:
    """One response of the vendor API as the server sent it."""

    method: str
    path: str  # the route's template, e.g. /vendor/v1/vends/{vend_id}
    status: int
    content_type: str
    headers: Mapping[str, str] = field(repr=False)
    body: bytes = field(repr=False)


@cache
def _document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(openapi_document())
    return document


@cache
def _registry() -> Registry[Any]:
    resource = Resource.from_contents(_document(), default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(_BASE, resource)
    return registry


def _resolve(node: Mapping[str, Any]) -> Mapping[str, Any]:
    while "$ref" in node:
        target: Any = _document()
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _validator(pointer: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"{_BASE}#{pointer}"}, registry=_registry())


def problems(exchange: Exchange) -> list[str]:
    """What in ``exchange`` the document does not allow (empty: it conforms)."""
    where = f"{exchange.method} {exchange.path} {exchange.status}"
    operation = _document()["paths"].get(exchange.path, {}).get(exchange.method.lower())
    if operation is None:
        return [f"{where}: not a documented operation"]
    responses = operation["responses"]
    key = str(exchange.status) if str(exchange.status) in responses else "default"
    if key not in responses:
        return [f"{where}: status not documented"]
    response = _resolve(responses[key])
    found: list[str] = []
    for name, header in response.get("headers", {}).items():
        if header.get("required") and name not in exchange.headers:
            found.append(f"{where}: missing header {name}")
    content = response.get("content", {})
    if exchange.content_type not in content:
        return [*found, f"{where}: media type {exchange.content_type} not documented"]
    schema = content[exchange.content_type].get("schema")
    if schema is None:
        return found
    pointer = _pointer(operation["operationId"], key, exchange.content_type)
    if exchange.content_type in {"text/csv", "application/jsonl"}:
        instance: object = exchange.body.decode()
    else:
        instance = json.loads(exchange.body)
    for error in _validator(pointer).iter_errors(instance):
        path = "/".join(str(p) for p in error.absolute_path)
        found.append(f"{where}: {path or '(body)'}: {error.message}")
    return found


def _pointer(operation_id: str, status: str, media: str) -> str:
    """The JSON pointer to an operation's response schema (through a $ref'd response)."""
    for path, operations in _document()["paths"].items():
        for method, operation in operations.items():
            if operation.get("operationId") != operation_id:
                continue
            response = operation["responses"][status]
            base = f"/paths/{_escape(path)}/{method}/responses/{status}"
            if "$ref" in response:
                base = response["$ref"].removeprefix("#")
            return f"{base}/content/{_escape(media)}/schema"
    raise KeyError(operation_id)


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")
