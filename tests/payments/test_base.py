import asyncio
from typing import cast

import aiohttp
import pytest

from gateway.payments.airtel import AirtelProvider
from gateway.payments.base import (
    PaybillProvider,
    PaymentError,
    PaymentProvider,
    TokenCache,
    remember,
)
from gateway.payments.daraja import DarajaProvider
from gateway.payments.momo import MomoProvider
from tests.payments.payfakes import FakeClock


def test_memory_forgets_the_oldest_beyond_its_limit() -> None:
    """Past the limit the oldest entries go; storing a key again makes it the newest."""
    memory: dict[str, int] = {}
    for index, key in enumerate(["a", "b", "c"]):
        remember(memory, key, index, limit=3)
    remember(memory, "a", 9, limit=3)
    remember(memory, "d", 4, limit=3)
    assert memory == {"c": 2, "a": 9, "d": 4}


async def test_concurrent_callers_share_one_token_fetch() -> None:
    """Ten callers waiting for a token at once cause a single fetch."""
    fetches = 0
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def fetch() -> tuple[str, float]:
        nonlocal fetches
        fetches += 1
        entered.set()
        await gate.wait()
        return f"token-{fetches}", 3600.0

    cache = TokenCache(fetch, clock=FakeClock())
    waiting = [asyncio.create_task(cache.get()) for _ in range(10)]
    await entered.wait()  # the first caller is fetching; the other nine queue behind it
    gate.set()
    assert set(await asyncio.gather(*waiting)) == {"token-1"}
    assert fetches == 1


async def test_token_refreshes_before_expiry_and_after_invalidation() -> None:
    """A token is refetched a margin before its lifetime ends, and at once when invalidated."""
    clock = FakeClock()
    issued: list[str] = []

    async def fetch() -> tuple[str, float]:
        issued.append(f"t{len(issued)}")
        return issued[-1], 600.0

    cache = TokenCache(fetch, clock=clock, margin_s=60.0)
    assert await cache.get() == "t0"
    clock.advance(539)
    assert await cache.get() == "t0"
    clock.advance(1)
    assert await cache.get() == "t1"
    cache.invalidate()
    assert await cache.get() == "t2"


async def test_failed_fetch_leaves_no_token_behind() -> None:
    """When fetching fails, the error reaches the caller and the next call tries again."""
    attempts = 0

    async def fetch() -> tuple[str, float]:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise PaymentError("down", provider="x", retryable=True)
        return "ok", 60.0

    cache = TokenCache(fetch, clock=FakeClock())
    with pytest.raises(PaymentError):
        await cache.get()
    assert await cache.get() == "ok"


def _adapters() -> tuple[PaymentProvider, PaymentProvider, PaymentProvider]:
    offline = cast("aiohttp.ClientSession", None)
    daraja: PaymentProvider = DarajaProvider(
        offline,
        base_url="http://127.0.0.1:9",
        consumer_key="k",
        consumer_secret="s",
        shortcode="600638",
        passkey="p",
        callback_url="http://127.0.0.1:9/stk",
    )
    momo: PaymentProvider = MomoProvider(
        offline, base_url="http://127.0.0.1:9", subscription_key="s", api_user="u", api_key="k"
    )
    airtel: PaymentProvider = AirtelProvider(
        offline, base_url="http://127.0.0.1:9", client_id="c", client_secret="s"
    )
    return daraja, momo, airtel


def test_only_daraja_is_a_paybill_provider() -> None:
    """Daraja takes customer-initiated payments (its routes depend on it); MoMo and Airtel don't."""
    daraja, momo, airtel = _adapters()
    assert isinstance(daraja, PaybillProvider)
    assert not isinstance(momo, PaybillProvider)
    assert not isinstance(airtel, PaybillProvider)


def test_adapters_name_themselves() -> None:
    """Each adapter's default name is the one its callback URLs and ledger rows use."""
    assert [p.name for p in _adapters()] == ["daraja", "momo", "airtel"]


async def test_nonsense_token_lifetime_is_used_once_then_refetched() -> None:
    """A token whose expires_in is not a finite positive number is refetched on the next call."""
    issued: list[str] = []

    async def fetch() -> tuple[str, float]:
        issued.append(f"t{len(issued)}")
        return issued[-1], float("nan")

    cache = TokenCache(fetch, clock=FakeClock())
    assert [await cache.get(), await cache.get()] == ["t0", "t1"]
