"""The Redis session store's call retries (tenacity), against a client that fails on purpose."""

from __future__ import annotations

from typing import Any, cast

import pytest
import redis.asyncio
import redis.exceptions

from gateway.redis_sessions import RedisSessionStore, SessionStoreUnavailable


class FlakyClient:
    """Fails the first ``failures`` calls with ``error``, then answers ``"value"``."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def _answer(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "value"

    async def get(self, *_: Any) -> str:
        """``GET``."""
        return await self._answer()

    async def set(self, *_: Any, **__: Any) -> str:
        """``SET`` (``NX`` for ``add``)."""
        return await self._answer()


def _store(client: FlakyClient, attempts: int = 3) -> RedisSessionStore:
    return RedisSessionStore(
        cast("redis.asyncio.Redis", client), attempts=attempts, backoff_s=0.001
    )


async def test_a_dropped_connection_is_retried_until_it_answers() -> None:
    """Two transient failures, three attempts: the third answers."""
    client = FlakyClient(2, redis.exceptions.ConnectionError("reset"))
    assert await _store(client).get("k") == "value"
    assert client.calls == 3


async def test_the_attempts_run_out_as_unavailable_and_retryable() -> None:
    """Transient failures past the attempts: SessionStoreUnavailable, retryable."""
    client = FlakyClient(5, redis.exceptions.TimeoutError("slow"))
    with pytest.raises(SessionStoreUnavailable) as caught:
        await _store(client).get("k")
    assert caught.value.retryable
    assert client.calls == 3


async def test_add_is_never_retried() -> None:
    """``SET NX`` may have landed before the connection broke: one try only."""
    client = FlakyClient(1, redis.exceptions.ConnectionError("reset"))
    with pytest.raises(SessionStoreUnavailable):
        await _store(client).add("k", "v", ttl_s=10)
    assert client.calls == 1


async def test_a_refusal_is_not_retried_and_not_retryable() -> None:
    """Any other Redis error (a refused command) fails at once, for good."""
    client = FlakyClient(1, redis.exceptions.ResponseError("WRONGTYPE"))
    with pytest.raises(SessionStoreUnavailable) as caught:
        await _store(client).get("k")
    assert not caught.value.retryable
    assert client.calls == 1
