"""The OpenAPI 3.1 document kept in the repository matches the routes the gateway serves."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gateway.vendor.service import VendorService
from gateway.web.vendor import openapi_document, vendor_routes
from tests.vendor.vendor_support import VendorWorld


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
