"""Typed application keys: how long-lived resources travel through the aiohttp app."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.config import Config
from gateway.metrics import Metrics

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
# Readiness checks: name → coroutine answering True when that dependency works.
READINESS = web.AppKey("readiness", dict[str, Callable[[], Awaitable[bool]]])
# Run before each /metrics scrape (gauges read from the ledger).
METRICS_REFRESH = web.AppKey("metrics_refresh", list[Callable[[], Awaitable[None]]])
