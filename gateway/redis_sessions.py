"""USSD session state in Redis, shared by every gateway instance behind the load balancer.

A ``flows.ports.SessionStore``: each method is one Redis command, atomic on the server, and keys
expire in Redis itself (``PX``), so a session lives exactly as long as the engine asks
(``max(session_ttl_s, resume_window_s)``) whichever instance served the last hop:

    get → ``GET``    put → ``SET PX``    add → ``SET NX PX``    delete → ``DEL``

Keys are namespaced (``prefix``), so several utilities or a test can share one Redis.

Retries: ``get``, ``put`` and ``delete`` are idempotent and are retried (tenacity) on a dropped
connection or a timeout with capped, jittered backoff. ``add`` is not retried: had the first
``SET NX`` reached Redis before the connection broke, a retry would answer "already there" for our
own write (and the SMS deduplication that uses it would drop a new message). It fails with
``SessionStoreUnavailable`` instead, and the caller's own retry (the aggregator's) decides.

```
SessionStoreUnavailable      gateway.errors.GatewayError: Redis did not answer (retryable)
```
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Final, TypeVar

import redis.asyncio
import redis.exceptions
import structlog
import tenacity
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.errors import GatewayError

T = TypeVar("T")

log = structlog.get_logger()

DEFAULT_PREFIX: Final = "sts:ussd:"
_TRANSIENT: Final = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class SessionStoreUnavailable(GatewayError):
    """The session store did not answer (Redis down, unreachable, too slow).

    Attributes:
        operation: the store method that failed (``get``, ``put``, ``add``, ``delete``).
    """

    def __init__(self, message: str, *, operation: str, retryable: bool = True) -> None:
        super().__init__(message, retryable=retryable)
        self.operation = operation


def ttl_ms(ttl_s: float) -> int:
    """A time to live in whole milliseconds, rounded up (a session never ends early)."""
    return math.ceil(ttl_s * 1000)


class RedisSessionStore:
    """``SessionStore`` on Redis. Build it with ``open_redis_session_store`` (or ``from_url``).

    Args:
        client: a ``redis.asyncio.Redis`` with ``decode_responses=True``.
        prefix: put in front of every key.
        attempts: runs of an idempotent command at most (1 = no retry).
        backoff_s: the first retry's wait at most, seconds; doubled each time, capped at 0.2 s.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        attempts: int = 3,
        backoff_s: float = 0.02,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._attempts = attempts
        self._backoff_s = backoff_s

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = DEFAULT_PREFIX, timeout_s: float = 2.0
    ) -> RedisSessionStore:
        """A store on the Redis at ``url`` (``redis://127.0.0.1:6379/0``); connects lazily.

        ``timeout_s`` bounds connecting and each command: a USSD hop cannot wait long.
        """
        client = redis.asyncio.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # retries are decided here, per command (not ``add``)
        )
        return cls(client, prefix=prefix)

    @property
    def prefix(self) -> str:
        """The namespace in front of every key."""
        return self._prefix

    async def aclose(self) -> None:
        """Close the connections; the store is unusable afterwards."""
        await self._client.aclose()

    async def ping(self) -> None:
        """Check Redis answers (for readiness). Raises ``SessionStoreUnavailable``."""
        await self._run("ping", self._client.ping)

    async def _run(
        self, operation: str, command: Callable[[], Awaitable[T]], *, retry: bool = True
    ) -> T:
        def retrying(state: tenacity.RetryCallState) -> None:
            log.info("session_store_retrying", operation=operation, attempt=state.attempt_number)

        try:
            async for attempt in tenacity.AsyncRetrying(
                retry=tenacity.retry_if_exception_type(_TRANSIENT),
                stop=tenacity.stop_after_attempt(self._attempts if retry else 1),
                # Full jitter: a random wait up to backoff_s · 2^n, capped at 0.2 s.
                wait=tenacity.wait_random_exponential(multiplier=self._backoff_s, max=0.2),
                before_sleep=retrying,
                reraise=True,
            ):
                with attempt:
                    return await command()
        except _TRANSIENT as exc:
            raise SessionStoreUnavailable(
                f"Redis session store did not answer {operation} ({exc})",
                operation=operation,
            ) from exc
        except redis.exceptions.RedisError as exc:
            raise SessionStoreUnavailable(
                f"Redis session store refused {operation} ({exc})",
                operation=operation,
                retryable=False,
            ) from exc
        raise AssertionError(
            "unreachable: tenacity either returns or re-raises"
        )  # pragma: no cover

    async def get(self, key: str) -> str | None:
        """The value under ``key``, or None when absent or expired."""
        name = self._prefix + key
        value = await self._run("get", lambda: self._client.get(name))
        return None if value is None else str(value)

    async def put(self, key: str, value: str, ttl_s: float) -> None:
        """Store ``value`` under ``key`` for ``ttl_s`` seconds, replacing any earlier value.

        A non-positive ``ttl_s`` leaves nothing behind (the value would read as expired).
        """
        name = self._prefix + key
        ms = ttl_ms(ttl_s)
        if ms <= 0:
            await self._run("put", lambda: self._client.delete(name))
            return
        await self._run("put", lambda: self._client.set(name, value, px=ms))

    async def add(self, key: str, value: str, ttl_s: float) -> bool:
        """Store ``value`` only if ``key`` is absent (or expired); True when it was stored.

        One ``SET NX PX``: of any number of instances adding one key at once, exactly one gets
        True. Not retried (see the module docstring).
        """
        name = self._prefix + key
        ms = ttl_ms(ttl_s)
        if ms <= 0:
            return await self.get(key) is None
        stored = await self._run(
            "add", lambda: self._client.set(name, value, px=ms, nx=True), retry=False
        )
        return bool(stored)

    async def delete(self, key: str) -> None:
        """Remove ``key``; removing an absent key does nothing."""
        name = self._prefix + key
        await self._run("delete", lambda: self._client.delete(name))


@contextlib.asynccontextmanager
async def open_redis_session_store(
    url: str, *, prefix: str = DEFAULT_PREFIX, timeout_s: float = 2.0, check: bool = True
) -> AsyncIterator[RedisSessionStore]:
    """The Redis session store at ``url``, closed on exit.

    Args:
        url: ``redis://host:6379/0`` (``rediss://`` for TLS; a password may be in the URL).
        prefix: the namespace in front of every key.
        timeout_s: how long connecting and each command may take, seconds.
        check: ping first, so a wrong URL fails at start-up rather than on a customer's hop.

    Raises:
        SessionStoreUnavailable: ``check`` and Redis does not answer.
    """
    store = RedisSessionStore.from_url(url, prefix=prefix, timeout_s=timeout_s)
    try:
        if check:
            await store.ping()
        yield store
    finally:
        await store.aclose()
