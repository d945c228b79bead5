"""Shared fixtures: a callback receiver standing in for our web app, and a fake clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.payments.payfakes import CallbackReceiver, FakeClock

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


@pytest.fixture
async def receiver(aiohttp_server: ServerFactory) -> CallbackReceiver:
    """A running callback receiver on 127.0.0.1."""
    rec = CallbackReceiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    server = await aiohttp_server(app)
    rec.base_url = str(server.make_url("")).rstrip("/")
    return rec


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """The HTTP client the adapters use; the test owns its lifetime."""
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def clock() -> FakeClock:
    """A clock for token expiry."""
    return FakeClock()
