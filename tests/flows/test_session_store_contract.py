"""The ``SessionStore`` contract, written once and run against memory, SQLite and Redis.

Time is moved by a per-backend time machine: the fake clock for memory and SQLite; for Redis,
whose expiry runs on the server's clock, every key's remaining life (``PTTL``) is cut by the
same amount, so the expiry being tested is still Redis's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio

from flows.engine import UssdEngine, UssdHop
from flows.journeys import build_screens
from flows.ports import SessionStore
from flows.sessions import MemorySessionStore, SqliteSessionStore
from flows.testing import FakeCustomerServices, UssdTester, make_meter_number
from gateway.phone import Msisdn
from gateway.redis_sessions import RedisSessionStore, SessionStoreUnavailable, ttl_ms
from tests.support.clock import SecondsClock

REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_START = (
    'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no'
)


@dataclass
class Backend:
    """A store under test, how to move its time, and how to open a second instance on it."""

    store: SessionStore
    advance: Callable[[float], Awaitable[None]]
    peer: Callable[[], SessionStore] | None


async def redis_client_or_skip() -> redis.asyncio.Redis:
    """A client on the test Redis; skipped (failed under CI) when it does not answer."""
    client = redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True, socket_timeout=2)
    try:
        await client.ping()
    except redis.exceptions.ConnectionError as exc:
        await client.aclose()
        message = f"Redis at {REDIS_URL} does not answer ({exc}); start it: {REDIS_START}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return client


def redis_time_machine(
    client: redis.asyncio.Redis, prefix: str
) -> Callable[[float], Awaitable[None]]:
    """Move Redis time for the keys under ``prefix``: cut each key's remaining life."""

    async def advance(seconds: float) -> None:
        step = ttl_ms(seconds)
        async for name in client.scan_iter(match=prefix + "*"):
            left = await client.pttl(name)
            if left < 0:  # -2: gone already; -1: no expiry (never written by the store)
                continue
            if left <= step:
                await client.delete(name)
            else:
                await client.pexpire(name, left - step)

    return advance


@contextlib.asynccontextmanager
async def open_backend(kind: str, tmp_path: Path) -> AsyncIterator[Backend]:
    """A fresh store of ``kind`` (memory, sqlite, redis) with its time machine; cleaned up."""
    clock = SecondsClock()

    async def move_clock(seconds: float) -> None:
        clock.now += seconds

    if kind == "memory":
        yield Backend(MemorySessionStore(clock), move_clock, None)
        return
    if kind == "sqlite":
        opened: list[SqliteSessionStore] = []

        def open_sqlite() -> SessionStore:
            store = SqliteSessionStore.open(tmp_path / "sessions.db", clock=clock)
            opened.append(store)
            return store

        try:
            yield Backend(open_sqlite(), move_clock, open_sqlite)
        finally:
            for sqlite_store in opened:
                sqlite_store.close()
        return
    client = await redis_client_or_skip()
    prefix = f"test:{uuid.uuid4().hex}:"
    stores: list[RedisSessionStore] = []

    def open_redis() -> SessionStore:
        store = RedisSessionStore.from_url(REDIS_URL, prefix=prefix)
        stores.append(store)
        return store

    try:
        yield Backend(open_redis(), redis_time_machine(client, prefix), open_redis)
    finally:
        for redis_store in stores:
            await redis_store.aclose()
        async for name in client.scan_iter(match=prefix + "*"):
            await client.delete(name)
        await client.aclose()


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each SessionStore implementation, fresh."""
    async with open_backend(request.param, tmp_path) as opened:
        yield opened


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def shared(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each implementation meant to be shared by several processes (memory is not)."""
    async with open_backend(request.param, tmp_path) as opened:
        yield opened


# ------------------------------------------------------------------------------------ contract


async def test_put_then_get_returns_the_latest_value(backend: Backend) -> None:
    """A stored value reads back, and a second put replaces it."""
    await backend.store.put("k", "v1", 10)
    assert await backend.store.get("k") == "v1"
    await backend.store.put("k", "v2", 10)
    assert await backend.store.get("k") == "v2"


async def test_a_key_never_written_reads_as_absent(backend: Backend) -> None:
    """Reading a key never written gives None."""
    assert await backend.store.get("never") is None


# Redis's clock also runs while a test runs: "still there" checks keep a second of margin.


async def test_a_value_lives_exactly_its_ttl(backend: Backend) -> None:
    """A second before its ttl a value is there; half a second after, it is gone."""
    await backend.store.put("k", "v", 10)
    await backend.advance(9)
    assert await backend.store.get("k") == "v"
    await backend.advance(1.5)
    assert await backend.store.get("k") is None


async def test_a_fractional_ttl_is_honoured(backend: Backend) -> None:
    """A ttl of 2.25 s is not rounded to whole seconds: there after 1.25 s, gone after 2.3 s."""
    await backend.store.put("k", "v", 2.25)
    await backend.advance(1.25)
    assert await backend.store.get("k") == "v"
    await backend.advance(1.05)
    assert await backend.store.get("k") is None


async def test_put_restarts_the_expiry(backend: Backend) -> None:
    """Each hop's put keeps a session alive for another full ttl."""
    await backend.store.put("k", "v1", 10)
    await backend.advance(8)
    await backend.store.put("k", "v2", 10)
    await backend.advance(8)
    assert await backend.store.get("k") == "v2"


async def test_add_stores_only_when_absent_or_expired(backend: Backend) -> None:
    """Adding is set-if-absent: refused while the key lives, allowed once it has expired."""
    assert await backend.store.add("k", "first", 10)
    assert not await backend.store.add("k", "second", 10)
    assert await backend.store.get("k") == "first"
    await backend.advance(11)
    assert await backend.store.add("k", "third", 10)
    assert await backend.store.get("k") == "third"


async def test_concurrent_adds_store_exactly_one(backend: Backend) -> None:
    """Of fifty adds of one key at once, exactly one is told it stored, and its value stays."""
    results = await asyncio.gather(*(backend.store.add("k", f"v{i}", 10) for i in range(50)))
    assert results.count(True) == 1
    assert await backend.store.get("k") == f"v{results.index(True)}"


async def test_delete_removes_one_key_and_tolerates_absence(backend: Backend) -> None:
    """Deleting removes that key only; deleting a missing key is fine."""
    await backend.store.put("a", "1", 10)
    await backend.store.put("b", "2", 10)
    await backend.store.delete("a")
    await backend.store.delete("a")
    assert await backend.store.get("a") is None
    assert await backend.store.get("b") == "2"


async def test_values_round_trip_unchanged(backend: Backend) -> None:
    """JSON with accents, newlines and a 182-character screen comes back byte for byte."""
    value = '{"screen":"Lipa umeme\\nÉlectricité à crédit","stack":["home"]}' + "é" * 182
    await backend.store.put("json", value, 10)
    assert await backend.store.get("json") == value


async def test_a_second_instance_shares_the_sessions(shared: Backend) -> None:
    """Two instances on one shared store see each other's writes; adds across them race fairly."""
    assert shared.peer is not None
    other = shared.peer()
    await shared.store.put("k", "v", 10)
    assert await other.get("k") == "v"
    stores = (shared.store, other)
    results = await asyncio.gather(*(stores[i % 2].add("race", str(i), 10) for i in range(40)))
    assert results.count(True) == 1


# ------------------------------------------------------------------------------- Redis specifics


@pytest.mark.redis
async def test_redis_expiry_is_set_in_redis_under_the_prefix() -> None:
    """A put sets the key, under the store's prefix, with Redis's own expiry of the ttl."""
    client = await redis_client_or_skip()
    prefix = f"test:{uuid.uuid4().hex}:"
    store = RedisSessionStore.from_url(REDIS_URL, prefix=prefix)
    try:
        await store.put("ussd:session:ATUid_1", "{}", 120)
        left = await client.pttl(prefix + "ussd:session:ATUid_1")
        assert 119_000 < left <= 120_000
    finally:
        await client.delete(prefix + "ussd:session:ATUid_1")
        await store.aclose()
        await client.aclose()


@pytest.mark.redis
async def test_a_connection_killed_by_redis_does_not_reach_the_caller() -> None:
    """After Redis drops the store's connection, get, put and delete carry on."""
    client = await redis_client_or_skip()
    prefix = f"test:{uuid.uuid4().hex}:"
    store = RedisSessionStore.from_url(REDIS_URL, prefix=prefix)
    try:
        await store.put("k", "v", 10)
        for _ in range(3):
            victim = await store._client.client_id()
            assert await client.client_kill_filter(_id=str(victim)) == 1
            assert await store.get("k") == "v"
        await store.put("k", "w", 10)
        assert await store.get("k") == "w"
        await store.delete("k")
        assert await store.get("k") is None
    finally:
        await store.aclose()
        await client.aclose()


async def test_redis_down_raises_session_store_unavailable() -> None:
    """A store whose Redis does not answer raises SessionStoreUnavailable, marked retryable."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = RedisSessionStore.from_url(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
    try:
        for call in (store.get("k"), store.add("k", "v", 10)):
            with pytest.raises(SessionStoreUnavailable) as caught:
                await call
            assert caught.value.retryable
    finally:
        await store.aclose()


@pytest.mark.redis
async def test_a_ussd_journey_alternating_between_two_instances_is_unbroken() -> None:
    """Hops spread over two engines sharing Redis read exactly as on one engine in memory."""
    client = await redis_client_or_skip()
    prefix = f"test:{uuid.uuid4().hex}:"
    clock = SecondsClock()
    meter = make_meter_number("3701234567")

    def world() -> FakeCustomerServices:
        services = FakeCustomerServices()
        services.add_meter(meter, name="J*** O***", area="Kibera")
        return services

    def transport(
        engines: list[UssdEngine],
    ) -> Callable[[Mapping[str, str]], Awaitable[tuple[int, str]]]:
        hops = 0

        async def post(form: Mapping[str, str]) -> tuple[int, str]:
            nonlocal hops
            engine = engines[hops % len(engines)]
            hops += 1
            reply = await engine.handle(
                UssdHop(
                    session_id=form["sessionId"],
                    phone=Msisdn(form["phoneNumber"]),
                    service_code=form["serviceCode"],
                    text=form["text"],
                )
            )
            return 200, reply.render_at()

        return post

    async def journey(phone: UssdTester) -> list[tuple[str, str]]:
        await phone.dial()
        await phone.answer("1")
        await phone.answer(meter)
        await phone.resend()
        await phone.dial()  # a redial within the resume window
        await phone.answer("1")
        return phone.transcript

    single = UssdEngine(world(), MemorySessionStore(clock), build_screens(), clock=clock)
    expected = await journey(UssdTester(transport([single]), phone="+254711000001"))
    stores = [RedisSessionStore.from_url(REDIS_URL, prefix=prefix) for _ in range(2)]
    shared = world()
    engines = [UssdEngine(shared, store, build_screens(), clock=clock) for store in stores]
    try:
        spread = await journey(UssdTester(transport(engines), phone="+254711000001"))
    finally:
        for store in stores:
            await store.aclose()
        async for name in client.scan_iter(match=prefix + "*"):
            await client.delete(name)
        await client.aclose()
    assert spread == expected
    assert len({body for _, body in expected}) > 3
