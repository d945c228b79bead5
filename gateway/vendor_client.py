"""A small client for the vendor API (``/vendor/v1``): signs every request, returns the raw reply.

```python
async with VendorClient("http://127.0.0.1:8080", key_id, secret, terminal="till-1") as client:
    meter = await client.confirm_meter("04000000010")
    reply = await client.vend("04000000010", 10_000, idempotency_key="sale-0001")
    reply.json()["tokens"]  # key-change tokens first, then the credit token
    again = await client.last_response(idempotency_key="sale-0001")  # after a timeout
```

Every method returns a ``VendorReply`` (status, exact body bytes, headers); a problem's stable
code is ``reply.problem``. The client never retries by itself: resend a vend with the same
idempotency key, or ask for the last response.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import aiohttp
from yarl import URL

from gateway.vendor import signing


@dataclass(frozen=True, slots=True)
class VendorReply:
    """One answer of the vendor API."""

    status: int
    body: bytes = field(repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)

    def json(self) -> Any:  # noqa: ANN401 - the API's JSON
        """The body as JSON."""
        return json.loads(self.body)

    @property
    def problem(self) -> str | None:
        """The problem's ``code`` when the answer is ``application/problem+json``."""
        if not self.headers.get("Content-Type", "").startswith("application/problem+json"):
            return None
        code = self.json().get("code")
        return str(code) if code is not None else None


class VendorClient:
    """Signed calls to one gateway as one vendor key (and optionally one terminal)."""

    def __init__(
        self,
        base_url: str,
        key_id: str,
        secret: str,
        *,
        terminal: str = "",
        timeout_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._key_id = key_id
        self._secret = secret
        self._terminal = terminal
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = session
        self._owned = session is None

    async def __aenter__(self) -> Self:
        """Open the session (unless one was given)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the session it opened."""
        if self._owned and self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        *,
        headers: dict[str, str] | None = None,
        nonce: str | None = None,
    ) -> VendorReply:
        """One signed request to ``target`` (path and query, as sent)."""
        if self._session is None:
            raise RuntimeError("use the client as 'async with VendorClient(...) as client'")
        signed = signing.signed_headers(
            key_id=self._key_id,
            secret=self._secret,
            method=method,
            target=target,
            body=body,
            timestamp=int(self._clock()),
            nonce=nonce,
            terminal=self._terminal,
        )
        all_headers = {**signed, **(headers or {})}
        if body:
            all_headers["Content-Type"] = "application/json"
        async with self._session.request(
            method, URL(self._base + target, encoded=True), data=body, headers=all_headers
        ) as response:
            return VendorReply(
                status=response.status, body=await response.read(), headers=dict(response.headers)
            )

    @staticmethod
    def sale_body(meter: str, amount_minor: int, *, customer_phone: str | None = None) -> bytes:
        """The JSON body of a quote or vend."""
        data: dict[str, object] = {"meter": meter, "amount_minor": amount_minor}
        if customer_phone is not None:
            data["customer_phone"] = customer_phone
        return json.dumps(data, sort_keys=True).encode()

    async def confirm_meter(self, meter: str) -> VendorReply:
        """``GET /vendor/v1/meters/{meter}``."""
        return await self.request("GET", f"/vendor/v1/meters/{quote(meter, safe='')}")

    async def quote(self, meter: str, amount_minor: int) -> VendorReply:
        """``POST /vendor/v1/quotes``."""
        return await self.request("POST", "/vendor/v1/quotes", self.sale_body(meter, amount_minor))

    async def vend(
        self,
        meter: str,
        amount_minor: int,
        *,
        idempotency_key: str,
        customer_phone: str | None = None,
    ) -> VendorReply:
        """``POST /vendor/v1/vends`` with ``Idempotency-Key``."""
        body = self.sale_body(meter, amount_minor, customer_phone=customer_phone)
        return await self.request(
            "POST", "/vendor/v1/vends", body, headers={"Idempotency-Key": idempotency_key}
        )

    async def last_response(
        self, *, vend_id: str | None = None, idempotency_key: str | None = None
    ) -> VendorReply:
        """``GET /vendor/v1/vends/{id}`` or ``GET /vendor/v1/vends?idempotency_key=…``."""
        if vend_id is not None:
            return await self.request("GET", f"/vendor/v1/vends/{quote(vend_id, safe='')}")
        if idempotency_key is None:
            raise ValueError("give a vend id or an idempotency key")
        return await self.request(
            "GET", f"/vendor/v1/vends?idempotency_key={quote(idempotency_key, safe='')}"
        )

    async def reprint(self, vend_id: str) -> VendorReply:
        """``GET /vendor/v1/vends/{id}/reprint``: the same tokens, marked as a copy."""
        return await self.request("GET", f"/vendor/v1/vends/{quote(vend_id, safe='')}/reprint")

    async def reversal(self, vend_id: str) -> VendorReply:
        """``POST /vendor/v1/vends/{id}/reversal``."""
        return await self.request("POST", f"/vendor/v1/vends/{quote(vend_id, safe='')}/reversal")

    async def statement(self, day: str, *, form: str = "jsonl") -> VendorReply:
        """``GET /vendor/v1/statements/{day}?format=csv|jsonl``."""
        return await self.request("GET", f"/vendor/v1/statements/{day}?format={form}")
