"""The vendor API's rate limits: token buckets per vendor and per terminal.

A bucket holds up to ``rate`` tokens (a minute's worth) and refills at ``rate`` a minute; a request
takes one token from each of its buckets (the vendor's and, when it names one, the terminal's),
only when every bucket has one: a request refused by its terminal's bucket costs its vendor
nothing. A refusal is the seconds until a token is back (the ``Retry-After``).

Two stores:

- ``RedisRateLimiter`` (the gateway configured with Redis, ``session_store = "redis"``): the
  buckets live in Redis and one Lua script reads, refills, takes and writes them atomically, so
  the limits hold across every process and instance sharing that Redis. Should Redis not answer,
  the request is judged by an in-process bucket instead (logged ``vendor_rate_limit_degraded``):
  limits go per process for that while, sales do not stop.
- ``LocalRateLimiter`` (no Redis: SQLite, one process): the buckets in the process's memory.
  With N processes each would admit its own share, hence Redis for more than one.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final, Protocol

import redis.asyncio
import redis.exceptions
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

log = structlog.get_logger()

#: A bucket to take from: its name and its rate (requests a minute, also its capacity).
Bucket = tuple[str, int]

DEFAULT_PREFIX: Final = "sts:vendor-rate:"

# KEYS: the buckets' Redis keys. ARGV[1]: now (Unix seconds, float); ARGV[i + 1]: KEYS[i]'s rate a
# minute. Refill each bucket to now, then take one token from each if each has one. Returns the
# seconds to wait (0: admitted) as a string (Lua numbers become integers on the way out).
_SCRIPT: Final = """
local now = tonumber(ARGV[1])
local tokens, stamps, rates = {}, {}, {}
local wait = 0
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[i + 1])
  local stored = redis.call('HMGET', key, 'tokens', 'at')
  local have = tonumber(stored[1]) or rate
  local at = tonumber(stored[2]) or now
  if now > at then
    have = math.min(rate, have + (now - at) * rate / 60)
    at = now
  end
  tokens[i], stamps[i], rates[i] = have, at, rate
  if have < 1 then
    wait = math.max(wait, (1 - have) * 60 / rate)
  end
end
for i, key in ipairs(KEYS) do
  local have = tokens[i]
  if wait == 0 then
    have = have - 1
  end
  redis.call('HSET', key, 'tokens', tostring(have), 'at', tostring(stamps[i]))
  redis.call('EXPIRE', key, 120)
end
return tostring(wait)
"""


class RateLimiter(Protocol):
    """Takes a token from every bucket, or none."""

    async def admit(self, buckets: Sequence[Bucket]) -> float:
        """0 if admitted (a token taken from each bucket), else the seconds until one is."""
        ...


class LocalRateLimiter:
    """Token buckets in this process's memory (see the module doc)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def admit_now(self, buckets: Sequence[Bucket]) -> float:
        """As ``admit``, synchronously."""
        now = self._clock()
        refilled: list[tuple[str, float]] = []
        wait = 0.0
        for name, rate in buckets:
            tokens, last = self._buckets.get(name, (float(rate), now))
            tokens = min(float(rate), tokens + max(0.0, now - last) * rate / 60.0)
            refilled.append((name, tokens))
            if tokens < 1.0:
                wait = max(wait, (1.0 - tokens) * 60.0 / rate)
        for name, tokens in refilled:
            self._buckets[name] = (tokens - (0.0 if wait else 1.0), now)
        return wait

    async def admit(self, buckets: Sequence[Bucket]) -> float:
        """0 if admitted (a token taken from each bucket), else the seconds until one is."""
        return self.admit_now(buckets)


class RedisRateLimiter:
    """Token buckets in Redis, shared by every instance (see the module doc).

    Args:
        client: a ``redis.asyncio.Redis``.
        prefix: put in front of every bucket's key.
        clock: Unix seconds (every instance's clock; NTP keeps them within the buckets' grain).
        fallback: the in-process buckets used while Redis does not answer.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], float] = time.time,
        fallback: LocalRateLimiter | None = None,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._clock = clock
        self._fallback = fallback or LocalRateLimiter(clock)
        self._script = client.register_script(_SCRIPT)

    async def admit(self, buckets: Sequence[Bucket]) -> float:
        """0 if admitted (a token taken from each bucket), else the seconds until one is."""
        if not buckets:
            return 0.0
        keys = [self._prefix + name for name, _rate in buckets]
        args = [repr(self._clock()), *(str(rate) for _name, rate in buckets)]
        try:
            answer = await self._script(keys=keys, args=args)
        except redis.exceptions.RedisError as exc:
            log.warning("vendor_rate_limit_degraded", error=type(exc).__name__)
            return self._fallback.admit_now(buckets)
        wait = float(answer.decode() if isinstance(answer, bytes) else answer)
        return wait if wait > 0 else 0.0

    async def aclose(self) -> None:
        """Close the connections."""
        await self._client.aclose()


@contextlib.asynccontextmanager
async def open_redis_rate_limiter(
    url: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    timeout_s: float = 0.5,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[RedisRateLimiter]:
    """The Redis rate limiter at ``url``, closed on exit.

    ``timeout_s`` bounds connecting and each script run: a vendor's request does not wait long
    for its rate limit (past it, the in-process bucket judges).
    """
    client = redis.asyncio.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
    limiter = RedisRateLimiter(client, prefix=prefix, clock=clock)
    try:
        yield limiter
    finally:
        await limiter.aclose()


def retry_after(wait_s: float) -> str:
    """A ``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s)))
