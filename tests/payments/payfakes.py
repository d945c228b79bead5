"""Test doubles for the payment tests: a callback receiver standing in for our web app, a clock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from tests.support.clock import SecondsClock

FakeClock = SecondsClock  # the suite's one fake clock (tests/support/clock.py)


@dataclass
class Received:
    """One request the receiver got."""

    method: str
    path: str
    body: bytes


@dataclass
class CallbackReceiver:
    """An HTTP endpoint that records every callback; per-path hooks decide the answer."""

    received: list[Received] = field(default_factory=list)
    hooks: dict[str, Callable[[bytes], tuple[int, bytes] | Awaitable[tuple[int, bytes]]]] = field(
        default_factory=dict
    )
    base_url: str = ""

    def bodies(self, path: str) -> list[bytes]:
        """The bodies received on ``path``, in order."""
        return [r.body for r in self.received if r.path == path]

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` on this receiver."""
        return f"{self.base_url}{path}"

    async def handle(self, request: web.Request) -> web.Response:
        """Record the request and answer with the path's hook, or a Daraja-style 200."""
        body = await request.read()
        self.received.append(Received(request.method, request.path, body))
        hook = self.hooks.get(request.path)
        outcome = hook(body) if hook else (200, b'{"ResultCode":0}')
        status, answer = outcome if isinstance(outcome, tuple) else await outcome
        return web.Response(status=status, body=answer, content_type="application/json")
