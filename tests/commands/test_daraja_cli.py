"""``gateway daraja pull-register``: the one-time Pull Transactions registration, over loopback.

The Daraja simulator serves on a loopback port from a thread of its own (the command runs its
own event loop); the command reads the Daraja app's credentials from ``GATEWAY_DARAJA_*``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web

from gateway.cli import main
from gateway.sim.daraja import DarajaSimulator

CALLBACK = "https://gateway.example/payments/daraja/pull"


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[DarajaSimulator]:
    """The simulator on a loopback port; the command's environment pointing at it."""
    sim = DarajaSimulator(seed=5, shortcode="600638")
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(sim.app, access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("GATEWAY_DARAJA_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("GATEWAY_DARAJA_KEY", sim.consumer_key)
    monkeypatch.setenv("GATEWAY_DARAJA_SECRET", sim.consumer_secret)
    monkeypatch.setenv("GATEWAY_DARAJA_SHORTCODE", sim.shortcode)
    try:
        yield sim
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def _register(*extra: str) -> list[str]:
    return [
        "daraja",
        "pull-register",
        "--nominated-number",
        "+254722000000",
        "--callback-url",
        CALLBACK,
        *extra,
    ]


def test_pull_register_registers_the_shortcode_once(
    served: DarajaSimulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """Registered with Daraja's wire format; a second run is "already registered", also 0."""
    assert main(_register("--json")) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["shortcode"], first["status"], first["already_registered"]) == (
        served.shortcode,
        "1000",
        False,
    )
    assert served.pull_registrations == {
        served.shortcode: {"NominatedNumber": "254722000000", "CallBackURL": CALLBACK}
    }
    assert main(_register("--json")) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["status"], again["already_registered"]) == ("1001", True)
    assert main(_register()) == 0
    assert "already registered" in capsys.readouterr().out


def test_pull_register_fails_with_a_reason(
    served: DarajaSimulator, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another shortcode is refused by Daraja; bad flags and missing credentials never call it."""
    assert main(_register("--shortcode", "999999")) == 1
    assert "Invalid ShortCode" in capsys.readouterr().err
    assert (
        main(["daraja", "pull-register", "--nominated-number", "12", "--callback-url", CALLBACK])
        == 1
    )
    assert "--nominated-number" in capsys.readouterr().err
    monkeypatch.setenv("GATEWAY_DARAJA_SECRET", "")
    assert main(_register()) == 1
    assert "GATEWAY_DARAJA_KEY" in capsys.readouterr().err
    assert served.pull_registrations == {}
