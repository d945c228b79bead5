"""Per-vendor and per-terminal rate limits across instances: Redis buckets, one Lua script.

Two gateway instances (each its own ``VendorService``, rate limiter, Redis connection and HTTP
server) share one Redis: together they admit a bucket's rate, not twice it. Without Redis each
process has its own buckets (the contrast). Redis down: the in-process bucket judges.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio
from aiohttp import web

from gateway.app import _rate_limiter as app_rate_limiter
from gateway.config import Config
from gateway.vendor.limits import LocalRateLimiter, RateLimiter, RedisRateLimiter
from gateway.vendor.service import VendorService, register_vendor
from gateway.vendor_client import VendorClient, VendorReply
from gateway.web.vendor import vendor_routes
from tests.flows.test_session_store_contract import REDIS_URL, redis_client_or_skip
from tests.vendor.vendor_support import VendorWorld, unix


@contextlib.asynccontextmanager
async def _redis_prefix() -> AsyncIterator[tuple[redis.asyncio.Redis, str]]:
    client = await redis_client_or_skip()
    prefix = f"test:rate:{uuid.uuid4().hex}:"
    try:
        yield client, prefix
    finally:
        async for name in client.scan_iter(match=prefix + "*"):
            await client.delete(name)
        await client.aclose()


@contextlib.asynccontextmanager
async def _instance(world: VendorWorld, limiter: RateLimiter) -> AsyncIterator[str]:
    """Another gateway instance's vendor API (its own service and limiter) on a loopback port."""
    service = VendorService(
        world.vending,
        world.ledger,
        world.vendors,
        clock=world.clock,
        engine_wait_s=2.0,
        limiter=limiter,
        master_key=world.master_key,
    )
    app = web.Application()
    app.add_routes(vendor_routes(service))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def _redis_limiter(world: VendorWorld, prefix: str) -> RedisRateLimiter:
    client = redis.asyncio.Redis.from_url(REDIS_URL, socket_timeout=2)
    return RedisRateLimiter(client, prefix=prefix, clock=unix(world.clock))


async def _alternate(clients: list[VendorClient], meter: str, count: int) -> list[VendorReply]:
    return [await clients[n % 2].confirm_meter(meter) for n in range(count)]


@pytest.mark.redis
async def test_two_instances_sharing_redis_admit_the_terminal_rate_once(
    world: VendorWorld,
) -> None:
    """till-1 (60 a minute) through two instances: 60 admitted in all, then 429 Retry-After."""
    async with _redis_prefix() as (_client, prefix):
        first, second = _redis_limiter(world, prefix), _redis_limiter(world, prefix)
        try:
            async with (
                _instance(world, first) as url_a,
                _instance(world, second) as url_b,
                VendorClient(url_a, world.key_id, world.secret, terminal="till-1",
                             clock=unix(world.clock)) as a,
                VendorClient(url_b, world.key_id, world.secret, terminal="till-1",
                             clock=unix(world.clock)) as b,
            ):  # fmt: skip
                replies = await _alternate([a, b], world.drns[0], 70)
                refused = [r for r in replies if r.status != 200]
                assert [r.status for r in replies[:60]] == [200] * 60
                assert {r.status for r in refused} == {429}
                assert {r.problem for r in refused} == {"rate_limited"}
                assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
                # Both instances refused some: the bucket is one, not one each.
                assert {n % 2 for n, r in enumerate(replies) if r.status == 429} == {0, 1}
                world.clock.advance(2)  # two tokens back (1 a second)
                again = await _alternate([b, a], world.drns[0], 3)
                assert [r.status for r in again] == [200, 200, 429]
        finally:
            await first.aclose()
            await second.aclose()


@pytest.mark.redis
async def test_the_vendor_bucket_spans_its_terminals_and_instances(world: VendorWorld) -> None:
    """A vendor at 20 a minute with a key bound to no terminal: 20 admitted over two instances."""
    made = await register_vendor(
        world.vendors, "kiosk", name="Kiosk", currency="KES", rate_per_minute=20, actor="test",
        master_key=world.master_key,
    )  # fmt: skip
    async with _redis_prefix() as (_client, prefix):
        first, second = _redis_limiter(world, prefix), _redis_limiter(world, prefix)
        try:
            async with (
                _instance(world, first) as url_a,
                _instance(world, second) as url_b,
                VendorClient(url_a, made.key.key_id, made.key.secret,
                             clock=unix(world.clock)) as a,
                VendorClient(url_b, made.key.key_id, made.key.secret,
                             clock=unix(world.clock)) as b,
            ):  # fmt: skip
                replies = await _alternate([a, b], world.drns[0], 30)
        finally:
            await first.aclose()
            await second.aclose()
    assert sum(r.status == 200 for r in replies) == 20
    assert {r.problem for r in replies[20:]} == {"rate_limited"}


async def test_without_redis_each_process_has_its_own_buckets(world: VendorWorld) -> None:
    """The contrast: in-process buckets admit the rate per instance (hence Redis for many)."""
    async with (
        _instance(world, LocalRateLimiter(clock=unix(world.clock))) as url_a,
        _instance(world, LocalRateLimiter(clock=unix(world.clock))) as url_b,
        VendorClient(url_a, world.key_id, world.secret, terminal="till-1",
                     clock=unix(world.clock)) as a,
        VendorClient(url_b, world.key_id, world.secret, terminal="till-1",
                     clock=unix(world.clock)) as b,
    ):  # fmt: skip
        replies = await _alternate([a, b], world.drns[0], 130)
    assert sum(r.status == 200 for r in replies) == 120


@pytest.mark.redis
async def test_the_script_takes_exactly_the_rate_under_concurrency() -> None:
    """300 concurrent admits from three limiters on one bucket of 50 (frozen clock): 50 taken."""
    async with _redis_prefix() as (_client, prefix):
        limiters = [
            RedisRateLimiter(
                redis.asyncio.Redis.from_url(REDIS_URL, socket_timeout=2),
                prefix=prefix,
                clock=lambda: 1_800_000_000.0,
            )
            for _ in range(3)
        ]
        try:
            waits = await asyncio.gather(
                *(limiters[n % 3].admit([("{v}:v", 50)]) for n in range(300))
            )
        finally:
            for limiter in limiters:
                await limiter.aclose()
    assert sum(1 for w in waits if w == 0) == 50
    assert all(0 < w <= 1.2 for w in waits if w)  # one token is 1.2 s at 50 a minute


@pytest.mark.redis
async def test_a_refusal_by_one_bucket_takes_from_none() -> None:
    """The terminal's bucket empty: the vendor's keeps its tokens (all buckets or none)."""
    async with _redis_prefix() as (client, prefix):
        limiter = RedisRateLimiter(
            redis.asyncio.Redis.from_url(REDIS_URL, socket_timeout=2),
            prefix=prefix,
            clock=lambda: 1_800_000_000.0,
        )
        try:
            assert await limiter.admit([("{v}:v", 10), ("{v}:t:a", 1)]) == 0
            assert await limiter.admit([("{v}:v", 10), ("{v}:t:a", 1)]) == pytest.approx(60)
            tokens = await client.hget(prefix + "{v}:v", "tokens")
            ttl = await client.ttl(prefix + "{v}:v")
        finally:
            await limiter.aclose()
    assert tokens is not None
    assert float(tokens) == 9.0
    assert 0 < ttl <= 120


async def test_redis_down_falls_back_to_the_in_process_bucket() -> None:
    """No Redis on the port: the request is judged by this process's bucket, not refused."""
    limiter = RedisRateLimiter(
        redis.asyncio.Redis.from_url(
            "redis://127.0.0.1:9/0", socket_timeout=0.2, socket_connect_timeout=0.2
        ),
        clock=lambda: 1_800_000_000.0,
    )
    try:
        waits = [await limiter.admit([("{v}:v", 3)]) for _ in range(4)]
    finally:
        await limiter.aclose()
    assert waits[:3] == [0, 0, 0]
    assert waits[3] > 0


@pytest.mark.redis
async def test_the_gateway_with_redis_limits_in_redis_and_without_in_process(
    tmp_path: Path,
) -> None:
    """The composition root: ``session_store = "redis"`` → Redis buckets; otherwise local."""
    await (await redis_client_or_skip()).aclose()
    async with contextlib.AsyncExitStack() as stack:
        with_redis = Config.load(
            env={}, overrides={"data_dir": tmp_path, "session_store": "redis",
                               "redis_url": REDIS_URL},
        )  # fmt: skip
        limiter = await app_rate_limiter(stack, with_redis)
        assert isinstance(limiter, RedisRateLimiter)
        assert await limiter.admit([(f"{{{uuid.uuid4().hex}}}:v", 5)]) == 0
        local = await app_rate_limiter(stack, Config.load(env={}, overrides={"data_dir": tmp_path}))
        assert isinstance(local, LocalRateLimiter)
